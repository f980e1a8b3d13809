"""A finished run saves the state of its final weights; a run with more epochs goes on from it (`rentrain continue`)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from remote.events import EventWriter, read_events
from remote.trainer.loop import train
from remote.trainer.state import ResumeError

# 4 images x 2 repeats, batch 2: 4 batches, 4 steps an epoch
STEPS_PER_EPOCH = 4


def _run(cfg, **kw):
    log = Path(cfg.output_dir) / "events.jsonl"
    final = train(cfg, EventWriter(log, stream=io.StringIO()), **kw)
    return final, read_events(log)


def _longer(cfg, epochs: int, **keys):
    return cfg.model_copy(update={"max_train_epochs": epochs, "output_name": f"t-{epochs}epochs", **keys})


def test_the_done_event_names_the_state_of_the_final_weights(make_config):
    _, cfg = make_config(max_train_steps=None, max_train_epochs=2)
    final, events = _run(cfg)
    done = events[-1]
    assert done.event == "done" and done.state_dir is not None
    state = Path(done.state_dir)
    assert state.parent == Path(cfg.output_dir)
    position = json.loads((state / "state.json").read_text())
    steps = 2 * STEPS_PER_EPOCH
    assert (position["step"], position["total_steps"], position["epoch"], position["batch"]) == (steps, steps, 2, 0)
    lora = load_file(str(state / "lora.safetensors"))
    assert lora.keys() == load_file(str(final)).keys()


def test_more_epochs_from_the_final_state_train_what_a_longer_run_trains(tmp_path, make_config):
    _, cfg = make_config(max_train_steps=None, max_train_epochs=2, lr_scheduler="constant", save_every_n_epochs=1)
    first, events = _run(cfg)
    first_bytes = first.read_bytes()
    continued, events = _run(_longer(cfg, 3), resume=events[-1].state_dir)
    start = [e for e in events if e.event == "start"][-1]
    assert start.resumed_from_step == 2 * STEPS_PER_EPOCH and start.total_steps == 3 * STEPS_PER_EPOCH
    assert events[-1].event == "done" and events[-1].step == 3 * STEPS_PER_EPOCH and events[-1].epoch == 3
    assert [e.step for e in events if e.event == "step"][-STEPS_PER_EPOCH:] == list(range(9, 13))
    assert continued == Path(cfg.output_dir) / "t-3epochs.safetensors"
    assert first.read_bytes() == first_bytes  # the earlier final file is left as it was

    reference, _ = _run(_longer(cfg, 3, output_dir=tmp_path / "straight"))
    got, expected = load_file(str(continued)), load_file(str(reference))
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6


def test_the_learning_rate_schedule_is_laid_over_the_new_total(tmp_path, make_config):
    _, cfg = make_config(max_train_steps=None, max_train_epochs=2, lr_scheduler="linear")
    _, events = _run(cfg)
    _, continued = _run(_longer(cfg, 3), resume=events[-1].state_dir)
    _, straight = _run(_longer(cfg, 3, output_dir=tmp_path / "straight"))
    rates = [(e.step, e.lr) for e in continued if e.event == "step" and e.step > 2 * STEPS_PER_EPOCH]
    assert rates == [(e.step, e.lr) for e in straight if e.event == "step" and e.step > 2 * STEPS_PER_EPOCH]
    assert rates[0][1] > 0  # the 2-epoch schedule had reached 0


def test_a_finished_state_with_no_more_steps_is_refused(make_config):
    _, cfg = make_config(max_train_steps=None, max_train_epochs=1)
    _, events = _run(cfg)
    with pytest.raises(ResumeError, match="ended at step 4 and this config gives 4 steps"):
        _run(cfg.model_copy(update={"output_name": "again"}), resume=events[-1].state_dir)


def test_a_state_within_a_run_still_needs_the_run_s_own_length(make_config):
    _, cfg = make_config(max_train_steps=None, max_train_epochs=2, save_every_n_epochs=1)
    _, events = _run(cfg)
    checkpoint = next(e for e in events if e.event == "checkpoint")
    with pytest.raises(ResumeError, match="total_steps"):
        _run(_longer(cfg, 3), resume=checkpoint.state_dir)
