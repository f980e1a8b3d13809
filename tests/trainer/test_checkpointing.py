"""Gradient checkpointing that a CUDA graph can capture: the RNG state is saved only when the model draws."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from remote.events import EventWriter
from remote.trainer.step import backward_pass, batch_inputs


def test_the_rng_state_is_saved_only_for_a_model_with_dropout():
    from remote.trainer.run_setup import checkpoint_options

    plain = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0), nn.GELU())
    dropping = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
    assert checkpoint_options(plain) == {"use_reentrant": False, "preserve_rng_state": False}
    assert checkpoint_options(dropping) == {"use_reentrant": False, "preserve_rng_state": True}


@pytest.mark.parametrize("model", ["builtin:tiny-sd15", "builtin:tiny-flux"])
def test_the_denoiser_checkpoints_without_saving_the_rng_state(make_config, tmp_path, monkeypatch, model):
    from remote.trainer import run_setup

    keys = {"network_train_unet_only": True} if "flux" in model else {}
    _, cfg = make_config(pretrained_model_name_or_path=model, gradient_checkpointing=True, **keys)
    run = run_setup.setup(cfg, EventWriter(tmp_path / "events.jsonl", stream=io.StringIO()), None)
    calls: list[dict] = []
    original = torch.utils.checkpoint.checkpoint

    def spy(function, *args, **kwargs):
        calls.append(kwargs)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    run_setup.prepare_caches(run)
    loss = backward_pass(run, batch_inputs(run, [0], 0, 0))
    assert torch.isfinite(loss)
    assert calls and all(c == {"use_reentrant": False, "preserve_rng_state": False} for c in calls)
