"""`rentrain continue JOB --epochs N`: what it refuses before renting, and the job it hands to `run`'s renting."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

import rentrain.commands.continue_job as continue_command
from remote.buckets import StepPlan
from remote.config import load_config
from rentrain.cli import main
from rentrain.commands import jobs, queues
from rentrain.commands.check import run_check
from rentrain.commands.run import ResumeFrom, _new_job
from rentrain.job import RunSettings
from rentrain.ledger import JobRecord, JobState, Ledger
from rentrain.progress import RunProgress

REPO = Path(__file__).resolve().parents[2]
JOB_ID = "20260301-220000-abc123"
EARLIER_SETTINGS = RunSettings(provider="vast", max_cost=4.0, max_hours=6.0, idle_timeout_minutes=7, gpus=1)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The bundled example (2 epochs, output_name tiny_toy) with its earlier run's final file."""
    shutil.copytree(REPO / "examples" / "tiny", tmp_path / "tiny", ignore=shutil.ignore_patterns("output"))
    output = tmp_path / "tiny" / "output"
    output.mkdir()
    (output / "tiny_toy.safetensors").write_text("the earlier run's LoRA")
    return tmp_path / "tiny" / "config.toml"


def plan_of(config: Path) -> StepPlan:
    report = run_check(config)[0].dataset
    assert report is not None and report.step_plan is not None
    return report.step_plan


def write_state(folder: Path, plan: StepPlan, step: int, epoch: int, batch: int = 0, **changes: Any) -> Path:
    """A state folder as the trainer leaves it (state.json is what `continue` reads)."""
    folder.mkdir(parents=True)
    position = {
        "step": step,
        "epoch": epoch,
        "batch": batch,
        "seed": 42,
        "total_steps": step,
        "steps_per_epoch": plan.steps_per_epoch,
        "batches_per_epoch": plan.batches_per_epoch,
        "batch_size": 2,
        "model": "builtin:tiny-sd15",
        "family": "sd15",
        "processes": 1,
        "optimizer_type": "AdamW",
    }
    (folder / "state.json").write_text(json.dumps(position | changes))
    return folder


def record_job(config: Path, state: Path | None, job_state: JobState = "closed") -> JobRecord:
    job = JobRecord(
        id=JOB_ID,
        created_at=time.time(),
        config_path=str(config),
        provider="vast",
        label=f"rentrain-{JOB_ID}",
        state=job_state,
        outcome="succeeded" if job_state == "closed" else None,
        output_dir=str(config.parent / "output"),
        last_state_path=None if state is None else str(state),
        settings_json=EARLIER_SETTINGS.model_dump_json(),
    )
    Ledger().create_job(job)
    return job


@pytest.fixture
def finished(config: Path, tmp_path: Path) -> JobRecord:
    """A closed job whose run ended after its 2 epochs, its final state at home."""
    plan = plan_of(config)
    steps = 2 * plan.steps_per_epoch
    return record_job(config, write_state(tmp_path / "states" / f"tiny_toy-step{steps:08d}-state", plan, steps, 2))


