"""The pieces of the fast path that run anywhere: bf16 without autocast, graphable learning rates, step inputs.

The CUDA graphs themselves need a GPU; bench/fast_path_check.py compares them with the eager path there.
"""

from __future__ import annotations

import io
import itertools
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import remote.trainer.loop as loop
import remote.trainer.step as step_mod
from remote.events import EventWriter, read_events
from remote.trainer.graphs import StepInputs
from remote.trainer.lora import LoRAModule
from remote.trainer.optim import is_graphable, make_optimizer, make_scheduler, place_learning_rates


def _inputs(batch: int = 2, size: int = 8) -> StepInputs:
    return StepInputs(
        latents=torch.randn(batch, 4, size, size),
        noise=torch.randn(batch, 4, size, size),
        timesteps=torch.randint(0, 1000, (batch,)),
        weights=torch.ones(batch),
        token_ids=[torch.randint(0, 100, (batch, 1, 77))],
    )


def test_step_inputs_key_is_the_shapes_and_copy_fills_the_static_buffers():
    a, b = _inputs(), _inputs()
    assert a.shape_key() == b.shape_key()
    assert a.shape_key() != _inputs(batch=1).shape_key()
    assert a.shape_key() != _inputs(size=16).shape_key()
    static = a.clone()
    assert static.latents.data_ptr() != a.latents.data_ptr()
    static.copy_from(b)
    for (_, mine), (_, theirs) in zip(static.tensors(), b.tensors(), strict=True):
        assert torch.equal(mine, theirs)
    assert not torch.equal(static.noise, a.noise)


def test_lora_in_bf16_without_autocast_matches_autocast_and_trains_fp32_weights():
    torch.manual_seed(0)
    base = nn.Linear(32, 16).to(torch.bfloat16)
    lora = LoRAModule("lora_unet_x", base, dim=4, alpha=2)
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = base(x)
    direct = base(x)
    assert direct.dtype == torch.bfloat16
    torch.testing.assert_close(direct, expected, rtol=0, atol=0)
    direct.float().sum().backward()
    assert lora.lora_up.weight.dtype == torch.float32 and lora.lora_up.weight.grad is not None


def test_graphable_optimizer_keeps_one_lr_tensor_that_the_schedule_fills():
    params = [nn.Parameter(torch.randn(4))]
    optimizer, _ = make_optimizer(
        "AdamW", [{"params": params, "lr": 1e-3}], 1e-3, [], torch.device("cpu"), graphable=True
    )
    assert not is_graphable(optimizer)  # capturable needs CUDA: on CPU the rates stay floats
    assert isinstance(optimizer.param_groups[0]["lr"], float)

    optimizer.defaults.update(capturable=True, fused=True)  # as make_optimizer sets them on CUDA
    assert is_graphable(optimizer)
    place_learning_rates(optimizer, torch.device("cpu"))
    rate = optimizer.param_groups[0]["lr"]
    assert isinstance(rate, torch.Tensor)
    scheduler = make_scheduler(optimizer, "linear", 0, 10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] is rate  # filled in place: a captured graph reads this tensor
    assert float(rate) == pytest.approx(1e-3 * 7 / 10)

    saved = optimizer.state_dict()
    saved["param_groups"][0]["lr"] = 5e-4  # a state written by a float-rate optimizer
    optimizer.load_state_dict(saved)
    place_learning_rates(optimizer, torch.device("cpu"))
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(5e-4)


def _losses_and_choices(make_config, tag: str, **keys) -> tuple[list[float], list[str]]:
    """The tiny model trained with ``keys``: its step losses and the start event's choices."""
    _, cfg = make_config(seed=3, output_name=tag, **keys)
    log = Path(cfg.output_dir) / f"{tag}.jsonl"
    loop.train(cfg, EventWriter(log, stream=io.StringIO()))
    events = read_events(log)
    start = next(e for e in events if e.event == "start")
    assert start.setup_seconds["latents_encoded"] >= 0 and start.choices
    parts = start.setup_seconds
    assert (
        parts["imports"] >= 0
        and parts["load_weights"] > 0
        and parts["imports"] + parts["load_weights"] <= parts["setup"]
    )
    return [e.loss for e in events if e.event == "step"], start.choices


