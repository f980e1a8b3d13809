"""The job ledger: SQLite under ~/.local/state/rentrain. Every state change is written here before it
is acted on, so `status`, `attach`, `fetch` and `down` work after the client was killed.

No secret is ever stored here: API keys stay in the credentials file or the environment.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field

from rentrain.paths import state_dir

JobState = Literal[
    "planned",
    "intent_recorded",
    "creating",
    "waiting_ssh",
    "syncing",
    "watchdog",
    "bootstrapping",
    "training",
    "following",
    "fetching",
    "destroying",
    "closed",
]
# Between recording the intent to rent and closing: an instance may exist.
OPEN_STATES: tuple[JobState, ...] = tuple(s for s in get_args(JobState) if s not in ("planned", "closed"))


def _moves(*states: JobState) -> frozenset[JobState]:
    return frozenset(states)


# The moves a job may make, from each state. Every open state may go to "destroying" (a failure, Ctrl-C, the
# sweep settling a stopped instance) and to "closed" (`rentrain down`, once no instance of the job is left).
# Attach re-runs the setup from its start ("syncing") in any state before "training". Anything else is a bug:
# Ledger.transition raises IllegalTransition.
ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # recorded, nothing asked of a provider yet; closed when no offer is left to try (or Ctrl-C)
    "planned": _moves("intent_recorded", "closed"),
    # an instance record exists, before the create is sent (--provider ssh: before connecting)
    "intent_recorded": _moves("creating", "waiting_ssh", "syncing", "destroying", "closed"),
    # the create is sent; a refused or failed one goes on to the next offer
    "creating": _moves("waiting_ssh", "intent_recorded", "syncing", "destroying", "closed"),
    # the instance exists; waiting until it answers SSH
    "waiting_ssh": _moves("syncing", "destroying", "closed"),
    # the job folder and the trainer's code go up
    "syncing": _moves("watchdog", "syncing", "destroying", "closed"),
    # the watchdog starts on the instance: from here a client that dies leaves the instance to it
    "watchdog": _moves("bootstrapping", "syncing", "destroying", "closed"),
    # packages and the base model on the instance, while the job's files upload
    "bootstrapping": _moves("training", "syncing", "destroying", "closed"),
    # set up; the trainer is being started
    "training": _moves("following", "destroying", "closed"),
    # the client tails the trainer's events and fetches checkpoints (again on attach)
    "following": _moves("fetching", "following", "destroying", "closed"),
    # the result (or, at the budget, what there is) comes home; attach re-reads the events first
    "fetching": _moves("following", "destroying", "closed"),
    # the instance is being destroyed; after a lost host the next offer is taken ("intent_recorded")
    "destroying": _moves("intent_recorded", "destroying", "closed"),
    # over, with an outcome; never reopened
    "closed": _moves(),
}
# "skipped": a queued job that never started (the queue's budget or deadline would not cover it, or it ended)
Outcome = Literal["succeeded", "failed", "cancelled", "skipped"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    config_path TEXT NOT NULL,
    provider TEXT NOT NULL,
    label TEXT NOT NULL,
    state TEXT NOT NULL,
    outcome TEXT,
    output_dir TEXT NOT NULL,
    remote_dir TEXT,
    total_steps INTEGER,
    last_step INTEGER NOT NULL DEFAULT 0,
    events_offset INTEGER NOT NULL DEFAULT 0,
    result_path TEXT,
    result_sha256 TEXT,
    last_state_path TEXT,
    error TEXT,
    client_pid INTEGER,
    client_seen_at REAL,
    settings_json TEXT NOT NULL DEFAULT '{}',
    client_host TEXT,
    client_beat_at REAL,
    key_registered_at REAL,
    key_removed_at REAL,
    queue_id TEXT,
    queue_position INTEGER,
    estimate_json TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS queues (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    provider TEXT NOT NULL,
    max_cost REAL,
    deadline REAL,
    parallel INTEGER NOT NULL DEFAULT 1,
    report_path TEXT NOT NULL,
    lanes_json TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS transitions (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS instances (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    provider TEXT NOT NULL,
    instance_id TEXT,
    offer_id TEXT NOT NULL,
    host_id TEXT,
    gpu TEXT NOT NULL,
    gpu_count INTEGER NOT NULL DEFAULT 1,
    usd_per_hour REAL NOT NULL,
    ssh_host TEXT,
    ssh_port INTEGER,
    ssh_user TEXT,
    host_key TEXT,
    created_at REAL NOT NULL,
    running_at REAL,
    ended_at REAL,
    end_reason TEXT,
    PRIMARY KEY (job_id, offer_id, created_at)
);
CREATE TABLE IF NOT EXISTS failed_hosts (
    provider TEXT NOT NULL,
    host_id TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS account_checks (
    provider TEXT PRIMARY KEY,
    checked_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS billing_periods (
    job_id TEXT NOT NULL,
    offer_id TEXT NOT NULL,
    record_created_at REAL NOT NULL,
    state TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    usd_per_hour REAL NOT NULL,
    source TEXT NOT NULL,
    seen_at REAL NOT NULL,
    FOREIGN KEY (job_id, offer_id, record_created_at) REFERENCES instances(job_id, offer_id, created_at)
);
CREATE TABLE IF NOT EXISTS job_runs (
    job_id TEXT PRIMARY KEY REFERENCES jobs(id),
    provider TEXT NOT NULL,
    gpu_model TEXT NOT NULL,
    gpu_count INTEGER NOT NULL,
    family TEXT NOT NULL,
    settings_key TEXT NOT NULL,
    seconds_per_step REAL,
    steps_measured INTEGER NOT NULL,
    phases_json TEXT NOT NULL,
    bytes_up INTEGER NOT NULL,
    model_download_bytes INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    bandwidth_usd REAL NOT NULL,
    recorded_at REAL NOT NULL,
    images INTEGER NOT NULL DEFAULT 0,
    sample_images INTEGER NOT NULL DEFAULT 0
);
"""
# Columns added after a table's first release: a ledger written by an older rentrain gets them on open.
ADDED_COLUMNS: dict[str, dict[str, str]] = {
    "instances": {"gpu_count": "INTEGER NOT NULL DEFAULT 1"},
    "jobs": {
        "client_host": "TEXT",
        "client_beat_at": "REAL",
        "key_registered_at": "REAL",
        "key_removed_at": "REAL",
        "queue_id": "TEXT",
        "queue_position": "INTEGER",
        "estimate_json": "TEXT NOT NULL DEFAULT '{}'",
    },
}
# Run once when the column is added: an older rentrain recorded no key registration, so every job that
# asked a provider for an instance may have left its key on the account.
BACKFILLS: dict[str, str] = {
    "key_registered_at": (
        "UPDATE jobs SET key_registered_at = "
        "(SELECT MIN(created_at) FROM instances WHERE instances.job_id = jobs.id AND provider != 'ssh')"
    ),
}

