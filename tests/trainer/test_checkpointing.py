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
    assert checkpoint_options(nn.Sequential(nn.Dropout2d(0.1)))["preserve_rng_state"]  # a _DropoutNd, not a Dropout


def test_a_text_encoder_with_attention_dropout_in_its_config_keeps_the_rng_state():
    from transformers import CLIPTextConfig, CLIPTextModel

    from remote.trainer.run_setup import checkpoint_options

    small = dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    assert not checkpoint_options(CLIPTextModel(CLIPTextConfig(**small)))["preserve_rng_state"]
    dropping = CLIPTextModel(CLIPTextConfig(**small, attention_dropout=0.1))  # applied as a function
    assert checkpoint_options(dropping)["preserve_rng_state"]


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


def test_the_last_blocks_the_plan_leaves_unchecked_run_plainly_and_the_gradient_is_the_same(
    make_config, tmp_path, monkeypatch
):
    from remote.trainer import run_setup

    _, cfg = make_config(
        pretrained_model_name_or_path="builtin:tiny-flux", gradient_checkpointing=True, network_train_unet_only=True
    )
    run = run_setup.setup(cfg, EventWriter(tmp_path / "events.jsonl", stream=io.StringIO()), None)
    run_setup.prepare_caches(run)
    blocks = run.family.checkpoint_blocks(run.bundle.unet)
    assert len(blocks) == 4  # the tiny Flux.1: two double-stream blocks, then two single-stream ones
    checkpointed: list[nn.Module] = []
    original = torch.utils.checkpoint.checkpoint

    def spy(function, *args, **kwargs):  # what torch recomputes: the bound __call__ of a block
        checkpointed.append(function.__self__)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)

    def gradient(plain_blocks: int) -> torch.Tensor:
        checkpointed.clear()
        run_setup.checkpoint_denoiser(run.bundle, plain_blocks)
        flat = run.network.flat_buffers
        flat.master_grad.zero_()
        backward_pass(run, batch_inputs(run, [0], 0, 0))
        return flat.master_grad.clone()

    full = gradient(0)
    assert checkpointed == blocks
    partial = gradient(3)
    assert checkpointed == blocks[:1]
    plain = gradient(4)
    assert checkpointed == []
    assert full.abs().sum() > 0
    assert torch.allclose(full, partial, atol=1e-6) and torch.allclose(full, plain, atol=1e-6)
