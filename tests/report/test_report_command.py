"""`rentrain report ID`: a job or a queue, by id or unique prefix, rebuilt from disk; the path printed plainly."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from rentrain.cli import main
from rentrain.ledger import Ledger
from tests.report.builders import night_queue, succeeded_job


def test_a_job_prefix_rebuilds_its_report_and_prints_the_path(tmp_path: Path) -> None:
    ledger = Ledger()
    files = succeeded_job(ledger, tmp_path, "job-a1")
    report = files.output_dir / "report.html"
    assert not report.exists()
    result = CliRunner().invoke(main, ["report", "job-a"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{report}\n"
    assert "Job job-a1: succeeded" in report.read_text(encoding="utf-8")


def test_a_queue_id_rebuilds_the_queue_report_and_its_jobs(tmp_path: Path) -> None:
    ledger = Ledger()
    night = night_queue(ledger, tmp_path)
    result = CliRunner().invoke(main, ["report", night.queue.id])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{night.queue.report_path}\n"
    assert Path(night.queue.report_path).is_file()
    assert all((Path(job.output_dir) / "report.html").is_file() for job in ledger.queue_jobs(night.queue.id))


def test_an_unknown_or_ambiguous_id_is_a_clear_error(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["report", "nope"])  # no ledger on this machine yet
    assert result.exit_code == 1 and "no job or queue 'nope'" in result.output and "Traceback" not in result.output
    ledger = Ledger()
    succeeded_job(ledger, tmp_path, "job-a1")
    succeeded_job(ledger, tmp_path, "job-a2")
    result = runner.invoke(main, ["report", "zzz"])
    assert result.exit_code == 1 and "no job or queue 'zzz'" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["report", "job-a"])
    assert result.exit_code == 1 and "'job-a' matches 2 jobs: job-a1, job-a2" in result.output