# The client lock: one rentrain client follows a job at a time. Its holder refreshes `client_beat_at`
# every LOCK_BEAT_SECONDS; a claim whose beat is older than LOCK_STALE_SECONDS (eight missed beats: a
# crashed, frozen or sleeping client), or whose PID is gone on this host, may be taken over.
LOCK_BEAT_SECONDS = 15.0
LOCK_STALE_SECONDS = 120.0


class JobRecord(BaseModel):
    id: str
    created_at: float
    config_path: str
    provider: str
    label: str
    state: JobState
    outcome: Outcome | None = None
    output_dir: str
    remote_dir: str | None = None
    total_steps: int | None = None
    last_step: int = 0
    events_offset: int = 0
    result_path: str | None = None
    result_sha256: str | None = None
    last_state_path: str | None = None  # the newest resumable training state fetched home
    error: str | None = None
    client_pid: int | None = None  # the client that follows the job (the lock); None: no client
    client_seen_at: float | None = None  # the instance's last heartbeat from a client
    settings_json: str = "{}"
    client_host: str | None = None
    client_beat_at: float | None = None  # the lock holder's last beat
    key_registered_at: float | None = None  # the job's SSH key was last handed to the provider
    key_removed_at: float | None = None  # ... and taken off its account (None: it may still be there)
    queue_id: str | None = None  # one of a queue's jobs (rentrain run A.toml B.toml ...)
    queue_position: int | None = None  # its place in the queue's order, from 0
    estimate_json: str = "{}"  # the JobEstimate (rentrain.costs) of the offer it was planned on, when there was one

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES

    @property
    def key_may_be_on_account(self) -> bool:
        return self.key_registered_at is not None and self.key_removed_at is None

    @property
    def client(self) -> str:
        """The lock holder, as messages name it."""
        return f"PID {self.client_pid} on {self.client_host or this_host()}"


