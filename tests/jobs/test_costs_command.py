"""`rentrain costs` (per day, per provider, per job, estimate against actual) and `rentrain status JOB`, from a
ledger as real runs leave it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from rentrain.cli import main
from rentrain.ledger import JobRun, Ledger
from tests.report.builders import ESTIMATE, T0, new_job, run_job

DAY = 86400.0
HOSTILE_CONFIG = "/configs/[red]evil[/red].toml"


def _measured(job_id: str) -> JobRun:
    return JobRun(
        job_id=job_id,
        provider="vast",
        gpu_model="H100 SXM",
        gpu_count=1,
        family="sd15",
        settings_key="sd15/512x512/batch2/rank32/te0/bytes2/ckpt0/accum1",
        seconds_per_step=99.0,
        steps_measured=15,
        phases={"image_pull": 60.0, "training": 1800.0},
        bytes_up=1_000_000,
        model_download_bytes=2_000_000_000,
        bytes_down=10_000_000,
        cost_usd=2.05,
        bandwidth_usd=0.01,
        recorded_at=T0 + 2080,
    )


def _two_days(tmp_path: Path) -> Ledger:
    """job-a1 on vast (estimated, succeeded, measured); two days later job-b1 on runpod (no estimate, failed)."""
    ledger = Ledger()
    first = new_job(tmp_path, "job-a1")
    ledger.create_job(first)
    run_job(ledger, first, T0, outcome="succeeded")
    ledger.record_run(_measured("job-a1"))
    second = new_job(tmp_path, "job-b1").model_copy(
        update={"provider": "runpod", "created_at": T0 + 2 * DAY, "estimate_json": "{}", "config_path": HOSTILE_CONFIG}
    )
    ledger.create_job(second)
    run_job(ledger, second, T0 + 2 * DAY, outcome="failed", error="trainer error")
    return ledger


def _day(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(at))


def test_costs_json_totals_every_job_and_sets_each_estimate_beside_what_it_cost(tmp_path: Path) -> None:
    ledger = _two_days(tmp_path)
    result = CliRunner().invoke(main, ["costs", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    billed = [ledger.job_cost("job-a1"), ledger.job_cost("job-b1")]
    assert billed[0] == pytest.approx(2.05)  # 2050 s at $3.60/h
    assert report["total_usd"] == pytest.approx(sum(billed))
    first, second = report["jobs"]
    assert (first["id"], first["provider"], first["gpu"], first["outcome"]) == (
        "job-a1",
        "vast",
        "H100 SXM",
        "succeeded",
    )
    assert first["estimate"]["cost_usd"] == ESTIMATE.cost_usd
    assert first["estimate"]["range_usd"] == pytest.approx([ESTIMATE.cost_low_usd, ESTIMATE.cost_high_usd])
    assert first["estimate"]["parts"]["train_hours"] == ESTIMATE.train_hours
    assert first["actual"]["cost_usd"] == pytest.approx(2.05) and first["actual"]["bandwidth_usd"] == 0.01
    assert first["actual"]["seconds_per_step"] == 99.0 and first["actual"]["phases"]["image_pull"] == 60.0
    assert first["error_pct"] == pytest.approx((2.05 + 0.01 - 2.16) / 2.16 * 100)
    assert second["estimate"] is None and second["error_pct"] is None and second["name"] == HOSTILE_CONFIG
    assert second["actual"]["bandwidth_usd"] is None  # measured nothing: no record of it
    assert report["per_provider"] == pytest.approx({"vast": billed[0], "runpod": billed[1]})
    assert report["per_day"] == pytest.approx({_day(T0): billed[0], _day(T0 + 2 * DAY): billed[1]})


def test_costs_since_a_day_lists_only_the_jobs_started_from_then(tmp_path: Path) -> None:
    ledger = _two_days(tmp_path)
    result = CliRunner().invoke(main, ["costs", "--json", "--since", _day(T0 + 2 * DAY)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [job["id"] for job in report["jobs"]] == ["job-b1"]
    assert report["total_usd"] == pytest.approx(ledger.job_cost("job-b1"))


def test_costs_shows_tables_with_the_error_and_prints_outside_text_plainly(tmp_path: Path) -> None:
    _two_days(tmp_path)
    result = CliRunner().invoke(main, ["costs"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Spend per day" in out and "Spend per provider" in out and "estimate against actual" in out
    assert _day(T0) in out and "runpod" in out
    assert "job-a1" in out and "$2.160" in out and "-5%" in out and "99 s" in out
    assert HOSTILE_CONFIG in out  # shown as it is, not as markup
    assert "total billed $4.1000 over 2 jobs, bandwidth $0.0100" in out


def test_costs_without_any_job_says_so(tmp_path: Path) -> None:
    runner = CliRunner()
    assert json.loads(runner.invoke(main, ["costs", "--json"]).stdout) == {
        "total_usd": 0.0,
        "bandwidth_usd": 0.0,
        "per_day": {},
        "per_provider": {},
        "jobs": [],
    }
    assert runner.invoke(main, ["costs"]).stdout.strip() == "no jobs yet"


def test_costs_refuses_a_since_that_is_no_date() -> None:
    result = CliRunner().invoke(main, ["costs", "--since", "yesterday"])
    assert result.exit_code == 2 and "'yesterday'" in result.output and "Traceback" not in result.output


def test_status_of_a_job_shows_its_estimate_against_what_it_cost_and_measured(tmp_path: Path) -> None:
    _two_days(tmp_path)
    result = CliRunner().invoke(main, ["status", "job-a"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "job job-a1: estimate against actual" in out and "job-b1" not in out
    assert "$2.160" in out and "$2.0600 (bandwidth $0.0100)" in out and "-5%" in out
    assert "90 s" in out and "99 s" in out and "+10%" in out  # the step time: estimated, measured, error
    assert "measured: 15 steps after warm-up on 1x H100 SXM" in out
    unmeasured = CliRunner().invoke(main, ["status", "job-b1"], env={"COLUMNS": "300"})
    assert "no measurements recorded" in unmeasured.stdout


def test_status_of_an_unknown_job_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["status", "nope"])
    assert result.exit_code == 1 and "no job 'nope'" in result.output and "Traceback" not in result.output
    _two_days(tmp_path)
    result = CliRunner().invoke(main, ["status", "job-"])
    assert result.exit_code == 1 and "'job-' matches 2 jobs" in result.output
