"""A job's report sets its estimate beside the error of its cost, and beside what it measured once the job
recorded its run: the bandwidth and the step time with its error."""

from __future__ import annotations

from pathlib import Path

from rentrain.ledger import Ledger
from rentrain.report import write_job_report
from tests.jobs.test_costs_command import _measured
from tests.report.builders import succeeded_job
from tests.report.test_job_report import money_row


def test_a_recorded_run_adds_the_errors_and_the_step_time_to_the_money_table(tmp_path: Path) -> None:
    ledger = Ledger()
    succeeded_job(ledger, tmp_path)
    before = write_job_report(ledger, "job-a1").read_text(encoding="utf-8")
    assert money_row(before, "error of the cost (billed + bandwidth)") == ["", "-5%"]  # $2.05 against $2.16
    assert "time per step" not in before and "bandwidth (" not in before  # nothing measured yet
    ledger.record_run(_measured("job-a1"))  # $0.01 bandwidth, 99 s a step
    text = write_job_report(ledger, "job-a1").read_text(encoding="utf-8")
    assert money_row(text, "money") == ["$2.160", "$2.050"]  # estimate, billed
    assert money_row(text, "bandwidth (bytes moved x the offer's $/GB)") == ["-", "$0.0100"]
    assert money_row(text, "error of the cost (billed + bandwidth)") == ["", "-5%"]  # $2.06 against $2.16
    assert money_row(text, "time per step (measured: the median after warm-up)") == ["90 s", "99 s"]
    assert money_row(text, "error of the step time") == ["", "+10%"]