class QueueRecord(BaseModel):
    """Several jobs run under one budget and one deadline, back to back on shared rentals."""

    id: str
    created_at: float
    provider: str
    max_cost: float | None = None  # USD, for all the queue's jobs together
    deadline: float | None = None  # unix time by which every job has ended
    parallel: int = 1  # rentals at most at one time
    report_path: str  # the queue's report.html
    lanes_json: str = "[]"  # the job ids of each rental's share of the queue, in the order it works through them

    @property
    def lanes(self) -> list[list[str]]:
        lanes: list[list[str]] = json.loads(self.lanes_json)
        return lanes


BillingState = Literal["running", "stopped"]


class BillingPeriod(BaseModel):
    """A stretch of one instance record's billing at one rate. "running": the instance's price, in every state
    but stopped (the provider bills the machine from when it made it until it is stopped or destroyed);
    "stopped": what its storage bills. `source` says where `started_at` came from; `seen_at` is the last time
    rentrain saw the instance in this state: a change that nobody saw is placed there."""

    state: BillingState
    started_at: float
    ended_at: float | None = None  # None: still going
    usd_per_hour: float
    source: str
    seen_at: float

    def cost(self, until: float) -> float:
        """USD billed in this period; an open one counts until `until`."""
        end = self.ended_at if self.ended_at is not None else until
        return max(0.0, end - self.started_at) * self.usd_per_hour / 3600


class InstanceRecord(BaseModel):
    job_id: str
    provider: str
    instance_id: str | None = None
    offer_id: str
    host_id: str | None = None
    gpu: str
    gpu_count: int = 1  # data-parallel trainer processes on this instance: a relaunch there uses as many
    usd_per_hour: float  # the whole instance, all its GPUs
    ssh_host: str | None = None
    ssh_port: int | None = None
    ssh_user: str | None = None
    host_key: str | None = None
    created_at: float  # set just before the create was sent (a queue's later job: when it took the instance over)
    running_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    # what the provider billed for the instance while this record held it, in order (Ledger.instances fills it)
    periods: list[BillingPeriod] = Field(default_factory=list, exclude=True)

    def cost(self, now: float | None = None) -> float:
        """USD billed: the sum of the billing periods, an open one until the record's end (or `now`). A create that
        made no instance costs nothing. A record written before billing periods existed counts its whole span,
        from before the create to its end, at the full price."""
        if not self.instance_id:
            return 0.0
        until = self.ended_at if self.ended_at is not None else (time.time() if now is None else now)
        if not self.periods:
            return self.usd_per_hour * max(0.0, until - self.created_at) / 3600
        return sum(period.cost(until) for period in self.periods)


def this_host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def client_alive(job: JobRecord, now: float | None = None) -> bool:
    """Whether a rentrain client still follows the job: its lock is held and not stale. A holder on this
    host must also be a live PID; one on another host is judged by its beat alone. A ledger written by an
    older rentrain has neither host nor beat: the holder is on this host, judged by its PID."""
    if job.client_pid is None:
        return False
    now = time.time() if now is None else now
    if job.client_beat_at is not None and now - job.client_beat_at > LOCK_STALE_SECONDS:
        return False
    if job.client_host in (None, this_host()):
        return pid_alive(job.client_pid)
    return job.client_beat_at is not None


class LockHeld(Exception):
    """Another live rentrain client follows the job."""

    def __init__(self, job: JobRecord, now: float | None = None):
        self.job = job
        seen = ""
        if job.client_beat_at is not None:
            seen = f", seen {max(0.0, (time.time() if now is None else now) - job.client_beat_at):.0f} s ago"
        super().__init__(
            f"job {job.id} is followed by another rentrain client ({job.client}{seen}); "
            f"stop that one first (Ctrl-C, then detach), or wait {LOCK_STALE_SECONDS:.0f} s after it died"
        )


