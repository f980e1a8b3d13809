"""Schedulers, prompt files, text conditioning, regularisation images, stopping on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remote.trainer.optim import make_scheduler, parse_optimizer_args

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
)
def test_schedulers_match_diffusers(name):
    from diffusers.optimization import get_scheduler

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = make(opt)
        values = []
        for _ in range(30):
            values.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return values

    warmup = 0 if name == "constant" else 5
    ours = lrs(lambda o: make_scheduler(o, name, warmup, 30, num_cycles=3, power=2.0))
    theirs = lrs(
        lambda o: get_scheduler(name, o, num_warmup_steps=warmup, num_training_steps=30, num_cycles=3, power=2.0)
    )
    assert ours == pytest.approx(theirs, abs=1e-9)


def test_optimizer_args_are_parsed_like_kohya():
    assert parse_optimizer_args(["weight_decay=0.01", "betas=0.9,0.99", "decouple=True", "d_coef=2"]) == {
        "weight_decay": 0.01,
        "betas": (0.9, 0.99),
        "decouple": True,
        "d_coef": 2,
    }


def test_kohya_prompt_file(tmp_path):
    from remote.trainer.samples import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("# comment\nrtoy, a cat --n blurry, lowres --w 512 --h 512 --s 20\n\nrtoy, a dog\n")
    prompts = read_prompts(path)
    assert [(p.prompt, p.negative) for p in prompts] == [("rtoy, a cat", "blurry, lowres"), ("rtoy, a dog", "")]
    assert [p.prompt for p in read_prompts(["a", " ", "b"])] == ["a", "b"]


@pytest.fixture(scope="module")
def sd15():
    from remote.trainer.models import ModelBundle
    from remote.trainer.tiny import build_tiny

    return ModelBundle(family="sd15", v_prediction=False, reference="builtin:tiny-sd15", **build_tiny("sd15"))


def test_clip_skip_is_kohyas_penultimate_layer_plus_final_norm(sd15):
    from remote.trainer.models import encode, tokenize

    ids = tokenize(sd15, ["a red circle"], None)
    te = sd15.text_encoders[0]
    with torch.no_grad():
        plain, pooled = encode(sd15, ids, None)
        skip1, _ = encode(sd15, ids, 1)
        skip2, _ = encode(sd15, ids, 2)
        out = te(ids[0][:, 0], output_hidden_states=True)
        expected = getattr(te, "text_model", te).final_layer_norm(out.hidden_states[-2])
    assert pooled is None
    assert torch.equal(plain, out.last_hidden_state) and torch.equal(skip1, plain)
    assert torch.allclose(skip2, expected)


def test_long_captions_use_75_token_chunks(sd15):
    from remote.trainer.models import encode, tokenize

    long = ", ".join(f"tag{i}" for i in range(60))
    ids = tokenize(sd15, [long, "short"], 150)
    assert tuple(ids[0].shape) == (2, 2, 77)
    assert (ids[0][:, :, 0] == 49406).all()
    with torch.no_grad():
        context, _ = encode(sd15, ids, None)
    assert tuple(context.shape) == (2, 152, 32)


def test_regularisation_images_balance_and_weight(tmp_path, make_config):
    from remote.trainer.data import build_dataset
    from tests.trainer.conftest import make_images

    make_images(tmp_path / "reg" / "1_person", [(64, 64)] * 3, captions=None)
    _, cfg = make_config(reg_data_dir=str(tmp_path / "reg"), prior_loss_weight=0.5, repeats=2)
    dataset = build_dataset(cfg)
    train = sum(r.repeats for r in dataset.records if not r.is_reg)
    reg = sum(r.repeats for r in dataset.records if r.is_reg)
    assert train == 8 and reg == 8  # kohya raises reg repeats until reg samples >= train samples
    assert dataset.plan.samples_per_epoch == 16


def test_sigterm_saves_a_state_and_resume_finishes(tmp_path, make_config):
    config, _cfg = make_config(max_train_steps=60)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    lines = []
    with subprocess.Popen(
        [sys.executable, "-m", "remote.trainer", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(json.loads(line))
            if lines[-1]["event"] == "start":  # the run cannot have finished yet, however slow this reader is
                proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 130
    error = lines[-1]
    assert error["event"] == "error" and error["kind"] == "interrupted" and "--resume" in error["message"]
    assert Path(error["state_dir"], "state.json").is_file()
    stopped_at = max(line["step"] for line in lines if line["event"] == "step")
    assert 1 <= stopped_at < 60
    resumed = subprocess.run(
        [sys.executable, "-m", "remote.trainer", str(config), "--resume", "last"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    events = [json.loads(line) for line in resumed.stdout.splitlines()]
    assert events[0]["resumed_from_step"] == stopped_at and events[-1]["event"] == "done" and events[-1]["step"] == 60
