"""A queue's report.html: a row per job with its outcome and reason, the last grid of each, the totals."""

from __future__ import annotations

import re
from pathlib import Path

from rentrain.job_phases.context import clock_time
from rentrain.ledger import Ledger
from rentrain.report import write_queue_report
from tests.report.builders import HOSTILE_ERROR, T0, night_queue
from tests.report.test_job_report import embedded_images


def job_rows(text: str) -> list[list[str]]:
    jobs_table = re.search(r"<h2>Jobs</h2>\n<table>\n(.*?)</table>", text, re.S)
    assert jobs_table
    rows = re.findall(r"<tr>(.*?)</tr>", jobs_table.group(1))[1:]
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]


def test_one_row_per_job_with_its_outcome_reason_cost_and_report(tmp_path: Path) -> None:
    ledger = Ledger()
    night = night_queue(ledger, tmp_path)
    path = write_queue_report(ledger, night.queue.id)
    assert path == Path(night.queue.report_path)
    text = path.read_text(encoding="utf-8")
    first, second, third = job_rows(text)
    assert first[0] == "1" and first[1].endswith("job-q1/config.toml</code>")
    assert first[2:4] + first[5:7] == ["<b>succeeded</b>", "$2.050", "$2.160, 36 min 00 s", "34 min 30 s"]
    assert second[2] == "<b>failed</b><br>trainer died: &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;"
    assert third[2:4] + third[5:7] == [
        "<b>skipped</b><br>skipped: budget ($5.00) would be crossed",
        "$0.000",
        "$2.160, 36 min 00 s",
        "-",
    ]
    billed = [float(row[3].lstrip("$")) for row in (first, second, third)]
    shares = [float(row[4].lstrip("$")) for row in (first, second, third)]
    assert abs(sum(shares) - sum(billed)) < 0.002 and shares[2] == 0.0, "shares add up to what was billed"
    assert HOSTILE_ERROR not in text
    for row, job_id in zip((first, second, third), ("job-q1", "job-q2", "job-q3"), strict=True):
        link = re.fullmatch(rf'<a href="([^"]+)">{job_id}</a>', row[7])
        assert link and link.group(1) == f"../{job_id}/report.html"
        assert (path.parent / link.group(1)).is_file()  # each job's own report, written first


def test_each_jobs_last_grid_is_embedded(tmp_path: Path) -> None:
    ledger = Ledger()
    night = night_queue(ledger, tmp_path)
    text = write_queue_report(ledger, night.queue.id).read_text(encoding="utf-8")
    assert [data for _, data in embedded_images(text)] == [night.first.grids[-1], night.second.grids[-1]]
    assert "job-q1" in text.split("<h2>Last samples</h2>")[1]
    assert '<a href="../job-q1/samples/sample-e2-s20.png">full size</a>' in text


def test_totals_set_the_billed_money_against_the_budget_and_the_end_against_the_deadline(tmp_path: Path) -> None:
    ledger = Ledger()
    night = night_queue(ledger, tmp_path)
    text = write_queue_report(ledger, night.queue.id).read_text(encoding="utf-8")
    totals = text.split("<h2>Totals</h2>")[1]
    assert "billed $4.100 (estimated $6.480)</td><td>budget $5.000" in totals
    assert f"ended {clock_time(T0 + 6000)}</td><td>deadline {clock_time(T0 + 8 * 3600)}" in totals