class IllegalTransition(Exception):
    """A move that ALLOWED_TRANSITIONS does not list: a bug in the caller, not a user error."""

    def __init__(self, job_id: str, from_state: str, to_state: str):
        self.job_id = job_id
        self.from_state = from_state
        self.to_state = to_state
        super().__init__(f"job {job_id}: no move from {from_state!r} to {to_state!r}")


class Transition(BaseModel):
    job_id: str
    at: float
    from_state: str | None
    to_state: str
    detail: str


class JobRun(BaseModel):
    """What one job that trained measured, for the estimates of later jobs (rentrain.history) and `rentrain
    costs`. Written when the job closes (rentrain.job_phases.meter)."""

    job_id: str
    provider: str
    gpu_model: str  # normalised, as offers name it ("RTX 4090")
    gpu_count: int
    family: str  # the model family (remote.trainer.families), "-tiny" for a builtin tiny model (JobProfile)
    settings_key: str  # the settings that change the step time (rentrain.history.settings_key)
    seconds_per_step: float | None  # the median after warm-up (rentrain.history.median_after_warm_up); None: too few
    steps_measured: int
    phases: dict[str, float]  # seconds of each phase this client saw (rentrain.job_phases.meter names them)
    bytes_up: int  # the dataset, a local model, a resume state: sent to the instance
    model_download_bytes: int  # the base model the instance downloaded itself
    bytes_down: int  # checkpoints, samples, states and the result fetched home
    cost_usd: float  # Ledger.job_cost when the job closed: the provider's rate x its own billed times
    bandwidth_usd: float  # the bytes at the offer's $/GB (0 where the provider bills none or did not say)
    recorded_at: float
    images: int = 0  # the dataset's images (regularisation included): what the caches' seconds scale with
    sample_images: int = 0  # images in all its sample grids: what the samples' seconds scale with


def default_ledger_path() -> Path:
    return state_dir() / "ledger.sqlite3"


