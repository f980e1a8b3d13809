"""Whole runs on the tiny models: learning, resume equivalence, the CLI and its events, SDXL, options."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from remote.events import EventWriter, read_events
from remote.trainer.loop import OutputExistsError, Stopped, train

REPO = Path(__file__).resolve().parents[2]


def _run(cfg, **kw):
    log = Path(cfg.output_dir) / "events.jsonl"
    final = train(cfg, EventWriter(log, stream=io.StringIO()), **kw)
    return final, read_events(log)


@pytest.mark.parametrize("model", ["builtin:tiny-sd15", "builtin:tiny-sdxl"])
def test_loss_falls_when_overfitting_two_images(make_config, model):
    _, cfg = make_config(
        sizes=[(64, 64), (64, 64)],
        repeats=1,
        max_train_steps=80,
        learning_rate=1e-2,
        text_encoder_lr=0,
        network_dim=8,
        network_alpha=8,
        network_args=["conv_dim=8", "conv_alpha=8"],
        pretrained_model_name_or_path=model,
    )
    _, events = _run(cfg)
    losses = [e.loss for e in events if e.event == "step"]
    assert len(losses) == 80
    first, last = sum(losses[:16]) / 16, sum(losses[-16:]) / 16
    assert last < 0.6 * first, (first, last)


RESUME_KEYS = dict(
    max_train_steps=None,
    max_train_epochs=3,
    repeats=2,
    shuffle_caption=True,
    keep_tokens=1,
    flip_aug=True,
    noise_offset=0.05,
    caption_dropout_rate=0.2,
    lr_scheduler="cosine_with_restarts",
    lr_warmup_steps=2,
    lr_scheduler_num_cycles=2,
    gradient_accumulation_steps=2,
    save_every_n_steps=3,
    min_snr_gamma=5.0,
    text_encoder_lr=5e-4,
    clip_skip=2,
    save_every_n_epochs=1,
)


@pytest.mark.parametrize("model,stops", [("builtin:tiny-sd15", (1, 2, 3, 5)), ("builtin:tiny-sdxl", (3,))])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, make_config, model, stops):
    # 4 images x 2 repeats, batch 2 -> 4 batches, 2 steps/epoch, 6 steps
    _, cfg = make_config(**RESUME_KEYS, pretrained_model_name_or_path=model)
    reference, events = _run(cfg)
    assert [(e.step, e.epoch) for e in events if e.event == "checkpoint"] == [(2, 1), (3, 2), (4, 2)]
    expected = load_file(str(reference))

    for stop_at in stops:
        out = tmp_path / f"resumed-{stop_at}"
        resumed_cfg = cfg.model_copy(update={"output_dir": out})
        with pytest.raises(Stopped):
            _run(resumed_cfg, stop_after_step=stop_at)
        assert not (out / "t.safetensors").exists()
        if stop_at >= 2:  # stopped on an epoch's last step: that epoch's checkpoint was still written
            assert (out / "t-000001.safetensors").is_file()
        final, events = _run(resumed_cfg, resume="last")
        assert events[-1].event == "done" and events[-1].step == 6
        start = [e for e in events if e.event == "start"][-1]
        assert start.resumed_from_step == stop_at
        got = load_file(str(final))
        assert got.keys() == expected.keys()
        worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
        assert worst <= 1e-6, (stop_at, worst)


def test_resume_from_a_checkpoint_state_folder(tmp_path, make_config):
    _, cfg = make_config(max_train_steps=4, save_every_n_steps=2)
    reference, events = _run(cfg)
    state = next(e.state_dir for e in events if e.event == "checkpoint")
    other = cfg.model_copy(update={"output_dir": tmp_path / "other"})
    final, _ = _run(other, resume=state)
    a, b = load_file(str(reference)), load_file(str(final))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_final_file_is_never_overwritten(make_config):
    _, cfg = make_config(max_train_steps=1)
    _run(cfg)
    with pytest.raises(OutputExistsError, match="does not overwrite"):
        _run(cfg)


def test_cli_runs_the_example_and_speaks_the_protocol(tmp_path):
    example = tmp_path / "tiny"
    shutil.copytree(REPO / "examples" / "tiny", example, ignore=shutil.ignore_patterns("output"))
    config = example / "config.toml"
    text = config.read_text().replace("max_train_epochs = 2", "max_train_epochs = 1")
    text = text.replace("save_every_n_epochs = 1", "save_every_n_steps = 60")
    config.write_text(text)
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "remote.trainer", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout is nothing but events
    kinds = [line["event"] for line in lines]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert kinds.count("step") == 100 and "checkpoint" in kinds and "sample" in kinds and "epoch" in kinds
    start = lines[0]
    assert start["model_family"] == "sd15" and start["device"] == "cpu" and start["dtype"] == "float32"
    out = example / "output"
    assert (out / "events.jsonl").read_text().splitlines() == proc.stdout.splitlines()
    done = lines[-1]
    final = Path(done["path"])
    assert final == out / "tiny_toy.safetensors"
    import hashlib

    assert hashlib.sha256(final.read_bytes()).hexdigest() == done["sha256"]
    checkpoint = next(line for line in lines if line["event"] == "checkpoint")
    assert Path(checkpoint["path"]).name == "tiny_toy-step00000060.safetensors"
    assert Path(checkpoint["state_dir"]).is_dir()
    from PIL import Image

    with Image.open([line for line in lines if line["event"] == "sample"][-1]["path"]) as grid:
        assert grid.width > 4 * 64 and grid.height > 64

    again = subprocess.run(
        [sys.executable, "-m", "remote.trainer", str(config)], capture_output=True, text=True, env=env, timeout=600
    )
    assert again.returncode == 2
    error = json.loads(again.stdout.splitlines()[-1])
    assert error["event"] == "error" and error["kind"] == "config" and "already exists" in error["message"]


def test_cli_reports_config_errors_as_events(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('pretrained_model_name_or_path = "builtin:tiny-sd15"\ntrain_data_dir = "."\nlearnin_rate = 1\n')
    proc = subprocess.run(
        [sys.executable, "-m", "remote.trainer", str(config)],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert proc.returncode == 2
    event = json.loads(proc.stdout.splitlines()[-1])
    assert event["event"] == "error" and event["kind"] == "config" and "learnin_rate" in event["message"]


def test_sdxl_tiny_trains_samples_and_exports(make_config):
    from remote.trainer.lora import read_metadata

    _, cfg = make_config(
        pretrained_model_name_or_path="builtin:tiny-sdxl",
        max_train_steps=3,
        text_encoder_lr=0,
        sample_prompts=["rtoy, a red circle"],
        sample_steps=2,
        sample_seeds=[1],
        sample_weights=[0.5, 1.0],
        sample_every_n_steps=2,
    )
    final, events = _run(cfg)
    start = events[0]
    assert start.model_family == "sdxl"
    keys = load_file(str(final)).keys()
    assert keys and all(k.startswith("lora_unet_") for k in keys)  # text_encoder_lr = 0: UNet only
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in keys)
    assert read_metadata(final)["ss_base_model_version"] == "sdxl_base_v1-0"
    samples = [e for e in events if e.event == "sample"]
    assert [(Path(e.path).name, e.final) for e in samples] == [("t-step00000002.png", False), ("t.png", True)]


@pytest.mark.parametrize(
    "keys",
    [
        dict(optimizer_type="Lion", lr_scheduler="linear", learning_rate=1e-4),
        dict(optimizer_type="Prodigy", learning_rate=1.0, lr_scheduler="cosine"),
        dict(optimizer_type="Adafactor", lr_scheduler="polynomial", lr_scheduler_power=2.0),
        dict(v_parameterization=True, mixed_precision="bf16", gradient_checkpointing=True, save_precision="fp16"),
        dict(network_train_text_encoder_only=True, text_encoder_lr=1e-3, max_token_length=150),
    ],
    ids=["lion", "prodigy", "adafactor", "vpred-bf16-gc", "te-only-150"],
)
def test_options_train(make_config, keys):
    _, cfg = make_config(max_train_steps=2, **keys)
    final, events = _run(cfg)
    assert events[-1].event == "done"
    tensors = load_file(str(final))
    assert all(torch.isfinite(v.float()).all() for v in tensors.values())
    if keys.get("network_train_text_encoder_only"):
        assert all(k.startswith("lora_te_") for k in tensors)
    if keys.get("save_precision") == "fp16":
        assert all(v.dtype == torch.float16 for v in tensors.values())


def test_adamw8bit_on_cpu_names_the_alternative(make_config):
    from remote.trainer.optim import OptimizerError

    _, cfg = make_config(optimizer_type="AdamW8bit")
    with pytest.raises(OptimizerError, match='use optimizer_type = "AdamW"'):
        _run(cfg)


def test_gradient_checkpointing_gives_the_same_gradients(make_config, tmp_path):
    _, plain = make_config(max_train_steps=2)
    a, _ = _run(plain)
    checkpointed = plain.model_copy(update={"gradient_checkpointing": True, "output_dir": tmp_path / "gc"})
    b, _ = _run(checkpointed)
    ta, tb = load_file(str(a)), load_file(str(b))
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) < 1e-5


def test_default_names_are_kohyas_when_output_name_is_unset(make_config):
    """kohya: epoch-000001.safetensors for checkpoints, last.safetensors at the end."""
    _, cfg = make_config(output_name=None, max_train_steps=None, max_train_epochs=2, save_every_n_epochs=1)
    final, _events = _run(cfg)
    assert final.name == "last.safetensors"
    assert (cfg.output_dir / "epoch-000001.safetensors").is_file()
    assert not list(cfg.output_dir.glob("last-*.safetensors"))


def test_sdxl_latent_scale_comes_from_the_family_not_the_vae_file(make_config):
    """A separate SDXL VAE file loads with SD1's config (scaling 0.18215); kohya scales SDXL by 0.13025."""
    from remote.trainer.models import load_model

    _, cfg = make_config(pretrained_model_name_or_path="builtin:tiny-sdxl")
    bundle = load_model(cfg)
    bundle.vae.register_to_config(scaling_factor=0.18215)
    assert bundle.scaling_factor == 0.13025
