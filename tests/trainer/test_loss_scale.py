"""fp16 loss scaling decided on the device (remote/trainer/loss_scale.py) against torch.amp.GradScaler."""

from __future__ import annotations

import itertools

import pytest
import torch

from remote.trainer.loss_scale import DeviceLossScaler

OVERFLOW_STEPS = {2, 3, 7}  # steps whose gradients hold an inf or a NaN
STEPS = 12


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]


def _loss(params: list[torch.nn.Parameter], step: int) -> torch.Tensor:
    loss = sum((p * (step + 1)).sin().sum() for p in params)
    assert isinstance(loss, torch.Tensor)
    if step in OVERFLOW_STEPS:
        loss = loss + params[0].sum() * (float("inf") if step != 3 else float("nan"))
    return loss


def _train(make_optimizer, use_reference: bool, growth_interval: int = 3):
    params = _params()
    optimizer = make_optimizer(params)
    if use_reference:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=growth_interval)
    else:
        scaler = DeviceLossScaler(torch.device("cpu"), init_scale=2.0**10)
        scaler.growth_interval = growth_interval
    scales = []
    for step in range(STEPS):
        optimizer.zero_grad()
        scaler.scale(_loss(params, step)).backward()
        if use_reference:
            scaler.unscale_(optimizer)
        else:
            scaler.unscale_([p.grad for p in params])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    return params, optimizer, scales


def _fused_adamw(params):
    return torch.optim.AdamW(params, lr=0.1, weight_decay=0.01, fused=True)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False)


@pytest.mark.parametrize("make_optimizer", [_fused_adamw, _sgd], ids=["fused AdamW (skips on device)", "SGD"])
def test_same_steps_skips_and_scales_as_grad_scaler(make_optimizer):
    ours, our_optimizer, our_scales = _train(make_optimizer, use_reference=False)
    reference, ref_optimizer, ref_scales = _train(make_optimizer, use_reference=True)

    assert our_scales == ref_scales
    assert min(our_scales) < 2.0**10  # backed off after an overflow
    assert any(b > a for a, b in itertools.pairwise(our_scales))  # and grew after clean steps
    for mine, theirs in zip(ours, reference, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
        assert torch.isfinite(mine).all()
    if make_optimizer is _fused_adamw:  # a skipped step does not count
        for mine, theirs in zip(ours, reference, strict=True):
            assert int(our_optimizer.state[mine]["step"]) == STEPS - len(OVERFLOW_STEPS)
            assert int(ref_optimizer.state[theirs]["step"]) == STEPS - len(OVERFLOW_STEPS)


def test_no_host_sync_with_an_optimizer_that_skips_on_the_device(monkeypatch):
    params = _params()
    optimizer = _fused_adamw(params)
    scaler = DeviceLossScaler(torch.device("cpu"))
    scaler.scale(_loss(params, 2)).backward()  # an overflow

    def host_read(*args, **kwargs):
        raise AssertionError("a value was read on the host")

    before = [p.detach().clone() for p in params]
    monkeypatch.setattr(torch.Tensor, "item", host_read)
    monkeypatch.setattr(torch.Tensor, "__bool__", host_read)
    scaler.unscale_([p.grad for p in params])
    scaler.step(optimizer)
    scaler.update()
    monkeypatch.undo()

    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert scaler.get_scale() == 2.0**15


def test_state_dict_is_grad_scalers():
    reference = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=50)
    ours = DeviceLossScaler(torch.device("cpu"))
    ours.load_state_dict(reference.state_dict())
    assert ours.get_scale() == 512.0 and ours.growth_interval == 50

    scale_tensor = ours._scale
    ours.load_state_dict({**ours.state_dict(), "scale": 8.0, "_growth_tracker": 7})
    assert ours._scale is scale_tensor  # in place: a captured graph reads the same tensor
    back = torch.amp.GradScaler("cpu")
    back.load_state_dict(ours.state_dict())
    assert back.get_scale() == 8.0 and back._get_growth_tracker() == 7