class Ledger:
    def __init__(self, path: Path | None = None):
        self.path = path or default_ledger_path()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
        finally:
            db.close()
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        with self._connect() as db:  # one writer at a time: two clients opening an old ledger add each column once
            for table, columns in ADDED_COLUMNS.items():
                present = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
                for name, declaration in columns.items():
                    if name not in present:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
                        if name in BACKFILLS:
                            db.execute(BACKFILLS[name])

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            # a Ctrl-C can land inside COMMIT after it finished: nothing is left to roll back then, and a
            # failing ROLLBACK must not hide the KeyboardInterrupt
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def create_job(self, job: JobRecord, detail: str = "job created") -> None:
        with self._connect() as db:
            _insert_job(db, job, detail)

    def transition(self, job_id: str, to_state: JobState, detail: str = "", **fields: Any) -> JobRecord:
        """Record the move to `to_state` (and any field updates) in one transaction; returns the new record.
        IllegalTransition when ALLOWED_TRANSITIONS has no such move from the job's current state."""
        unknown = set(fields) - set(JobRecord.model_fields)
        if unknown:
            raise ValueError(f"unknown job fields: {sorted(unknown)}")
        with self._connect() as db:
            current = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if current is None:
                raise KeyError(job_id)
            if to_state not in ALLOWED_TRANSITIONS.get(current["state"], frozenset()):
                raise IllegalTransition(job_id, current["state"], to_state)
            updates = {"state": to_state, **fields}
            db.execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in updates)} WHERE id = ?",
                (*updates.values(), job_id),
            )
            db.execute(
                "INSERT INTO transitions VALUES (?, ?, ?, ?, ?)",
                (job_id, time.time(), current["state"], to_state, detail),
            )
        return self.job(job_id)

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Progress fields that are not state changes (last step, events offset, heartbeat)."""
        unknown = set(fields) - set(JobRecord.model_fields)
        if unknown or "state" in fields:
            raise ValueError(f"not updatable here: {sorted(unknown | ({'state'} & set(fields)))}")
        with self._connect() as db:
            db.execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?", (*fields.values(), job_id)
            )

    def job(self, job_id: str) -> JobRecord:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return JobRecord(**dict(row))

    def find_job(self, prefix: str) -> JobRecord:
        """A job by its id or a unique prefix of it."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE id LIKE ? ORDER BY created_at", (prefix + "%",)).fetchall()
        if not rows:
            raise KeyError(f"no job {prefix!r}")
        if len(rows) > 1:
            raise KeyError(f"{prefix!r} matches {len(rows)} jobs: {', '.join(r['id'] for r in rows)}")
        return JobRecord(**dict(rows[0]))

    def jobs(self, open_only: bool = False) -> list[JobRecord]:
        query = "SELECT * FROM jobs"
        if open_only:
            query += f" WHERE state IN ({', '.join('?' for _ in OPEN_STATES)})"
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY created_at", OPEN_STATES if open_only else ()).fetchall()
        return [JobRecord(**dict(r)) for r in rows]

    def create_queue(self, queue: QueueRecord, jobs: list[JobRecord]) -> None:
        """The queue and all its jobs (in their queue order), in one transaction."""
        row = queue.model_dump()
        with self._connect() as db:
            db.execute(
                f"INSERT INTO queues ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})", tuple(row.values())
            )
            for position, job in enumerate(jobs):
                queued = job.model_copy(update={"queue_id": queue.id, "queue_position": position})
                _insert_job(db, queued, "job created")

    def queue(self, queue_id: str) -> QueueRecord:
        with self._connect() as db:
            row = db.execute("SELECT * FROM queues WHERE id = ?", (queue_id,)).fetchone()
        if row is None:
            raise KeyError(queue_id)
        return QueueRecord(**dict(row))

    def queues(self) -> list[QueueRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM queues ORDER BY created_at").fetchall()
        return [QueueRecord(**dict(r)) for r in rows]

    def find_queue(self, prefix: str) -> QueueRecord | None:
        """A queue by its id or a unique prefix of it; None when no queue matches."""
        matches = [q for q in self.queues() if q.id.startswith(prefix)]
        if len(matches) > 1:
            raise KeyError(f"{prefix!r} matches {len(matches)} queues: {', '.join(q.id for q in matches)}")
        return matches[0] if matches else None

    def queue_jobs(self, queue_id: str) -> list[JobRecord]:
        """The queue's jobs in queue order."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE queue_id = ? ORDER BY queue_position", (queue_id,)).fetchall()
        return [JobRecord(**dict(r)) for r in rows]

    def queue_cost(self, queue_id: str, now: float | None = None) -> float:
        return sum(self.job_cost(job.id, now) for job in self.queue_jobs(queue_id))

    def transitions(self, job_id: str) -> list[Transition]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM transitions WHERE job_id = ? ORDER BY rowid", (job_id,)).fetchall()
        return [Transition(**dict(r)) for r in rows]

    def add_instance(self, instance: InstanceRecord) -> None:
        """Recorded before the create: from here the job's SSH key may be on the provider's account
        (RunPod keeps keys per account) until `record_key_removed`."""
        row = instance.model_dump()
        with self._connect() as db:
            db.execute(
                f"INSERT INTO instances ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})", tuple(row.values())
            )
            if instance.provider != "ssh":
                db.execute(
                    "UPDATE jobs SET key_registered_at = ?, key_removed_at = NULL WHERE id = ?",
                    (instance.created_at, instance.job_id),
                )

    def hand_over_instance(self, old: InstanceRecord, job_id: str, detail: str) -> InstanceRecord:
        """A queue's next job takes the instance over, in one transaction: the old record ends when the new one
        starts, and the job moves to "intent_recorded". IllegalTransition when the job is no longer planned."""
        now = time.time()
        new = old.model_copy(
            update={
                "job_id": job_id,
                "created_at": now,
                "running_at": now,
                "ended_at": None,
                "end_reason": None,
                "periods": [],
            }
        )
        row = new.model_dump()
        with self._connect() as db:
            current = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if current is None:
                raise KeyError(job_id)
            if "intent_recorded" not in ALLOWED_TRANSITIONS[current["state"]]:
                raise IllegalTransition(job_id, current["state"], "intent_recorded")
            db.execute(
                f"INSERT INTO instances ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})", tuple(row.values())
            )
            db.execute(
                "UPDATE instances SET ended_at = ?, end_reason = ? "
                "WHERE job_id = ? AND offer_id = ? AND created_at = ?",
                (now, f"handed over to job {job_id}", old.job_id, old.offer_id, old.created_at),
            )
            _close_periods(db, old, now)
            taken_over = f"taken over from job {old.job_id}"
            period = _insert_period(db, new, "running", now, old.usd_per_hour, taken_over, now)
            db.execute(
                "UPDATE jobs SET state = 'intent_recorded', key_registered_at = ?, key_removed_at = NULL WHERE id = ?",
                (now, job_id),
            )
            db.execute(
                "INSERT INTO transitions VALUES (?, ?, ?, ?, ?)",
                (job_id, now, current["state"], "intent_recorded", detail),
            )
        return new.model_copy(update={"periods": [period]})

    def record_key_removed(self, job_id: str) -> None:
        self.update_job(job_id, key_removed_at=time.time())

    # ------------------------------------------------------------------ the client lock

    def take_client_lock(self, job_id: str, pid: int, host: str, now: float | None = None) -> JobRecord:
        """Claim the job for the client `pid`@`host`: free, already ours, or held by a client that is no
        longer alive (`client_alive`). One write transaction compares and sets, so of two clients racing
        for it exactly one wins; the other gets LockHeld naming the winner."""
        now = time.time() if now is None else now
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            current = JobRecord(**dict(row))
            ours = current.client_pid == pid and current.client_host == host
            if not ours and client_alive(current, now):
                raise LockHeld(current, now)
            db.execute(
                "UPDATE jobs SET client_pid = ?, client_host = ?, client_beat_at = ? WHERE id = ?",
                (pid, host, now, job_id),
            )
        return current.model_copy(update={"client_pid": pid, "client_host": host, "client_beat_at": now})

    def beat_client_lock(self, job_id: str, pid: int, host: str, now: float | None = None) -> bool:
        """Refresh the claim; False when it is no longer ours (another client took it over)."""
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE jobs SET client_beat_at = ? WHERE id = ? AND client_pid = ? AND client_host = ?",
                (time.time() if now is None else now, job_id, pid, host),
            )
            return cursor.rowcount == 1

    def release_client_lock(self, job_id: str, pid: int, host: str) -> None:
        """Give the claim up, if it is still ours."""
        with self._connect() as db:
            db.execute(
                "UPDATE jobs SET client_pid = NULL, client_host = NULL, client_beat_at = NULL "
                "WHERE id = ? AND client_pid = ? AND client_host = ?",
                (job_id, pid, host),
            )

    # ------------------------------------------------------------------ provider accounts

    def record_account_checked(self, provider: str, at: float | None = None) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO account_checks VALUES (?, ?) "
                "ON CONFLICT(provider) DO UPDATE SET checked_at = excluded.checked_at",
                (provider, time.time() if at is None else at),
            )

    def account_checked_at(self, provider: str) -> float | None:
        with self._connect() as db:
            row = db.execute("SELECT checked_at FROM account_checks WHERE provider = ?", (provider,)).fetchone()
        return None if row is None else float(row["checked_at"])

    def update_instance(self, job_id: str, offer_id: str, created_at: float, **fields: Any) -> None:
        """Set columns of one record. An `ended_at` also ends its open billing period there (billing stopped then)."""
        unknown = set(fields) - set(InstanceRecord.model_fields) | ({"periods"} & set(fields))
        if unknown:
            raise ValueError(f"unknown instance fields: {sorted(unknown)}")
        with self._connect() as db:
            db.execute(
                f"UPDATE instances SET {', '.join(f'{k} = ?' for k in fields)} "
                "WHERE job_id = ? AND offer_id = ? AND created_at = ?",
                (*fields.values(), job_id, offer_id, created_at),
            )
            if fields.get("ended_at") is not None:
                _close_periods(db, (job_id, offer_id, created_at), float(fields["ended_at"]))

    def instances(self, job_id: str | None = None, live_only: bool = False) -> list[InstanceRecord]:
        """Records in the order they were made, each with its billing periods."""
        query = "SELECT * FROM instances WHERE 1 = 1"
        params: list[Any] = []
        if job_id is not None:
            query += " AND job_id = ?"
            params.append(job_id)
        if live_only:
            query += " AND ended_at IS NULL"
        periods_query = "SELECT * FROM billing_periods" + (" WHERE job_id = ?" if job_id is not None else "")
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY created_at", params).fetchall()
            period_rows = db.execute(periods_query + " ORDER BY started_at, rowid", params[:1]).fetchall()
        periods: dict[RecordKey, list[BillingPeriod]] = defaultdict(list)
        for row in period_rows:
            key = (row["job_id"], row["offer_id"], row["record_created_at"])
            periods[key].append(BillingPeriod(**{k: row[k] for k in BillingPeriod.model_fields}))
        return [
            InstanceRecord(**dict(r), periods=periods.get((r["job_id"], r["offer_id"], r["created_at"]), []))
            for r in rows
        ]

    # ------------------------------------------------------------------ billing periods

    def start_billing(self, record: InstanceRecord, at: float, source: str) -> None:
        """The provider bills the record's instance from `at`, never before the create was sent (the record's
        `created_at`): its first period, at the full price. Again with an earlier time (the provider's own, after
        the time its answer came), that period starts earlier; a later time changes nothing."""
        at = max(at, record.created_at)
        with self._connect() as db:
            first = db.execute(
                f"SELECT rowid, started_at FROM billing_periods WHERE {_OF_RECORD} ORDER BY started_at, rowid LIMIT 1",
                _key(record),
            ).fetchone()
            if first is None:
                _insert_period(db, record, "running", at, record.usd_per_hour, source, at)
            elif at < first["started_at"]:
                moved = (at, source, first["rowid"])
                db.execute("UPDATE billing_periods SET started_at = ?, source = ? WHERE rowid = ?", moved)

    def bill_state(
        self, record: InstanceRecord, state: BillingState, at: float, usd_per_hour: float, source: str, seen_at: float
    ) -> None:
        """From `at` the instance bills as `state` at `usd_per_hour`: the open period ends there (never before it
        began) and one in `state` begins. Nothing changes when the open period is in `state` already, or when
        the record has no open period (not billed yet, or ended)."""
        with self._connect() as db:
            current = _open_row(db, record)
            if current is None or current["state"] == state:
                return
            at = max(at, current["started_at"])
            _close_periods(db, record, at)
            _insert_period(db, record, state, at, usd_per_hour, source, max(at, seen_at))

    def saw_instance(self, record: InstanceRecord, state: BillingState, at: float) -> None:
        """rentrain saw the instance in `state` at `at`: the open period's `seen_at`, when it is in that state."""
        with self._connect() as db:
            db.execute(
                f"UPDATE billing_periods SET seen_at = MAX(seen_at, ?) WHERE {_OF_RECORD} AND ended_at IS NULL "
                "AND state = ?",
                (at, *_key(record), state),
            )

    def place_change(self, record: InstanceRecord, state: BillingState, at: float, source: str) -> bool:
        """A better time for a change recorded at a guess: the period in `state` that holds `at` between the start
        of the period before it and its own end begins at `at`, and the one before it ends there. False when no
        recorded change fits (rentrain never saw the instance in `state` around then)."""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT rowid, * FROM billing_periods WHERE {_OF_RECORD} ORDER BY started_at, rowid", _key(record)
            ).fetchall()
            for before, period in pairwise(rows):
                ends = period["ended_at"] if period["ended_at"] is not None else float("inf")
                if period["state"] == state and before["started_at"] < at < ends:
                    db.execute(
                        "UPDATE billing_periods SET started_at = ?, source = ? WHERE rowid = ?",
                        (at, source, period["rowid"]),
                    )
                    db.execute("UPDATE billing_periods SET ended_at = ? WHERE rowid = ?", (at, before["rowid"]))
                    return True
        return False

    def job_cost(self, job_id: str, now: float | None = None) -> float:
        return sum(i.cost(now) for i in self.instances(job_id))

    # ------------------------------------------------------------------ what finished jobs measured

    def record_run(self, run: JobRun) -> None:
        """The job's measurements; a second record of the same job replaces the first."""
        row = run.model_dump(exclude={"phases"}) | {"phases_json": json.dumps(run.phases, sort_keys=True)}
        with self._connect() as db:
            db.execute(
                f"INSERT OR REPLACE INTO job_runs ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
                tuple(row.values()),
            )

    def job_runs(self, job_id: str | None = None) -> list[JobRun]:
        """Every job's measurements (or one job's), oldest first."""
        query = "SELECT * FROM job_runs" + (" WHERE job_id = ?" if job_id is not None else "")
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY recorded_at", () if job_id is None else (job_id,)).fetchall()
        return [_job_run(row) for row in rows]

    def record_failed_host(self, provider: str, host_id: str, reason: str) -> None:
        with self._connect() as db:
            db.execute("INSERT INTO failed_hosts VALUES (?, ?, ?, ?)", (provider, host_id, time.time(), reason))

    def failed_hosts(self, provider: str) -> set[str]:
        with self._connect() as db:
            rows = db.execute("SELECT DISTINCT host_id FROM failed_hosts WHERE provider = ?", (provider,)).fetchall()
        return {r["host_id"] for r in rows}


