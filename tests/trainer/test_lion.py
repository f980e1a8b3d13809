"""GraphableLion against lion-pytorch's Lion: the same parameters and states, bit for bit, on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from lion_pytorch import Lion

from remote.trainer import lion as lion_mod
from remote.trainer.lion import GraphableLion
from remote.trainer.optim import is_graphable, make_optimizer, place_learning_rates, why_not_graphable

SHAPES = [(8, 3), (5,), (4, 4), (2, 7)]


def _tensors(flat: bool, seed: int = 0, order: tuple[int, ...] = (0, 1, 2, 3)) -> list[torch.Tensor]:
    """SHAPES' tensors, separate or as views of one buffer (and their gradients of another), laid out in
    ``order`` there."""
    generator = torch.Generator().manual_seed(seed)
    values = [torch.randn(shape, generator=generator) for shape in SHAPES]
    if not flat:
        return [v.clone().requires_grad_(True) for v in values]
    buffer = torch.cat([values[i].reshape(-1) for i in order])
    grads = torch.zeros_like(buffer)
    params: list[torch.Tensor] = [torch.empty(0)] * len(values)
    offset = 0
    for i in order:
        n = values[i].numel()
        params[i] = torch.nn.Parameter(buffer[offset : offset + n].view(values[i].shape))
        params[i].grad = grads[offset : offset + n].view(values[i].shape)
        offset += n
    return params


def _groups(params: list[torch.Tensor]) -> list[dict]:
    return [
        {"params": params[:2], "lr": 3e-4, "weight_decay": 0.01},
        {"params": params[2:], "lr": 1e-4, "betas": (0.95, 0.98)},
    ]


def _set_gradients(params: list[torch.Tensor], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        grad = torch.randn(p.shape, generator=generator)
        if p.grad is None:
            p.grad = grad
        else:
            p.grad.copy_(grad)


def _train(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, first: int = 0) -> None:
    """Steps with a learning rate that changes each step, as a scheduler changes it."""
    for step in range(first, first + steps):
        _set_gradients(params, step)
        for group, base in zip(optimizer.param_groups, (3e-4, 1e-4), strict=True):
            rate = base * (1 - step / 10)
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(rate)
            else:
                group["lr"] = rate
        optimizer.step()


def _assert_same(ours: GraphableLion, theirs: Lion, ours_params, their_params) -> None:
    for a, b in zip(ours_params, their_params, strict=True):
        assert torch.equal(a.detach(), b.detach())
        assert torch.equal(ours.state[a]["exp_avg"], theirs.state[b]["exp_avg"])


LAYOUTS = {
    "separate tensors": (False, (0, 1, 2, 3)),
    "one flat buffer": (True, (0, 1, 2, 3)),
    "groups interleaved in the buffer": (True, (0, 2, 1, 3)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("decoupled", [False, True])
def test_bit_for_bit_as_lion_pytorch(layout: str, decoupled: bool, monkeypatch) -> None:
    updated_shapes: list[tuple[int, ...]] = []
    real_update = lion_mod._update

    def spy(p, *args):
        updated_shapes.append(tuple(p.shape))
        real_update(p, *args)

    monkeypatch.setattr(lion_mod, "_update", spy)
    flat, order = LAYOUTS[layout]
    ours_params, their_params = _tensors(flat, order=order), _tensors(False)
    ours = GraphableLion(_groups(ours_params), lr=3e-4, decoupled_weight_decay=decoupled)
    place_learning_rates(ours, torch.device("cpu"))
    assert isinstance(ours.param_groups[0]["lr"], torch.Tensor) and ours.param_groups[0]["lr"].dtype == torch.float64
    theirs = Lion(_groups(their_params), lr=3e-4, decoupled_weight_decay=decoupled)
    _train(ours, ours_params, 6)
    _train(theirs, their_params, 6)
    _assert_same(ours, theirs, ours_params, their_params)
    # a group that tiles its part of a flat buffer is stepped whole, other tensors one by one
    assert updated_shapes[:2] == ([(24 + 5,), (16 + 14,)] if layout == "one flat buffer" else [(8, 3), (5,)])


def test_a_step_with_found_inf_changes_nothing_and_grad_scale_divides() -> None:
    params = _tensors(flat=True)
    optimizer = GraphableLion(_groups(params), lr=3e-4)
    place_learning_rates(optimizer, torch.device("cpu"))
    _train(optimizer, params, 2)
    before = [p.detach().clone() for p in params]
    states = [optimizer.state[p]["exp_avg"].clone() for p in params]
    for p in params:
        p.grad.fill_(math.nan)
    optimizer.found_inf = torch.ones(())  # type: ignore[attr-defined]
    optimizer.grad_scale = None  # type: ignore[attr-defined]
    optimizer.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))
    assert all(torch.equal(optimizer.state[p]["exp_avg"], s) for p, s in zip(params, states, strict=True))

    # found_inf 0 and grads scaled by 4: the same step as unscaled grads without the attributes
    reference_params = [p.detach().clone().requires_grad_(True) for p in params]
    reference = GraphableLion(_groups(reference_params), lr=3e-4)
    reference.load_state_dict(optimizer.state_dict())
    place_learning_rates(reference, torch.device("cpu"))
    _set_gradients(reference_params, 7)
    reference.step()
    _set_gradients(params, 7)
    for p in params:
        p.grad.mul_(4)
    optimizer.found_inf = torch.zeros(())  # type: ignore[attr-defined]
    optimizer.grad_scale = torch.tensor(4.0)  # type: ignore[attr-defined]
    optimizer.step()
    assert all(torch.equal(p.detach(), r.detach()) for p, r in zip(params, reference_params, strict=True))


def test_states_load_both_ways_and_training_goes_on_alike() -> None:
    their_params = _tensors(False)
    theirs = Lion(_groups(their_params), lr=3e-4)
    _train(theirs, their_params, 3)

    ours_params = _tensors(flat=True)
    for ours_p, their_p in zip(ours_params, their_params, strict=True):
        ours_p.data.copy_(their_p.detach())
    ours = GraphableLion(_groups(ours_params), lr=3e-4)
    places = [ours.state[p]["exp_avg"].data_ptr() for p in ours_params]
    ours.load_state_dict(theirs.state_dict())  # lion-pytorch's state into ours
    place_learning_rates(ours, torch.device("cpu"))
    assert [ours.state[p]["exp_avg"].data_ptr() for p in ours_params] == places  # loaded in place
    _assert_same(ours, theirs, ours_params, their_params)
    _train(ours, ours_params, 3, first=3)
    _train(theirs, their_params, 3, first=3)
    _assert_same(ours, theirs, ours_params, their_params)

    again = Lion(_groups([p.detach().clone().requires_grad_(True) for p in ours_params]), lr=3e-4)
    again.load_state_dict(ours.state_dict())  # and ours into lion-pytorch's
    for p, q in zip(ours_params, again.param_groups[0]["params"] + again.param_groups[1]["params"], strict=True):
        assert torch.equal(ours.state[p]["exp_avg"], again.state[q]["exp_avg"])


def test_make_optimizer_graphs_lion_where_it_can() -> None:
    cpu = torch.device("cpu")
    graphed, label = make_optimizer("Lion", _groups(_tensors(True)), 3e-4, [], cpu, graphable=True)
    assert isinstance(graphed, GraphableLion) and is_graphable(graphed) and why_not_graphable(graphed) is None
    assert label == "remote.trainer.lion.GraphableLion"
    eager, _ = make_optimizer("lion", _groups(_tensors(True)), 3e-4, [], cpu, graphable=False)
    assert type(eager) is Lion and not is_graphable(eager)
    triton, _ = make_optimizer("Lion", _groups(_tensors(True)), 3e-4, ["use_triton=True"], cpu, graphable=True)
    assert type(triton) is Lion  # lion-pytorch's Triton kernel takes its rate as a float: eager
    assert "Python number" in str(why_not_graphable(triton))
    with_args, _ = make_optimizer(
        "Lion", _groups(_tensors(True)), 3e-4, ["weight_decay=0.1", "betas=0.9,0.99"], cpu, graphable=True
    )
    assert isinstance(with_args, GraphableLion) and with_args.param_groups[1]["weight_decay"] == 0.1


def test_every_parameter_needs_a_gradient() -> None:
    params = _tensors(False)
    optimizer = GraphableLion([{"params": params}], lr=1e-4)
    params[0].grad = torch.zeros_like(params[0])
    with pytest.raises(ValueError, match=r"shape \(5,\) has no gradient"):
        optimizer.step()


def test_the_trainer_steps_lion_graphably_to_the_same_lora(make_config, monkeypatch) -> None:
    """The tiny model with UNet and text-encoder LoRA (two groups on the flat buffers): GraphableLion, as the
    trainer builds it on a GPU with graphs on, gives lion-pytorch's LoRA bit for bit."""
    import io
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    from remote.events import EventWriter, read_events
    from remote.trainer import loop
    from remote.trainer.speed import FastPath

    def run(tag: str) -> tuple[dict[str, torch.Tensor], list[float], str]:
        _, cfg = make_config(
            optimizer_type="Lion", learning_rate=1e-4, text_encoder_lr=5e-5, max_train_steps=5, output_name=tag
        )
        log = Path(cfg.output_dir) / f"{tag}.jsonl"
        loop.train(cfg, EventWriter(log, stream=io.StringIO()))
        events = read_events(log)
        path = Path(cfg.output_dir) / f"{tag}.safetensors"
        with safe_open(str(path), "pt") as saved:
            optimizer = saved.metadata()["ss_optimizer"]
        return load_file(path), [e.loss for e in events if e.event == "step"], optimizer

    plain, plain_losses, plain_label = run("plain")
    monkeypatch.setattr(FastPath, "graphable_optimizer", lambda self: True)
    graphable, graphable_losses, graphable_label = run("graphable")
    assert plain_label.startswith("lion_pytorch") and graphable_label == "remote.trainer.lion.GraphableLion"
    assert plain_losses == graphable_losses and len(plain_losses) == 5
    assert plain.keys() == graphable.keys() and any("lora_te" in key for key in plain)
    assert all(torch.equal(plain[key], graphable[key]) for key in plain)
