"""A queue's cost shares: the rental's setup moves from its first job to all the jobs that used it."""

from __future__ import annotations

from pathlib import Path

import pytest

from rentrain.ledger import InstanceRecord, JobRecord, Ledger, QueueRecord
from rentrain.queue_costs import cost_shares

T0 = 1_800_000_000.0
PRICE = 3.6  # USD/h: $0.001 a second


def _job(job_id: str) -> JobRecord:
    return JobRecord(
        id=job_id,
        created_at=T0,
        config_path=f"/{job_id}.toml",
        provider="vast",
        label=f"rentrain-{job_id}",
        state="planned",
        output_dir=f"/out/{job_id}",
    )


def _record(job_id: str, start: float, end: float, instance: str = "i1") -> InstanceRecord:
    return InstanceRecord(
        job_id=job_id,
        provider="vast",
        instance_id=instance,
        offer_id="o1",
        gpu="1x RTX 4090",
        usd_per_hour=PRICE,
        created_at=start,
        ended_at=end,
    )


def _train(ledger: Ledger, job_id: str, started_at: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Walk the job to "training" at `started_at` (the ledger stamps each move with time.time())."""
    for state in ("intent_recorded", "syncing", "watchdog", "bootstrapping", "training"):
        at = started_at if state == "training" else started_at - 1
        monkeypatch.setattr("rentrain.ledger.time.time", lambda at=at: at)
        ledger.transition(job_id, state)
    monkeypatch.undo()


def test_the_rentals_setup_is_split_equally_and_the_shares_add_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    queue = QueueRecord(id="q-1", created_at=T0, provider="vast", report_path=str(tmp_path / "report.html"))
    ledger.create_queue(queue, [_job("a"), _job("b"), _job("c")])
    # a: created at T0, trains from T0+300 (a 300 s setup), hands over at T0+600; b: T0+600..T0+900; c never ran
    ledger.add_instance(_record("a", T0, T0 + 600))
    ledger.add_instance(_record("b", T0 + 600, T0 + 900))
    _train(ledger, "a", T0 + 300, monkeypatch)
    _train(ledger, "b", T0 + 610, monkeypatch)
    shares = cost_shares(ledger, "q-1")
    assert shares["a"] == pytest.approx((600 - 300 + 150) * 0.001)
    assert shares["b"] == pytest.approx((300 + 150) * 0.001)
    assert shares["c"] == 0.0
    assert sum(shares.values()) == pytest.approx(ledger.queue_cost("q-1"))


def test_jobs_on_separate_rentals_each_keep_their_own_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    queue = QueueRecord(id="q-2", created_at=T0, provider="vast", report_path=str(tmp_path / "report.html"))
    ledger.create_queue(queue, [_job("a"), _job("b")])
    ledger.add_instance(_record("a", T0, T0 + 600, instance="i1"))
    ledger.add_instance(_record("b", T0, T0 + 400, instance="i2"))
    _train(ledger, "a", T0 + 300, monkeypatch)
    _train(ledger, "b", T0 + 100, monkeypatch)
    assert cost_shares(ledger, "q-2") == {"a": pytest.approx(0.6), "b": pytest.approx(0.4)}