RecordKey = tuple[str, str, float]  # an instance record's (job_id, offer_id, created_at)
_OF_RECORD = "job_id = ? AND offer_id = ? AND record_created_at = ?"


def _key(record: InstanceRecord | RecordKey) -> RecordKey:
    return (record.job_id, record.offer_id, record.created_at) if isinstance(record, InstanceRecord) else record


def _open_row(db: sqlite3.Connection, record: InstanceRecord) -> sqlite3.Row | None:
    row: sqlite3.Row | None = db.execute(
        f"SELECT * FROM billing_periods WHERE {_OF_RECORD} AND ended_at IS NULL ORDER BY started_at DESC LIMIT 1",
        _key(record),
    ).fetchone()
    return row


def _insert_period(
    db: sqlite3.Connection,
    record: InstanceRecord,
    state: BillingState,
    at: float,
    usd_per_hour: float,
    source: str,
    seen_at: float,
) -> BillingPeriod:
    period = BillingPeriod(state=state, started_at=at, usd_per_hour=usd_per_hour, source=source, seen_at=seen_at)
    db.execute(
        "INSERT INTO billing_periods (job_id, offer_id, record_created_at, state, started_at, usd_per_hour, source, "
        "seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (*_key(record), state, at, usd_per_hour, source, seen_at),
    )
    return period