@pytest.fixture
def rented(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What `continue` hands to `run`'s renting (offers, estimate, question, JobRunner), instead of renting."""
    calls: list[dict[str, Any]] = []

    def run_rented(*args: Any) -> None:
        loaded, settings, report, _gpus, _detach, yes, _console, _news, resume = args
        calls.append({"loaded": loaded, "settings": settings, "report": report, "yes": yes, "resume": resume})

    monkeypatch.setattr(continue_command, "_run_rented", run_rented)
    return calls


def continue_(*args: str) -> Result:
    return CliRunner().invoke(main, ["continue", *args], terminal_width=200)


def test_the_new_job_trains_more_epochs_from_the_final_state_under_a_name_of_its_own(
    finished: JobRecord, config: Path, rented: list[dict[str, Any]]
) -> None:
    result = continue_(JOB_ID[:12], "--epochs", "3", "--provider", "vast", "--yes")
    assert result.exit_code == 0, result.output
    [call] = rented
    train = call["loaded"].train
    assert (train.max_train_epochs, train.output_name) == (5, "tiny_toy-5epochs")
    assert train.output_dir == config.parent / "output"
    assert call["loaded"].path == config  # the job keeps the user's file; the changes go with its settings
    plan = plan_of(config)
    assert call["resume"] == ResumeFrom(JOB_ID, finished.last_state_path or "", 2 * plan.steps_per_epoch)
    to_go = call["report"].step_plan  # what the estimate prices: the 3 epochs still to train
    assert (to_go.epochs, to_go.total_steps) == (3, 3 * plan.steps_per_epoch)
    settings: RunSettings = call["settings"]
    assert settings.train_overrides == {
        "max_train_epochs": 5,
        "output_name": "tiny_toy-5epochs",
        "output_dir": str(config.parent / "output"),
    }
    kept = ("max_cost", "max_hours", "idle_timeout_minutes", "gpus")
    assert [getattr(settings, k) for k in kept] == [getattr(EARLIER_SETTINGS, k) for k in kept]
    assert call["yes"] and "written as tiny_toy-5epochs.safetensors" in result.output


def test_max_cost_replaces_the_earlier_budget_and_the_job_s_provider_is_the_default(
    finished: JobRecord, rented: list[dict[str, Any]]
) -> None:
    result = continue_(JOB_ID, "--epochs", "1", "--max-cost", "1.5", "--yes")
    assert result.exit_code == 0, result.output
    assert (rented[0]["settings"].provider, rented[0]["settings"].max_cost) == ("vast", 1.5)


def test_a_config_set_in_steps_goes_on_in_epochs_after_finishing_the_one_it_was_in(
    config: Path, tmp_path: Path, rented: list[dict[str, Any]]
) -> None:
    text = config.read_text().replace("max_train_epochs = 2", "max_train_steps = 150")
    config.write_text(text)
    plan = plan_of(config)
    assert plan.steps_per_epoch == plan.batches_per_epoch == 100  # 150 steps: half of the second epoch
    record_job(config, write_state(tmp_path / "state", plan, 150, 1, batch=50))
    result = continue_(JOB_ID, "--epochs", "1", "--yes")
    assert result.exit_code == 0, result.output
    train = rented[0]["loaded"].train
    assert (train.max_train_epochs, train.output_name) == (3, "tiny_toy-3epochs")
    assert rented[0]["report"].step_plan.total_steps == 50 + 100


def test_an_open_job_is_refused(config: Path, tmp_path: Path, rented: list[dict[str, Any]]) -> None:
    plan = plan_of(config)
    record_job(config, write_state(tmp_path / "state", plan, 200, 2), job_state="following")
    result = continue_(JOB_ID, "--epochs", "1", "--yes")
    assert result.exit_code == 1 and rented == []
    assert f"job {JOB_ID} is still open (following)" in result.output
    assert "Traceback" not in result.output


def test_a_job_without_a_state_at_home_is_refused(config: Path, rented: list[dict[str, Any]]) -> None:
    record_job(config, None)
    result = continue_(JOB_ID, "--epochs", "1", "--yes")
    assert result.exit_code == 1 and rented == []
    assert "has no resumable training state at home" in result.output


def test_a_state_folder_that_is_gone_is_named(config: Path, tmp_path: Path, rented: list[dict[str, Any]]) -> None:
    gone = tmp_path / "states" / "tiny_toy-step00000200-state"
    record_job(config, gone)
    result = continue_(JOB_ID, "--epochs", "1", "--yes")
    assert result.exit_code == 1 and rented == []
    assert f"training state {gone} is gone" in result.output


def test_a_state_from_within_the_run_is_refused(config: Path, tmp_path: Path, rented: list[dict[str, Any]]) -> None:
    plan = plan_of(config)
    record_job(config, write_state(tmp_path / "state", plan, 100, 1, total_steps=200))
    result = continue_(JOB_ID, "--epochs", "1", "--yes")
    assert result.exit_code == 1 and rented == []
    assert "is from step 100 of 200: its run did not end there" in result.output


def test_a_config_that_can_no_longer_be_read_is_refused(
    finished: JobRecord, config: Path, rented: list[dict[str, Any]]
) -> None:
    config.unlink()
    result = continue_(JOB_ID, "--epochs", "1", "--yes")
    assert result.exit_code == 1 and rented == []
    assert f"job {JOB_ID}'s config can no longer be read" in result.output and "no such file" in result.output


def test_a_changed_batch_size_is_refused_before_renting(
    config: Path, tmp_path: Path, rented: list[dict[str, Any]]
) -> None:
    plan = plan_of(config)
    record_job(config, write_state(tmp_path / "state", plan, 200, 2, batch_size=4))
    result = continue_(JOB_ID, "--epochs", "1", "--yes")
    assert result.exit_code == 1 and rented == []
    assert "trained batch_size 4" in result.output and "its config now gives batch_size 2" in result.output


@pytest.mark.parametrize("epochs", ["0", "-2", "two"])
def test_epochs_must_be_a_whole_number_from_one(finished: JobRecord, rented: list[dict[str, Any]], epochs: str) -> None:
    result = continue_(JOB_ID, "--epochs", epochs, "--yes")
    assert result.exit_code == 2 and rented == []
    assert "--epochs" in result.output


def test_an_unknown_job_is_refused(finished: JobRecord, rented: list[dict[str, Any]]) -> None:
    result = continue_("nosuchjob", "--epochs", "1", "--yes")
    assert result.exit_code == 1 and rented == [] and "no job 'nosuchjob'" in result.output


def test_a_continue_that_ran_before_is_not_overwritten(
    finished: JobRecord, config: Path, rented: list[dict[str, Any]]
) -> None:
    (config.parent / "output" / "tiny_toy-3epochs.safetensors").write_text("an earlier continue")
    result = continue_(JOB_ID, "--epochs", "1", "--yes")
    assert result.exit_code == 1 and rented == []
    assert "already holds tiny_toy-3epochs.safetensors" in result.output


def test_help_says_the_epochs_are_more_not_the_total() -> None:
    result = CliRunner().invoke(main, ["continue", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "How many MORE epochs" in result.output


def test_the_new_job_record_says_where_it_came_from(config: Path) -> None:
    ledger = Ledger()
    loaded = load_config(config)
    job = _new_job(ledger, loaded, "vast", EARLIER_SETTINGS, 300, ResumeFrom("old-job", "/home/s/state", 200))
    assert (job.last_state_path, job.total_steps) == ("/home/s/state", 500)
    assert ledger.transitions(job.id)[0].detail == "continues job old-job from /home/s/state"


def test_attach_and_a_queue_s_attach_train_with_the_job_s_overrides(config: Path) -> None:
    overrides = {"max_train_epochs": 9, "output_name": "tiny_toy-9epochs"}
    settings = RunSettings(provider="ssh", identity="/nonexistent/key", train_overrides=overrides)
    job = record_job(config, None).model_copy(update={"provider": "ssh", "settings_json": settings.model_dump_json()})
    runner, _ = jobs._runner(Ledger(), job, RunProgress(Console()), Console())
    queued = queues._queued(job)
    for train in (runner.loaded.train, queued.loaded.train):
        assert (train.max_train_epochs, train.output_name) == (9, "tiny_toy-9epochs")
