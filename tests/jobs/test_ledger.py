"""The ledger: transitions are recorded in order, costs add up per instance, nothing secret is stored."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from rentrain.ledger import InstanceRecord, JobRecord, Ledger


def _job(job_id: str = "j1") -> JobRecord:
    return JobRecord(
        id=job_id,
        created_at=time.time(),
        config_path="/c.toml",
        provider="vast",
        label=f"rentrain-{job_id}",
        state="planned",
        output_dir="/out",
    )


def test_transitions_are_recorded_before_use_and_survive_a_new_process(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job())
    ledger.transition("j1", "intent_recorded", "offer 7 at $0.40/h")
    job = ledger.transition("j1", "creating", total_steps=200)
    assert job.state == "creating" and job.total_steps == 200 and job.is_open
    reopened = Ledger(tmp_path / "l.sqlite3")
    assert [t.to_state for t in reopened.transitions("j1")] == ["planned", "intent_recorded", "creating"]
    assert reopened.transitions("j1")[1].detail == "offer 7 at $0.40/h"
    assert [j.id for j in reopened.jobs(open_only=True)] == ["j1"]
    reopened.transition("j1", "closed", outcome="succeeded")
    assert reopened.jobs(open_only=True) == []


def test_unknown_fields_are_refused(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job())
    with pytest.raises(ValueError):
        ledger.transition("j1", "creating", api_key="secret")
    with pytest.raises(ValueError):
        ledger.update_job("j1", state="closed")
    with pytest.raises(KeyError):
        ledger.transition("nope", "creating")


def test_cost_sums_billed_time_of_every_instance(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job())
    ledger.add_instance(
        InstanceRecord(job_id="j1", provider="vast", instance_id="1", offer_id="o1", gpu="RTX 4090", usd_per_hour=0.36, created_at=1000.0)
    )
    ledger.update_instance("j1", "o1", 1000.0, ended_at=1000.0 + 1800)
    ledger.add_instance(
        InstanceRecord(job_id="j1", provider="vast", instance_id="2", offer_id="o2", gpu="RTX 3090", usd_per_hour=0.20, created_at=5000.0)
    )
    # half an hour at 0.36 plus one hour (still running at `now`) at 0.20
    assert ledger.job_cost("j1", now=5000.0 + 3600) == pytest.approx(0.18 + 0.20)
    assert [i.instance_id for i in ledger.instances(live_only=True)] == ["2"]


def test_an_instance_that_was_never_created_costs_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job())
    ledger.add_instance(InstanceRecord(job_id="j1", provider="vast", offer_id="o1", gpu="A", usd_per_hour=1.0, created_at=0.0))
    assert ledger.job_cost("j1", now=3600.0) == 0.0


def test_failed_hosts_and_prefix_lookup(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job("abc123"))
    ledger.create_job(_job("abd456"))
    assert ledger.find_job("abc").id == "abc123"
    with pytest.raises(KeyError, match="matches 2 jobs"):
        ledger.find_job("ab")
    ledger.record_failed_host("vast", "host-9", "ssh never came up")
    ledger.record_failed_host("vast", "host-9", "again")
    assert ledger.failed_hosts("vast") == {"host-9"}
    assert ledger.failed_hosts("runpod") == set()


def test_ledger_file_is_plain_sqlite_without_secrets(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job())
    columns = {row[1] for table in ("jobs", "instances") for row in sqlite3.connect(tmp_path / "l.sqlite3").execute(f"PRAGMA table_info({table})")}
    assert not any("key" in c and c != "host_key" for c in columns)


def test_the_client_meter_stops_a_job_at_its_budget(tmp_path: Path) -> None:
    """The in-flight budget guard: the ledger's running cost reaching --max-cost ends the job."""
    from rentrain.job import budget_reached

    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job())
    started = time.time() - 1800  # half an hour ago, at $1/h: $0.50 so far
    ledger.add_instance(InstanceRecord(job_id="j1", provider="vast", instance_id="9", offer_id="o", gpu="A", usd_per_hour=1.0, created_at=started))
    assert budget_reached(ledger, "j1", None) is None
    assert budget_reached(ledger, "j1", 0.60) is None
    assert budget_reached(ledger, "j1", 0.45) == "budget reached: $0.50 of $0.45"


def test_an_interrupt_after_the_commit_stays_an_interrupt(tmp_path: Path) -> None:
    """Ctrl-C can land inside COMMIT once it is done: the KeyboardInterrupt must reach the CLI's handler,
    not a 'cannot rollback' error."""
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job())
    with pytest.raises(KeyboardInterrupt):
        with ledger._connect() as db:
            db.execute("UPDATE jobs SET last_step = 7 WHERE id = 'j1'")
            db.execute("COMMIT")
            raise KeyboardInterrupt
    assert ledger.job("j1").last_step == 7
    with pytest.raises(RuntimeError):
        with ledger._connect() as db:
            db.execute("UPDATE jobs SET last_step = 9 WHERE id = 'j1'")
            raise RuntimeError("rolled back")
    assert ledger.job("j1").last_step == 7