def _close_periods(db: sqlite3.Connection, record: InstanceRecord | RecordKey, at: float) -> None:
    """End the record's open period at `at` (at its start, if it began later)."""
    db.execute(
        f"UPDATE billing_periods SET ended_at = MAX(started_at, ?) WHERE {_OF_RECORD} AND ended_at IS NULL",
        (at, *_key(record)),
    )


def _job_run(row: sqlite3.Row) -> JobRun:
    columns = dict(row)
    return JobRun(**columns, phases=json.loads(columns.pop("phases_json")))


def _insert_job(db: sqlite3.Connection, job: JobRecord, detail: str) -> None:
    """A new job and its first transition, inside the caller's transaction."""
    row = job.model_dump()
    db.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})", tuple(row.values()))
    db.execute("INSERT INTO transitions VALUES (?, ?, NULL, ?, ?)", (job.id, job.created_at, job.state, detail))


class ClientLock:
    """This process follows one job, or a queue's jobs: each claim is taken on enter (LockHeld if another live
    client has one; the ones taken are given back), kept fresh by a daemon thread every LOCK_BEAT_SECONDS, and
    released on exit. `on_lost` is called (from that thread) if another client took a claim over meanwhile,
    with the record naming it."""

    def __init__(
        self, ledger: Ledger, job_ids: str | Sequence[str], on_lost: Callable[[JobRecord], None] | None = None
    ):
        self.ledger = ledger
        self.job_ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
        self.on_lost = on_lost
        self.pid = os.getpid()
        self.host = this_host()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"rentrain-lock-{self.job_ids[0]}", daemon=True)

    def __enter__(self) -> ClientLock:
        taken: list[str] = []
        try:
            for job_id in self.job_ids:
                self.ledger.take_client_lock(job_id, self.pid, self.host)
                taken.append(job_id)
        except BaseException:
            for job_id in taken:
                self.ledger.release_client_lock(job_id, self.pid, self.host)
            raise
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for job_id in self.job_ids:
            self.ledger.release_client_lock(job_id, self.pid, self.host)

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_BEAT_SECONDS):
            for job_id in self.job_ids:
                try:
                    if self.ledger.beat_client_lock(job_id, self.pid, self.host):
                        continue
                    winner = self.ledger.job(job_id)
                except sqlite3.Error:
                    continue  # a busy or briefly unreadable ledger: try again at the next beat
                if self.on_lost is not None:
                    self.on_lost(winner)
                return


def settings_of(job: JobRecord) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(job.settings_json)
    return loaded