def _assert_alike(direct: list[float], autocast: list[float], steps: int) -> None:
    assert len(direct) == len(autocast) == steps
    for a, b in zip(direct, autocast, strict=True):
        assert abs(a - b) <= 0.02 * abs(b) + 1e-3, (direct, autocast)


def test_bf16_throughout_trains_like_autocast(make_config, monkeypatch):
    """The tiny model trained 12 steps in bf16 with and without autocast: the same losses within bf16 noise."""
    direct, _ = _losses_and_choices(make_config, "direct", max_train_steps=12, mixed_precision="bf16")
    monkeypatch.setattr(step_mod, "uses_autocast", lambda run: True)
    autocast, _ = _losses_and_choices(make_config, "autocast", max_train_steps=12, mixed_precision="bf16")
    _assert_alike(direct, autocast, 12)


def test_batches_split_into_micro_batches_train_the_same_function(make_config, monkeypatch):
    """Memory planning's split: batch 3 run as micro-batches of 2 + 1 gives the same losses, steps and LoRA as
    batch 3 at once (same draws; the parts' losses are weighted by their share of the batch)."""
    from safetensors.torch import load_file

    def run(tag: str, micro_batch: int | None):
        _, cfg = make_config(
            max_train_steps=4,
            batch_size=3,
            sizes=[(64, 64)] * 6,
            seed=5,
            output_name=tag,
            text_encoder_lr=1e-3,
            max_grad_norm=0.01,
        )
        original = loop.setup

        def setup(*args, **kwargs):
            built = original(*args, **kwargs)
            built.micro_batch = micro_batch
            return built

        monkeypatch.setattr(loop, "setup", setup)
        log = Path(cfg.output_dir) / f"{tag}.jsonl"
        final = loop.train(cfg, EventWriter(log, stream=io.StringIO()))
        return [e.loss for e in read_events(log) if e.event == "step"], load_file(str(final))

    whole, whole_lora = run("whole", None)
    split, split_lora = run("split", 2)
    assert len(whole) == len(split) == 4
    assert split == pytest.approx(whole, rel=1e-5, abs=1e-7)
    # float summation order only: Adam's normalised steps show it on near-zero gradients, ~1e-6 absolute
    for key, value in whole_lora.items():
        torch.testing.assert_close(split_lora[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    moved = sum(float((split_lora[k] - v).pow(2).sum()) for k, v in whole_lora.items() if k.endswith("weight"))
    norm = sum(float(v.pow(2).sum()) for k, v in whole_lora.items() if k.endswith("weight"))
    assert (moved / norm) ** 0.5 < 1e-5


def test_step_inputs_split_weights_each_part_by_its_share():
    inputs = _inputs(batch=3)
    parts = inputs.split(2)
    assert [p.latents.shape[0] for p in parts] == [2, 1]
    assert [p.token_ids[0].shape[0] for p in parts] == [2, 1]
    torch.testing.assert_close(torch.cat([p.weights for p in parts]), torch.tensor([2 / 3, 2 / 3, 1 / 3]))
    assert inputs.split(None) == [inputs] and inputs.split(3) == [inputs]


def test_gradient_clipping_scales_the_flat_gradients_like_torch():
    """One norm over every LoRA gradient, as clip_grad_norm_ over the parameters computes it; the optimizer
    then steps with the clipped gradient (SGD makes the step size show it)."""
    from types import SimpleNamespace

    from remote.trainer.lora import LoRANetwork

    network = LoRANetwork(None, [], "sd15", dim=2, alpha=2)
    for name in ("lora_unet_a", "lora_unet_b"):
        module = LoRAModule(name, nn.Linear(4, 3), dim=2, alpha=2)
        network.add_module(name, module)
        network.unet_names.append(name)
    flat = network.use_flat_buffers(torch.float32)
    params = list(network.parameters())
    for i, param in enumerate(params):
        param.grad.fill_(float(i + 1))
    expected = [p.grad.clone() for p in params]
    twins = [nn.Parameter(torch.zeros_like(g)) for g in expected]
    for twin, grad in zip(twins, expected, strict=True):
        twin.grad = grad.clone()
    reference_norm = torch.nn.utils.clip_grad_norm_(twins, 0.5)  # torch's own, on ordinary parameters
    scale = 0.5 / (float(reference_norm) + 1e-6)
    assert scale < 0.1  # the gradients are far above the limit
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    run = SimpleNamespace(scaler=None, cfg=SimpleNamespace(max_grad_norm=0.5), network=network, optimizer=optimizer)
    step_mod.apply_gradients(run)
    for param, old, grad, twin in zip(params, before, expected, twins, strict=True):
        torch.testing.assert_close(old - param.detach(), grad * scale)
        torch.testing.assert_close(old - param.detach(), twin.grad)
    assert float(flat.master_grad.abs().sum()) == 0.0  # zeroed for the next step, in place


def test_steps_overlap_except_where_host_work_reads_the_weights(make_config, monkeypatch):
    # 4 images x 2 repeats at batch 2: 4 steps an epoch, 8 steps; a checkpoint after step 3, epochs end at 4 and 8
    _, cfg = make_config(max_train_steps=None, max_train_epochs=2, save_every_n_steps=3, text_encoder_lr=0)
    order: list[tuple[str, int]] = []
    launch, finish = loop.train_step, loop.finish_step

    def launched(run, *args):
        step = launch(run, *args)
        order.append(("launch", step.step))
        return step

    def finished(run, step, losses):
        order.append(("finish", step.step))
        finish(run, step, losses)

    def checkpoint(run, epoch, step, **kw):
        order.append(("checkpoint", step))

    monkeypatch.setattr(loop, "train_step", launched)
    monkeypatch.setattr(loop, "finish_step", finished)
    monkeypatch.setattr(loop, "save_checkpoint", checkpoint)
    # the trainer's clock, as a counter: on the CPU a step's time is the clock's advance during its own launch
    monkeypatch.setenv("RENTRAIN_DEVICE", "cpu")
    ticks = itertools.count()
    monkeypatch.setattr(step_mod, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks)), time=time.time))
    log = Path(cfg.output_dir) / "events.jsonl"
    loop.train(cfg, EventWriter(log, stream=io.StringIO()))
    assert order == [
        ("launch", 1),
        ("launch", 2),
        ("finish", 1),
        ("launch", 3),
        ("finish", 2),
        ("finish", 3),
        ("checkpoint", 3),
        ("launch", 4),
        ("finish", 4),  # the epoch's end
        ("launch", 5),
        ("launch", 6),
        ("finish", 5),
        ("finish", 6),
        ("checkpoint", 6),
        ("launch", 7),
        ("launch", 8),
        ("finish", 7),
        ("finish", 8),  # the last step
    ]
    steps = [e for e in read_events(log) if e.event == "step"]
    assert [e.step for e in steps] == list(range(1, 9))
    assert [e.epoch for e in steps] == [1] * 4 + [2] * 4
    # each step reports its own time (one tick: its launch read the clock twice), also a step finished right
    # after the one before it (the last), not the time between two finishes
    assert [e.seconds_per_step for e in steps] == [1.0] * 8


