"""Replaying the forward and backward pass of a training step as a CUDA graph.

An eager step of SD 1.5 launches about 8,000 small kernels; the GPU waits on the host for most of the
step. Captured once per input shape, the same kernels replay from one launch. What stays eager is what
needs the host anyway and is cheap to launch: the batch's random draws and token ids (so the fast path
draws exactly what the eager path draws), and the optimizer step (one fused kernel per group, any
optimizer, loss scaling included).

A shape is captured the second time it is seen: its first batch runs eagerly and serves as the warm-up
that capture needs (cuDNN/cuBLAS plans, lazy buffers such as the loss scale). All graphs share one memory
pool, so bucketed datasets cost the memory of their largest shape, not the sum; past ``max_graphs``
shapes, new shapes run eagerly. A capture that fails (an operation that syncs with the host) turns the
graphs off for the rest of the run and says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .memory import part_sizes


@dataclass
class StepInputs:
    """The tensors one micro-batch feeds the step: latents and their noise draws, and the conditioning
    (cached text-encoder outputs, or token ids when the text encoders run in the step; ``conditions``: the
    family's other inputs by name, such as SDXL's size ids or Flux's T5 attention mask). All batch-first."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    weights: torch.Tensor
    context: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)
    token_ids: list[torch.Tensor] | None = None

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        named = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                named.append((f.name, value))
            elif isinstance(value, list):
                named += [(f"{f.name}.{i}", t) for i, t in enumerate(value)]
            elif isinstance(value, dict):
                named += [(f"{f.name}.{key}", t) for key, t in sorted(value.items())]
        return named

    def shape_key(self) -> tuple:
        return tuple((name, tuple(t.shape), t.dtype) for name, t in self.tensors())

    def clone(self) -> StepInputs:
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.clone()
            elif isinstance(value, list):
                value = [t.clone() for t in value]
            elif isinstance(value, dict):
                value = {key: t.clone() for key, t in value.items()}
            values[f.name] = value
        return StepInputs(**values)

    def split(self, micro_batch: int | None) -> list[StepInputs]:
        """The batch as micro-batches of at most ``micro_batch`` images, as even as possible (all fields are
        batch-first). Each part's loss weights are scaled by its share of the batch, so that the parts' mean
        losses add up to the batch's mean loss and their gradients to its gradient."""
        size = self.latents.shape[0]
        sizes = part_sizes(size, micro_batch)
        if len(sizes) == 1:
            return [self]
        parts, start = [], 0
        for part in sizes:
            stop = start + part
            values = {}
            for f in fields(self):
                value = getattr(self, f.name)
                if isinstance(value, torch.Tensor):
                    value = value[start:stop]
                elif isinstance(value, list):
                    value = [t[start:stop] for t in value]
                elif isinstance(value, dict):
                    value = {key: t[start:stop] for key, t in value.items()}
                values[f.name] = value
            values["weights"] = values["weights"] * (part / size)
            parts.append(StepInputs(**values))
            start = stop
        return parts

    def copy_from(self, other: StepInputs) -> None:
        for (_, mine), (_, theirs) in zip(self.tensors(), other.tensors(), strict=True):
            mine.copy_(theirs, non_blocking=True)


def recover_from_failed_capture() -> None:
    """Wait for the GPU, and take the device's default random generator out of capture mode. A capture that
    ends in an error never tells the generator it ended, and its next draw outside a capture (a dropout, say)
    would fail with "Offset increment outside graph capture"; a fresh state with the same seed and offset
    replaces the stuck one."""
    torch.cuda.synchronize()
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    generator.graphsafe_set_state(generator.clone_state())


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: StepInputs
    loss: torch.Tensor


@dataclass
class StepGraphs:
    """Runs ``backward_pass(inputs) -> detached loss`` through one CUDA graph per input shape.

    The gradients must stay allocated between steps (zeroed in place, never set to None): a captured
    graph adds into the tensors that existed when it was captured. The LoRA's flat gradient buffer
    (lora_fused.py) is allocated once for the run.
    """

    backward_pass: Callable[[StepInputs], torch.Tensor]
    max_graphs: int = 32
    graphs: dict[tuple, _Captured] = field(default_factory=dict)
    seen: set[tuple] = field(default_factory=set)
    disabled: str | None = None
    captured_shapes: int = 0
    eager_steps: int = 0
    on_disable: Callable[[str], None] | None = None
    _pool: Any = None  # the first graph's memory pool (torch's private handle type), shared by the others
    _side: torch.cuda.Stream | None = None

    def backward(self, inputs: StepInputs) -> torch.Tensor:
        key = inputs.shape_key()
        captured = self.graphs.get(key)
        if captured is None and self.disabled is None and key in self.seen and len(self.graphs) < self.max_graphs:
            captured = self._capture(key, inputs)
        if captured is None:
            self.seen.add(key)
            return self._eager(inputs)
        captured.inputs.copy_from(inputs)
        captured.graph.replay()
        return captured.loss.clone()  # the next replay of this shape overwrites captured.loss

    def _eager(self, inputs: StepInputs) -> torch.Tensor:
        """An eager step on a side stream: the warm-up capture needs happens on a stream other than the
        one being captured."""
        self.eager_steps += 1
        if self._side is None:
            self._side = torch.cuda.Stream()
        main = torch.cuda.current_stream()
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            loss = self.backward_pass(inputs)
        main.wait_stream(self._side)
        return loss

    def _capture(self, key: tuple, inputs: StepInputs) -> _Captured | None:
        static = inputs.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                loss = self.backward_pass(static)
        except Exception as exc:
            self.disabled = (
                f"CUDA graph capture failed, training continues without graphs ({type(exc).__name__}: {exc})"
            )
            self.graphs.clear()
            recover_from_failed_capture()
            if self.on_disable is not None:
                self.on_disable(self.disabled)
            return None
        if self._pool is None:
            self._pool = graph.pool()
        captured = _Captured(graph, static, loss)
        self.graphs[key] = captured
        self.captured_shapes += 1
        return captured


@dataclass
class OptimizerGraph:
    """Replays ``apply_gradients`` (clip, optimizer step, zero the gradients) as one CUDA graph.

    With ~500-1,500 LoRA tensors the optimizer's Python bookkeeping costs 10-40 ms of host time a step,
    longer than the GPU work it launches. It needs an optimizer whose step is capturable with its learning
    rates in device tensors (torch AdamW, fused and capturable), and gradients that stay allocated. The
    first step runs eagerly: it creates the optimizer state that the graph then updates in place.
    """

    apply_gradients: Callable[[], None]
    calls: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    disabled: str | None = None
    on_disable: Callable[[str], None] | None = None

    def step(self) -> None:
        self.calls += 1
        if self.graph is None and self.disabled is None and self.calls > 1:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.apply_gradients()
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.apply_gradients()
        except Exception as exc:
            self.disabled = (
                f"CUDA graph capture of the optimizer failed, it steps eagerly ({type(exc).__name__}: {exc})"
            )
            recover_from_failed_capture()
            if self.on_disable is not None:
                self.on_disable(self.disabled)
            return
        self.graph = graph
