"""A diverged training stops the run (kind "diverged", a job error) instead of paying for the rest of it."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from remote.events import EventWriter, StepEvent, parse_event, read_events
from remote.trainer.divergence import (
    NON_FINITE_LOSS_LIMIT,
    Diverged,
    DivergenceWatch,
    advice_for,
    weights_are_finite,
)
from remote.trainer.loop import train


def test_a_non_finite_loss_is_written_and_read_back() -> None:
    for loss in (math.nan, math.inf):
        event = StepEvent(step=3, total_steps=9, epoch=1, loss=loss, lr=1e-4, seconds_per_step=1, samples_per_second=2)
        parsed = parse_event(event.model_dump_json())
        assert isinstance(parsed, StepEvent) and parsed.step == 3
        assert math.isnan(parsed.loss) if math.isnan(loss) else parsed.loss == loss


def test_weights_are_finite() -> None:
    good = [torch.ones(3), torch.zeros(2, 2)]
    assert weights_are_finite(good)
    assert not weights_are_finite([*good, torch.tensor([1.0, math.nan])])
    assert not weights_are_finite([torch.tensor([math.inf])])


def test_non_finite_weights_stop_at_once() -> None:
    watch = DivergenceWatch(lambda: False)
    watch.observe(1, 0.5)
    with pytest.raises(Diverged, match="diverged at step 2: the loss is nan and the LoRA's weights are no longer"):
        watch.observe(2, math.nan)


def test_the_advice_fits_the_runs_optimizer_and_precision() -> None:
    assert advice_for("AdamW8bit", fp16=False) == "Lower the learning rate; the checkpoints saved before it are good"
    prodigy_fp16 = advice_for("prodigy", fp16=True)
    assert "Lower its d_coef" in prodigy_fp16 and "learning rate" not in prodigy_fp16
    assert 'train in bf16 (mixed_precision = "bf16")' in prodigy_fp16
    watch = DivergenceWatch(lambda: False, advice_for("Prodigy", fp16=False))
    with pytest.raises(Diverged, match="Lower its d_coef \\(Prodigy sets its own step size\\); the checkpoints"):
        watch.observe(1, math.nan)


def test_a_loss_that_stays_non_finite_stops_the_run_and_one_finite_loss_resets_the_count() -> None:
    watch = DivergenceWatch(lambda: True)
    for step in range(1, NON_FINITE_LOSS_LIMIT):  # one short of the limit: an fp16 overflow the scaler skipped
        watch.observe(step, math.inf)
    watch.observe(NON_FINITE_LOSS_LIMIT, 0.3)
    for step in range(20, 20 + NON_FINITE_LOSS_LIMIT - 1):
        watch.observe(step, math.nan)
    with pytest.raises(Diverged, match=f"for {NON_FINITE_LOSS_LIMIT} steps in a row \\(steps 20-29\\)"):
        watch.observe(29, math.nan)


def _diverge(make_config, **keys) -> tuple[str, list[StepEvent], Path]:
    from remote.config import MAX_LEARNING_RATE

    _, cfg = make_config(learning_rate=MAX_LEARNING_RATE, max_train_steps=40, **keys)
    log = Path(cfg.output_dir) / "events.jsonl"
    with pytest.raises(Diverged) as raised:
        train(cfg, EventWriter(log, stream=io.StringIO()))
    return str(raised.value), [e for e in read_events(log) if isinstance(e, StepEvent)], Path(cfg.output_dir)


def test_a_diverging_run_stops_at_its_first_non_finite_loss(make_config) -> None:
    message, steps, _ = _diverge(make_config)
    assert steps[-1].step < 40 and not math.isfinite(steps[-1].loss)  # its event is written, then the run stops
    assert all(math.isfinite(s.loss) for s in steps[:-1])
    assert f"diverged at step {steps[-1].step}: the loss is nan" in message


def test_no_checkpoint_of_diverged_weights_is_written(make_config) -> None:
    """An update can overflow the weights while the loss before it was finite: the step's file is not written."""
    message, steps, output = _diverge(make_config, save_every_n_steps=1)
    saved = sorted(output.glob("*.safetensors"))
    assert [path.name for path in saved] == [f"t-step{n:08d}.safetensors" for n in range(1, len(saved) + 1)]
    assert all(weights_are_finite(load_file(path).values()) for path in saved)
    assert f"diverged by step {len(saved) + 1}: the LoRA's weights are no longer finite numbers" in message
    assert steps[-1].step == len(saved) + 1


def test_a_stop_after_the_weights_diverged_saves_no_state_to_resume(make_config, tmp_path) -> None:
    """A stop (SIGTERM at a budget, a spot reclaim) at the step whose update overflowed the weights: a state of
    them would only rent a machine to diverge again on resume."""
    _, steps, _ = _diverge(make_config, save_every_n_steps=1)
    diverged_at = steps[-1].step  # the loss was still finite; the update after it was not
    from remote.config import MAX_LEARNING_RATE

    _, cfg = make_config(learning_rate=MAX_LEARNING_RATE, max_train_steps=40)
    cfg = cfg.model_copy(update={"output_dir": tmp_path / "stopped"})
    with pytest.raises(Diverged, match=f"diverged by step {diverged_at}"):
        train(cfg, EventWriter(None, stream=io.StringIO()), stop_after_step=diverged_at)
    assert not [p for p in (tmp_path / "stopped").iterdir() if p.is_dir() and "state" in p.name.lower()]
