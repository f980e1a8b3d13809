"""graphs.py's decisions, on the CPU: when a shape is captured, when it runs eagerly, what a failed capture
does, how the graphs share memory, and which batches share a graph. CUDA's graph and stream objects are
replaced by stand-ins that record what the trainer asks of them (bench/graphs_check.py runs the real ones on
a GPU)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch

from remote.trainer import graphs
from remote.trainer.graphs import OptimizerGraph, StepGraphs, StepInputs


@dataclass
class FakeCuda:
    captures: list[object] = field(default_factory=list)  # the pool each capture was given
    replays: int = 0
    fail_capture: bool = False
    synchronized: int = 0
    generator_states: list[str] = field(default_factory=list)  # states the default generator was given


@pytest.fixture
def cuda(monkeypatch) -> FakeCuda:
    state = FakeCuda()

    class Graph:
        def replay(self):
            state.replays += 1

        def pool(self):
            return ("pool of", id(self))

    @contextmanager
    def capture(graph, pool=None):
        if state.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        state.captures.append(pool)
        yield

    class Stream:
        def wait_stream(self, other):
            pass

    class Generator:
        def clone_state(self):
            return "fresh state, same seed and offset"

        def graphsafe_set_state(self, new):
            state.generator_states.append(new)

    monkeypatch.setattr(graphs.torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(graphs.torch.cuda, "graph", capture)
    monkeypatch.setattr(graphs.torch.cuda, "Stream", Stream)
    monkeypatch.setattr(graphs.torch.cuda, "current_stream", lambda *a: Stream())
    monkeypatch.setattr(graphs.torch.cuda, "stream", lambda s: contextmanager(lambda: (yield))())
    monkeypatch.setattr(graphs.torch.cuda, "synchronize", lambda *a: setattr(state, "synchronized", 1))
    monkeypatch.setattr(graphs.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(graphs.torch.cuda, "default_generators", (Generator(),))
    return state


def inputs(batch: int = 2, size: int = 8, seed: int = 0) -> StepInputs:
    gen = torch.Generator().manual_seed(seed)
    return StepInputs(
        latents=torch.randn(batch, 4, size, size, generator=gen),
        noise=torch.randn(batch, 4, size, size, generator=gen),
        timesteps=torch.randint(0, 1000, (batch,), generator=gen),
        weights=torch.ones(batch),
        context=torch.randn(batch, 77, 32, generator=gen),
    )


class Recorder:
    """A backward pass that records the inputs it ran on (eagerly, or while being captured)."""

    def __init__(self):
        self.seen: list[StepInputs] = []

    def __call__(self, step_inputs: StepInputs) -> torch.Tensor:
        self.seen.append(step_inputs)
        return step_inputs.latents.sum().detach()


def test_a_shape_runs_eagerly_first_is_captured_the_second_time_then_replays(cuda):
    backward = Recorder()
    steps = StepGraphs(backward)
    small, large = inputs(batch=2), inputs(batch=4)
    losses = [steps.backward(x) for x in (small, small, large, small, large, large)]
    assert steps.eager_steps == 2  # the first batch of each shape: capture's warm-up
    assert steps.captured_shapes == 2 and len(steps.graphs) == 2
    assert cuda.replays == 4  # the second batch of a shape replays right after its capture, the later ones too
    assert len(backward.seen) == 4  # 2 eager + 2 captured: a replay does not run the Python code
    assert torch.equal(losses[0], small.latents.sum())  # an eager step's own loss


def test_a_replay_reads_the_new_batch_from_the_captured_buffers(cuda):
    steps = StepGraphs(Recorder())
    first, second, third = inputs(seed=1), inputs(seed=2), inputs(seed=3)
    steps.backward(first)
    steps.backward(second)
    (captured,) = steps.graphs.values()
    assert captured.inputs.latents.data_ptr() not in (second.latents.data_ptr(), third.latents.data_ptr())
    loss = steps.backward(third)
    for (_, static), (_, new) in zip(captured.inputs.tensors(), third.tensors(), strict=True):
        assert torch.equal(static, new)  # copied in before the replay
    assert loss is not captured.loss  # a copy: the next replay of this shape overwrites captured.loss


def test_all_graphs_share_the_first_graphs_memory_pool(cuda):
    steps = StepGraphs(Recorder())
    for batch in (1, 1, 2, 2, 3, 3):
        steps.backward(inputs(batch=batch))
    first_pool = cuda.captures[0]
    assert first_pool is None  # the first capture makes the pool ...
    assert len(cuda.captures) == 3 and cuda.captures[1] == cuda.captures[2] == steps._pool is not None  # ... shared


def test_past_max_graphs_new_shapes_stay_eager(cuda):
    steps = StepGraphs(Recorder(), max_graphs=1)
    for batch in (1, 1, 2, 2, 2):
        steps.backward(inputs(batch=batch))
    assert steps.captured_shapes == 1 and steps.eager_steps == 4  # 1 once, then batch 2 every time
    assert steps.disabled is None


def test_a_failed_capture_turns_the_graphs_off_for_the_run_and_says_why(cuda):
    messages: list[str] = []
    backward = Recorder()
    steps = StepGraphs(backward, on_disable=messages.append)
    steps.backward(inputs())
    cuda.fail_capture = True
    loss = steps.backward(inputs(seed=5))
    assert torch.equal(loss, inputs(seed=5).latents.sum())  # the batch still trains, eagerly
    assert steps.disabled is not None and "RuntimeError: operation not permitted" in steps.disabled
    assert messages == [steps.disabled] and steps.graphs == {} and cuda.synchronized
    assert cuda.generator_states == ["fresh state, same seed and offset"]  # out of its stuck capture mode
    cuda.fail_capture = False
    for _ in range(3):
        steps.backward(inputs())
    assert steps.captured_shapes == 0 and steps.eager_steps == 5 and cuda.replays == 0


def test_the_optimizer_steps_eagerly_once_then_replays_its_graph(cuda):
    calls: list[str] = []
    optimizer = OptimizerGraph(lambda: calls.append("step"))
    for _ in range(4):
        optimizer.step()
    assert calls == ["step", "step"]  # the eager first step (it creates the state) and the capture
    assert optimizer.graph is not None and cuda.replays == 3


def test_a_failed_optimizer_capture_leaves_it_eager(cuda):
    messages: list[str] = []
    calls: list[str] = []
    optimizer = OptimizerGraph(lambda: calls.append("step"), on_disable=messages.append)
    cuda.fail_capture = True
    for _ in range(3):
        optimizer.step()
    assert optimizer.graph is None and optimizer.disabled is not None and messages == [optimizer.disabled]
    assert calls == ["step"] * 3 and cuda.replays == 0
    assert cuda.generator_states == ["fresh state, same seed and offset"]


def test_batches_share_a_graph_exactly_when_their_tensors_have_the_same_shapes():
    """A bucket's batches (same image size, same batch size, same conditioning) share one graph; another
    bucket, a shorter last batch, another number of text chunks or token ids instead of cached outputs
    each need their own."""
    key = inputs(batch=2, size=8).shape_key()
    assert inputs(batch=2, size=8, seed=9).shape_key() == key
    assert inputs(batch=2, size=16).shape_key() != key
    assert inputs(batch=1, size=8).shape_key() != key
    longer = inputs()
    longer.context = torch.randn(2, 152, 32)  # max_token_length 150: two 75-token chunks
    assert longer.shape_key() != key
    tokens = inputs()
    tokens.context, tokens.token_ids = None, [torch.zeros(2, 1, 77, dtype=torch.long)]
    assert tokens.shape_key() != key
    half = inputs()
    half.latents = half.latents.half()
    assert half.shape_key() != key  # dtype is part of the key


def test_micro_batches_of_an_uneven_split_make_at_most_two_shapes():
    """Memory planning's split of 5 images by 2: 2 + 2 + 1, two shapes to capture (not three)."""
    parts = inputs(batch=5).split(2)
    assert [p.latents.shape[0] for p in parts] == [2, 2, 1]
    assert len({p.shape_key() for p in parts}) == 2
    assert len({p.shape_key() for p in inputs(batch=4).split(3)}) == 1  # 4 by 3: 2 + 2, one shape