def test_host_learning_rates_are_the_rates_the_schedule_gave_the_groups():
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))]
    groups = [
        {"params": [params[0]], "lr": 1e-3, "name": "unet"},
        {"params": [params[1]], "lr": 5e-4, "name": "text_encoder"},
    ]
    optimizer, _ = make_optimizer("AdamW", groups, 1e-3, [], torch.device("cpu"))
    scheduler = make_scheduler(optimizer, "linear", 0, 10)
    run = type("R", (), {"scheduler": scheduler, "optimizer": optimizer})()
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        expected = {g["name"]: float(g["lr"]) for g in optimizer.param_groups}
        assert step_mod.host_learning_rates(run) == pytest.approx(expected)
    assert step_mod.host_learning_rates(run)["unet"] == pytest.approx(1e-3 * 7 / 10)


def test_a_failed_launch_still_reports_the_step_before_it(make_config, monkeypatch):
    _, cfg = make_config(max_train_steps=8, text_encoder_lr=0)
    launch = loop.train_step

    def failing(run, group, epoch, first_batch):
        if run.position.step == 2:  # launching step 3, with step 2 launched and not yet reported
            raise RuntimeError("CUDA out of memory (stand-in)")
        return launch(run, group, epoch, first_batch)

    monkeypatch.setattr(loop, "train_step", failing)
    log = Path(cfg.output_dir) / "events.jsonl"
    with pytest.raises(RuntimeError, match="stand-in"):
        loop.train(cfg, EventWriter(log, stream=io.StringIO()))
    assert [e.step for e in read_events(log) if e.event == "step"] == [1, 2]


