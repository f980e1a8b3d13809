"""The ledger: transitions are recorded in order, costs add up per instance, nothing secret is stored."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rentrain import ledger as ledger_module
from rentrain.ledger import (
    LOCK_STALE_SECONDS,
    SCHEMA,
    ClientLock,
    InstanceRecord,
    JobRecord,
    Ledger,
    LockHeld,
    this_host,
)


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
        InstanceRecord(
            job_id="j1",
            provider="vast",
            instance_id="1",
            offer_id="o1",
            gpu="RTX 4090",
            usd_per_hour=0.36,
            created_at=1000.0,
        )
    )
    ledger.update_instance("j1", "o1", 1000.0, ended_at=1000.0 + 1800)
    ledger.add_instance(
        InstanceRecord(
            job_id="j1",
            provider="vast",
            instance_id="2",
            offer_id="o2",
            gpu="RTX 3090",
            usd_per_hour=0.20,
            created_at=5000.0,
        )
    )
    # half an hour at 0.36 plus one hour (still running at `now`) at 0.20
    assert ledger.job_cost("j1", now=5000.0 + 3600) == pytest.approx(0.18 + 0.20)
    assert [i.instance_id for i in ledger.instances(live_only=True)] == ["2"]


def test_an_instance_that_was_never_created_costs_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job())
    ledger.add_instance(
        InstanceRecord(job_id="j1", provider="vast", offer_id="o1", gpu="A", usd_per_hour=1.0, created_at=0.0)
    )
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
    db = sqlite3.connect(tmp_path / "l.sqlite3")
    columns = [row for table in ("jobs", "instances") for row in db.execute(f"PRAGMA table_info({table})")]
    text_columns = {row[1] for row in columns if row[2] == "TEXT"}
    assert not any("key" in c and c != "host_key" for c in text_columns)  # *key*_at columns are times


def test_the_client_meter_stops_a_job_at_its_budget(tmp_path: Path) -> None:
    """The in-flight budget guard: the ledger's running cost reaching --max-cost ends the job."""
    from rentrain.job import budget_reached

    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job())
    started = time.time() - 1800  # half an hour ago, at $1/h: $0.50 so far
    ledger.add_instance(
        InstanceRecord(
            job_id="j1", provider="vast", instance_id="9", offer_id="o", gpu="A", usd_per_hour=1.0, created_at=started
        )
    )
    assert budget_reached(ledger, "j1", None) is None
    assert budget_reached(ledger, "j1", 0.60) is None
    assert budget_reached(ledger, "j1", 0.45) == "budget reached: $0.50 of $0.45"


def test_an_interrupt_after_the_commit_stays_an_interrupt(tmp_path: Path) -> None:
    """Ctrl-C can land inside COMMIT once it is done: the KeyboardInterrupt must reach the CLI's handler,
    not a 'cannot rollback' error."""
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job())
    with pytest.raises(KeyboardInterrupt), ledger._connect() as db:
        db.execute("UPDATE jobs SET last_step = 7 WHERE id = 'j1'")
        db.execute("COMMIT")
        raise KeyboardInterrupt
    assert ledger.job("j1").last_step == 7
    with pytest.raises(RuntimeError), ledger._connect() as db:
        db.execute("UPDATE jobs SET last_step = 9 WHERE id = 'j1'")
        raise RuntimeError("rolled back")
    assert ledger.job("j1").last_step == 7


# ---------------------------------------------------------------------------------------------- the client lock


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_one_client_at_a_time_and_the_refusal_names_the_holder(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job())
    here, other = this_host(), os.getppid()  # a live process that is not this one
    ledger.take_client_lock("j1", other, here)
    with pytest.raises(LockHeld, match=f"PID {other} on {here}"):
        ledger.take_client_lock("j1", os.getpid(), here)
    assert ledger.job("j1").client_pid == other
    ledger.take_client_lock("j1", other, here)  # the holder itself may take it again
    ledger.release_client_lock("j1", os.getpid(), here)  # not the holder: nothing happens
    assert ledger.job("j1").client_pid == other
    ledger.release_client_lock("j1", other, here)
    assert ledger.job("j1").client_pid is None
    ledger.take_client_lock("j1", os.getpid(), here)


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job())
    ledger.take_client_lock("j1", _dead_pid(), this_host())  # killed with -9: it never released
    ledger.take_client_lock("j1", os.getpid(), this_host())
    assert ledger.job("j1").client_pid == os.getpid()


