"""The fast path's switch: RENTRAIN_FAST_PATH=0 trains the same function with none of the speed machinery."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

import remote.trainer.loop as loop
from remote.events import EventWriter, read_events


def test_the_eager_path_trains_like_the_fast_path_and_says_it_is_off(make_config, monkeypatch):
    built = []
    original = loop.setup

    def setup(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(loop, "setup", setup)

    def run(tag: str) -> tuple[list[float], list[str]]:
        _, cfg = make_config(max_train_steps=6, seed=4, output_name=tag, text_encoder_lr=5e-4, save_every_n_steps=4)
        log = Path(cfg.output_dir) / f"{tag}.jsonl"
        loop.train(cfg, EventWriter(log, stream=io.StringIO()))
        events = read_events(log)
        start = next(e for e in events if e.event == "start")
        return [e.loss for e in events if e.event == "step"], start.choices

    fast, fast_choices = run("fast")
    assert built[-1].speed.overlap and any(lora.fused_views for lora in built[-1].network.loras())
    monkeypatch.setenv("RENTRAIN_FAST_PATH", "0")
    eager, eager_choices = run("eager")
    assert not built[-1].speed.overlap and not any(lora.fused_views for lora in built[-1].network.loras())
    assert any(c.startswith("fast path: off") for c in eager_choices)
    assert not any(c.startswith("fast path") for c in fast_choices)
    assert len(fast) == len(eager) == 6
    assert eager == pytest.approx(fast, rel=1e-4, abs=1e-6)  # fused vs plain LoRA products: float order only


def test_the_denoisers_kernels_are_said_in_the_choices_routed_or_not(monkeypatch):
    import remote.trainer.speed as speed_module

    monkeypatch.setattr(speed_module, "use_channels_last_group_norm", lambda model, device, dtype: (61, None))
    monkeypatch.setattr(speed_module, "use_fused_upcast", lambda model, device, dtype: (0, "Triton is not installed"))
    monkeypatch.setattr(speed_module, "use_fused_rotary", lambda model, device, dtype: (False, None))  # not Flux.1
    fast = speed_module.FastPath(torch.device("cuda"), enabled=True)
    fast.prepare_denoiser(torch.nn.Linear(2, 2), torch.bfloat16)
    assert fast.choices == [
        "GroupNorm: the UNet's 61 layers run channels_last (Triton kernels)",
        "8-bit upcast: PyTorch's cast and multiplication; Triton is not installed",
    ]