def test_a_stop_signal_during_a_checkpoint_stops_at_that_step(make_config, monkeypatch):
    _, cfg = make_config(max_train_steps=8, save_every_n_steps=3, text_encoder_lr=0)
    checkpoint = loop.save_checkpoint

    def checkpoint_then_signal(run, *args, **kwargs):
        checkpoint(run, *args, **kwargs)
        run.stop_requested = True  # SIGTERM while the checkpoint was written

    monkeypatch.setattr(loop, "save_checkpoint", checkpoint_then_signal)
    log = Path(cfg.output_dir) / "events.jsonl"
    with pytest.raises(loop.Stopped) as stopped:
        loop.train(cfg, EventWriter(log, stream=io.StringIO()))
    assert stopped.value.state_dir.name.endswith("step00000003-state")
    assert [e.step for e in read_events(log) if e.event == "step"] == [1, 2, 3]


def test_each_optimizer_that_cannot_graph_says_why():
    """Each optimizer class the config accepts is found by its real module and name, or graphs."""
    from bitsandbytes.optim.adamw import AdamW8bit
    from bitsandbytes.optim.lion import Lion8bit
    from lion_pytorch import Lion
    from prodigyopt import Prodigy
    from transformers.optimization import Adafactor

    from remote.trainer.adamw8bit import GraphableAdamW8bit
    from remote.trainer.optim import why_not_graphable

    params = [nn.Parameter(torch.zeros(8, 8))]
    reasons = {
        cls.__name__: why_not_graphable(cls(params, lr=1e-3, **extra))
        for cls, extra in [
            (torch.optim.AdamW, {}),
            (AdamW8bit, {}),
            (Lion8bit, {}),
            (Lion, {}),
            (Prodigy, {}),
            (Adafactor, {"relative_step": False, "scale_parameter": False}),
        ]
    }
    assert reasons["AdamW"] == "torch AdamW without fused=True steps tensor by tensor"
    assert reasons["AdamW8bit"].startswith("bitsandbytes counts steps on the host")
    assert reasons["Lion8bit"].startswith("bitsandbytes counts steps on the host")
    assert "learning rate" in reasons["Lion"] and "Python number" in reasons["Lion"]
    assert ".item()" in reasons["Prodigy"]
    assert "step count on the host" in reasons["Adafactor"]
    assert why_not_graphable(GraphableAdamW8bit(params, lr=1e-3)) is None


def test_fp16_runs_throughout_for_sd_and_trains_like_autocast(make_config, monkeypatch):
    """fp16 on an SD family: no autocast (the start event says so), the same losses as under autocast within
    fp16 noise, with the loss scaler in both."""
    direct, choices = _losses_and_choices(make_config, "direct", max_train_steps=8, mixed_precision="fp16")
    assert "compute: fp16 throughout (frozen model and activations), LoRA weights fp32" in choices
    monkeypatch.setattr(step_mod, "uses_autocast", lambda run: True)
    autocast, choices = _losses_and_choices(make_config, "autocast", max_train_steps=8, mixed_precision="fp16")
    assert "compute: fp16 under autocast, LoRA weights fp32" in choices
    _assert_alike(direct, autocast, 8)


def test_fp16_keeps_autocast_where_the_family_overflows_fp16():
    from remote.trainer.families import get_family

    def uses(family: str, dtype: torch.dtype) -> bool:
        return step_mod.uses_autocast(SimpleNamespace(family=get_family(family), dtype=dtype))  # type: ignore[arg-type]

    assert [uses(f, torch.float16) for f in ("sd15", "sd2", "sdxl", "flux")] == [False, False, False, True]
    assert not uses("flux", torch.bfloat16) and not uses("sd15", torch.float32)