def test_a_holder_on_another_host_is_judged_by_its_beat(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job())
    now = time.time()
    ledger.take_client_lock("j1", 4242, "laptop", now=now)
    with pytest.raises(LockHeld, match="PID 4242 on laptop"):
        ledger.take_client_lock("j1", 77, "desktop", now=now + LOCK_STALE_SECONDS - 1)
    assert ledger.beat_client_lock("j1", 4242, "laptop", now=now + LOCK_STALE_SECONDS - 1)
    with pytest.raises(LockHeld):
        ledger.take_client_lock("j1", 77, "desktop", now=now + 2 * LOCK_STALE_SECONDS - 2)
    ledger.take_client_lock("j1", 77, "desktop", now=now + 3 * LOCK_STALE_SECONDS)  # the laptop went silent
    assert not ledger.beat_client_lock("j1", 4242, "laptop")  # and learns it lost the job when it wakes up
    assert (ledger.job("j1").client_pid, ledger.job("j1").client_host) == (77, "desktop")


def test_of_clients_racing_for_a_job_exactly_one_wins(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job())
    start = threading.Barrier(8)
    winners: list[str] = []

    def contend(host: str) -> None:
        start.wait()
        try:
            Ledger(tmp_path / "l.sqlite3").take_client_lock("j1", 1000, host)
            winners.append(host)
        except LockHeld:
            pass

    threads = [threading.Thread(target=contend, args=(f"host-{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1 and ledger.job("j1").client_host == winners[0]


def test_the_client_lock_beats_and_tells_its_holder_when_it_was_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "LOCK_BEAT_SECONDS", 0.02)
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job())
    lost = threading.Event()
    taken_by: list[str] = []

    def on_lost(winner: JobRecord) -> None:
        taken_by.append(winner.client)
        lost.set()

    with ClientLock(ledger, "j1", on_lost=on_lost):
        first_beat = ledger.job("j1").client_beat_at
        assert first_beat is not None
        # another host, after this one looked silent for too long
        ledger.take_client_lock("j1", 9, "elsewhere", now=first_beat + LOCK_STALE_SECONDS + 1)
        assert lost.wait(10)
    assert taken_by == ["PID 9 on elsewhere"]
    assert ledger.job("j1").client_host == "elsewhere"  # leaving did not release the winner's claim


def test_every_job_that_asked_for_an_instance_may_have_left_its_key(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    added = ",\n    client_host TEXT,\n    client_beat_at REAL,\n    key_registered_at REAL,\n    key_removed_at REAL"
    old_schema = SCHEMA.replace(added, "")
    assert old_schema != SCHEMA
    with sqlite3.connect(path) as db:  # a ledger written before keys were recorded
        db.executescript(old_schema)
        db.execute(
            "INSERT INTO jobs (id, created_at, config_path, provider, label, state, output_dir) "
            "VALUES ('pod', 1, '/c', 'runpod', 'rentrain-pod', 'closed', '/o'), "
            "('box', 1, '/c', 'ssh', 'rentrain-box', 'closed', '/o')"
        )
        db.execute(
            "INSERT INTO instances (job_id, provider, offer_id, gpu, usd_per_hour, created_at) "
            "VALUES ('pod', 'runpod', 'o', 'A', 1, 5), ('box', 'ssh', 'o', 'A', 0, 5)"
        )
    ledger = Ledger(path)
    assert ledger.job("pod").key_may_be_on_account and ledger.job("pod").key_registered_at == 5
    assert not ledger.job("box").key_may_be_on_account
    ledger.record_key_removed("pod")
    assert not ledger.job("pod").key_may_be_on_account
    again = InstanceRecord(job_id="pod", provider="runpod", offer_id="o2", gpu="A", usd_per_hour=1.0, created_at=9.0)
    ledger.add_instance(again)
    assert ledger.job("pod").key_may_be_on_account  # a new create registers it again
