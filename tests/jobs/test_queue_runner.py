"""The queue runner's decisions (rentrain.queue_run) against a real ledger, with fake jobs and no SSH: which job
starts next, which are skipped and why, when the queue stops, and how an instance goes from one job to the next."""

from __future__ import annotations

import io
import itertools
import re
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from remote.config import LoadedConfig, load_config
from rentrain.costs import JobEstimate
from rentrain.job import DetachRequested, JobFailed, RunSettings
from rentrain.job_phases.context import Session
from rentrain.ledger import InstanceRecord, JobRecord, JobState, Ledger, QueueRecord
from rentrain.queue_run import Lane, QueuedJob, QueueHooks, QueueRunner
from rentrain.remote_job import RemoteLayout
from rentrain.sshkeys import JobKey, create_job_key, load_job_key

QUEUE_ID = "q-1"
TO_FOLLOWING: tuple[JobState, ...] = ("creating", "waiting_ssh", "syncing", "watchdog", "bootstrapping", "training")
FROM_HAND_OVER: tuple[JobState, ...] = ("syncing", "watchdog", "bootstrapping", "training", "following", "fetching")


class Told:
    """The hooks' calls: each job ended, and why the queue stopped."""

    def __init__(self) -> None:
        self.ended: list[JobRecord] = []
        self.stopped: list[str] = []

    def hooks(self) -> QueueHooks:
        return QueueHooks(job_ended=self.ended.append, stopped=self.stopped.append)


def _estimate(usd: float, hours: float) -> JobEstimate:
    return JobEstimate(
        steps=100,
        seconds_per_step=1.0,
        speed_kind="assumed",
        speed_source="test",
        train_hours=hours,
        overhead_hours=0.0,
        total_hours=hours,
        price_per_hour=usd / hours,
        cost_usd=usd,
    )


@pytest.fixture
def loaded(tmp_path: Path) -> LoadedConfig:
    config = tmp_path / "config.toml"
    config.write_text(
        '[model]\npretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"\n[dataset]\ntrain_data_dir = "d"\n'
        "[training]\nmax_train_epochs = 1\nlearning_rate = 1e-4\n"
    )
    return load_config(config)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.sqlite3")


def _queue(ledger: Ledger, job_ids: list[str], max_cost: float | None = None, **fields: Any) -> QueueRecord:
    queue = QueueRecord(
        id=QUEUE_ID, created_at=time.time(), provider="vast", max_cost=max_cost, report_path="/r.html", **fields
    )
    jobs = [
        JobRecord(
            id=job_id,
            created_at=time.time(),
            config_path=f"/jobs/{job_id}.toml",
            provider="vast",
            label=f"rentrain-{job_id}",
            state="planned",
            output_dir=f"/out/{job_id}",
        )
        for job_id in job_ids
    ]
    ledger.create_queue(queue, jobs)
    return queue


def _runner(
    ledger: Ledger,
    queue: QueueRecord,
    loaded: LoadedConfig,
    estimates: dict[str, JobEstimate | None],
    lanes: list[list[str]],
    told: Told,
) -> tuple[QueueRunner, io.StringIO]:
    settings = RunSettings(provider="vast", max_cost=queue.max_cost, deadline=queue.deadline)
    jobs = {job_id: QueuedJob(loaded, settings, estimate) for job_id, estimate in estimates.items()}
    screen = io.StringIO()
    console = Console(file=screen, width=200)
    provider: Any = object()  # nothing here may call a provider
    runner = QueueRunner(ledger, queue, jobs, [Lane(jobs=ids, offers=[]) for ids in lanes], provider, console)
    runner.hooks = told.hooks()
    return runner, screen


def _walk(ledger: Ledger, job_id: str, states: tuple[JobState, ...]) -> None:
    for state in states:
        ledger.transition(job_id, state)


def _bill(ledger: Ledger, job_id: str, usd: float) -> None:
    """An ended instance of the job that cost `usd`."""
    start = time.time() - 7200
    record = InstanceRecord(
        job_id=job_id,
        provider="vast",
        instance_id=f"spent-{job_id}",
        offer_id="6000",
        gpu="1x RTX 4090",
        usd_per_hour=usd,
        created_at=start,
        ended_at=start + 3600,
    )
    ledger.add_instance(record)


def _closed(ledger: Ledger, job_id: str, outcome: str = "succeeded") -> None:
    ledger.transition(job_id, "closed", "done", outcome=outcome)


# ---------------------------------------------------------------------------------------------- the next job


def test_a_job_over_the_budget_left_is_skipped_with_the_reason_and_the_next_that_fits_starts(
    ledger: Ledger, loaded: LoadedConfig
) -> None:
    queue = _queue(ledger, ["j1", "j2", "j3"], max_cost=1.0)
    _bill(ledger, "j1", 0.7)
    _closed(ledger, "j1")
    told = Told()
    runner, screen = _runner(
        ledger, queue, loaded, {"j2": _estimate(0.5, 1), "j3": _estimate(0.2, 1)}, [["j1", "j2", "j3"]], told
    )
    assert runner._next_job(runner.lanes[0]) == "j3"
    skipped = ledger.job("j2")
    reason = "skipped: budget: $0.30 of $1.00 left, the job's estimate is $0.50"
    assert (skipped.state, skipped.outcome, skipped.error) == ("closed", "skipped", reason)
    assert [(t.from_state, t.to_state, t.detail) for t in ledger.transitions("j2")][1:] == [
        ("planned", "closed", reason)
    ]
    assert [job.id for job in told.ended] == ["j2"] and told.ended[0].outcome == "skipped"
    assert f"job j2 (/jobs/j2.toml) {reason}" in screen.getvalue()
    assert ledger.job("j3").state == "planned", "choosing a job does not start it"


def test_a_job_longer_than_the_time_to_the_deadline_is_skipped(ledger: Ledger, loaded: LoadedConfig) -> None:
    queue = _queue(ledger, ["j1", "j2"], deadline=time.time() + 30 * 60)
    told = Told()
    runner, _screen = _runner(
        ledger, queue, loaded, {"j1": _estimate(0.1, 1.0), "j2": _estimate(0.1, 0.25)}, [["j1", "j2"]], told
    )
    assert runner._next_job(runner.lanes[0]) == "j2"
    error = ledger.job("j1").error or ""
    assert re.fullmatch(r"skipped: deadline: \S+ \S+ is (29|30) min away, the job's estimate is 60 min", error), error


def test_a_job_without_an_estimate_starts_while_the_queue_goes_on(ledger: Ledger, loaded: LoadedConfig) -> None:
    queue = _queue(ledger, ["j1"], max_cost=1.0, deadline=time.time() + 60)
    _bill(ledger, "j1", 0.9)
    runner, _screen = _runner(ledger, queue, loaded, {"j1": None}, [["j1"]], Told())
    assert runner._next_job(runner.lanes[0]) == "j1"


def test_once_the_queue_stopped_every_job_not_started_is_skipped(ledger: Ledger, loaded: LoadedConfig) -> None:
    queue = _queue(ledger, ["j1", "j2", "j3"], max_cost=1.0)
    _walk(ledger, "j1", ("intent_recorded",))
    told = Told()
    runner, _screen = _runner(ledger, queue, loaded, dict.fromkeys(["j2", "j3"]), [["j1", "j2", "j3"]], told)
    runner.stop_reason = "deadline reached: 2026-12-06 07:00"
    assert runner._next_job(runner.lanes[0]) is None
    assert ledger.job("j1").state == "intent_recorded", "the running job is left to finish"
    for job_id in ("j2", "j3"):
        assert ledger.job(job_id).error == "skipped: deadline reached: 2026-12-06 07:00"
    assert [job.id for job in told.ended] == ["j2", "j3"]


def test_a_job_down_closed_meanwhile_is_not_skipped_again(ledger: Ledger, loaded: LoadedConfig) -> None:
    queue = _queue(ledger, ["j1"])
    stale = ledger.job("j1")
    ledger.transition("j1", "closed", "rentrain down (the queue ended)", outcome="cancelled")
    told = Told()
    runner, _screen = _runner(ledger, queue, loaded, {"j1": None}, [["j1"]], told)
    runner._skip(stale, "budget: ...")
    assert ledger.job("j1").outcome == "cancelled" and told.ended == []


def test_the_queue_stops_once_when_its_budget_is_spent(ledger: Ledger, loaded: LoadedConfig) -> None:
    queue = _queue(ledger, ["j1", "j2"], max_cost=1.0)
    told = Told()
    runner, screen = _runner(ledger, queue, loaded, dict.fromkeys(["j1", "j2"]), [["j1"], ["j2"]], told)
    runner._check_stop("j1")
    assert told.stopped == [] and not screen.getvalue()
    _bill(ledger, "j2", 1.25)  # the other lane's job spent it
    runner._check_stop("j1")
    runner._check_stop("j2")
    assert told.stopped == ["budget reached: $1.25 of the queue's $1.00"]
    assert runner.stop_reason == told.stopped[0]
    assert screen.getvalue().count("no further job starts") == 1


# ---------------------------------------------------------------------------------------------- the hand-over


def _handed(lane: Lane) -> Session | None:
    return lane.handed


class FakeRemote:
    """The job's SSH connection: the hand-over passes it on as it is."""


def _rented(ledger: Ledger, job_id: str) -> Session:
    """The job's instance as its session saw it when created: its SSH address and host key were learnt later,
    into the ledger's record only."""
    record = InstanceRecord(
        job_id=job_id,
        provider="vast",
        instance_id="1001",
        offer_id="7001",
        host_id="h-77",
        gpu="1x RTX 4090",
        usd_per_hour=0.4,
        created_at=time.time() - 600,
        running_at=time.time() - 500,
    )
    ledger.add_instance(record)
    learnt = {"ssh_host": "203.0.113.9", "ssh_port": 40022, "ssh_user": "root", "host_key": "ssh-ed25519 AAAAhost"}
    ledger.update_instance(job_id, record.offer_id, record.created_at, **learnt)
    layout = RemoteLayout(root=f"/root/rentrain/{job_id}")
    return Session(record=record, remote=FakeRemote(), layout=layout, python="/opt/venv/bin/python")  # type: ignore[arg-type]


def test_the_next_job_takes_the_instance_over_with_what_the_ledger_learnt(ledger: Ledger, loaded: LoadedConfig) -> None:
    queue = _queue(ledger, ["j1", "j2"])
    _walk(ledger, "j1", ("intent_recorded", *TO_FOLLOWING, "following"))
    session = _rented(ledger, "j1")
    runner, screen = _runner(ledger, queue, loaded, dict.fromkeys(["j1", "j2"]), [["j1", "j2"]], Told())
    lane = runner.lanes[0]
    assert runner._hand_over(lane, "j1", session) is True

    [old] = ledger.instances("j1")
    [new] = ledger.instances("j2")
    assert old.ended_at is not None and old.end_reason == "handed over to job j2"
    assert new.created_at == old.ended_at == new.running_at, "billed to one job until the other takes over"
    assert new.ended_at is None and new.end_reason is None
    same = ("instance_id", "offer_id", "host_id", "gpu", "usd_per_hour", "ssh_host", "ssh_port", "ssh_user", "host_key")
    assert {f: getattr(new, f) for f in same} == {f: getattr(old, f) for f in same}
    assert new.ssh_host == "203.0.113.9" and new.host_key == "ssh-ed25519 AAAAhost", "the ledger's, not the session's"
    assert ledger.job("j2").state == "intent_recorded"
    assert ledger.transitions("j2")[-1].detail == "takes instance 1001 over from job j1"
    assert ledger.job("j2").key_registered_at == new.created_at

    handed = lane.handed
    assert handed is not None and lane.key_of == "j1"
    assert handed.record == new
    assert handed.remote is session.remote and handed.python == "/opt/venv/bin/python"
    assert handed.layout.root == "/root/rentrain/j2"
    assert handed.shared_model == "/root/rentrain/j1/model" and handed.handed_from == session.layout
    assert "job j2 takes the instance over from job j1" in screen.getvalue()


def test_the_rental_keeps_its_first_jobs_model_folder_down_the_lane(ledger: Ledger, loaded: LoadedConfig) -> None:
    queue = _queue(ledger, ["j1", "j2", "j3"])
    _walk(ledger, "j1", ("intent_recorded", *TO_FOLLOWING, "following"))
    runner, _screen = _runner(ledger, queue, loaded, dict.fromkeys(["j1", "j2", "j3"]), [["j1", "j2", "j3"]], Told())
    lane = runner.lanes[0]
    assert runner._hand_over(lane, "j1", _rented(ledger, "j1"))
    second, lane.handed = lane.handed, None
    assert second is not None
    _walk(ledger, "j2", FROM_HAND_OVER)
    assert runner._hand_over(lane, "j2", second)
    third = _handed(lane)
    assert third is not None and lane.key_of == "j2"
    assert third.shared_model == "/root/rentrain/j1/model"
    assert third.handed_from == second.layout
    assert [i.ended_at is None for i in ledger.instances()] == [False, False, True]


def test_no_hand_over_when_the_next_job_does_not_fit(ledger: Ledger, loaded: LoadedConfig) -> None:
    queue = _queue(ledger, ["j1", "j2"], max_cost=1.0)
    _walk(ledger, "j1", ("intent_recorded", *TO_FOLLOWING, "following"))
    session = _rented(ledger, "j1")  # $0.067 so far
    told = Told()
    runner, _screen = _runner(ledger, queue, loaded, {"j1": None, "j2": _estimate(0.95, 1)}, [["j1", "j2"]], told)
    assert runner._hand_over(runner.lanes[0], "j1", session) is False
    assert runner.lanes[0].handed is None
    assert [i.ended_at for i in ledger.instances()] == [None], "the instance is left to its job to destroy"
    assert ledger.job("j2").outcome == "skipped" and (ledger.job("j2").error or "").startswith("skipped: budget: ")
    assert told.stopped == []


def test_no_hand_over_once_the_budget_is_spent_and_the_queue_stops(ledger: Ledger, loaded: LoadedConfig) -> None:
    queue = _queue(ledger, ["j1", "j2"], max_cost=0.05)
    _walk(ledger, "j1", ("intent_recorded", *TO_FOLLOWING, "following"))
    session = _rented(ledger, "j1")  # 600 s at $0.40/h: $0.067
    told = Told()
    runner, _screen = _runner(ledger, queue, loaded, dict.fromkeys(["j1", "j2"]), [["j1", "j2"]], told)
    assert runner._hand_over(runner.lanes[0], "j1", session) is False
    assert told.stopped == ["budget reached: $0.07 of the queue's $0.05"]
    assert ledger.job("j2").error == "skipped: budget reached: $0.07 of the queue's $0.05"
    assert ledger.instances("j2") == []


@pytest.mark.parametrize("why", ["detach", "cancel"])
def test_no_hand_over_while_the_client_detaches_or_stops(ledger: Ledger, loaded: LoadedConfig, why: str) -> None:
    queue = _queue(ledger, ["j1", "j2"])
    _walk(ledger, "j1", ("intent_recorded", *TO_FOLLOWING, "following"))
    session = _rented(ledger, "j1")
    runner, _screen = _runner(ledger, queue, loaded, dict.fromkeys(["j1", "j2"]), [["j1", "j2"]], Told())
    if why == "detach":
        runner.request_detach("SIGTERM")
    else:
        runner.cancelled.set()
    assert runner._hand_over(runner.lanes[0], "j1", session) is False
    assert ledger.job("j2").state == "planned", "a job not started waits for `rentrain attach`"
    assert ledger.instances("j2") == []


# ---------------------------------------------------------------------------------------------- a lane's jobs in turn


class FakeJob:
    """A JobRunner as the queue drives it: `plan` says whether it fails, or rents (unless handed an instance),
    trains and releases its instance to the queue's next job (else ends it)."""

    def __init__(self, ledger: Ledger, job_id: str, key: JobKey, plan: str, log: list[tuple[str, Any]]):
        self.ledger, self.job_id, self.key, self.plan, self.log = ledger, job_id, key, plan, log
        self.context = SimpleNamespace(view=nullcontext())
        self.loaded = SimpleNamespace(path=Path(f"/jobs/{job_id}.toml"))
        self.teardown = SimpleNamespace(forget_key=lambda: log.append(("forget_key", job_id)))
        self.hand_over: Any = None
        self.detach_requested: str | None = None

    @property
    def job(self) -> JobRecord:
        return self.ledger.job(self.job_id)

    def run(self, offers: list[Any], session: Session | None = None) -> str:
        self.log.append(("run", (self.job_id, session)))
        if self.plan == "fail":
            _walk(self.ledger, self.job_id, ("intent_recorded",))
            self.ledger.transition(self.job_id, "closed", "no offer", outcome="failed", error="no offer")
            raise JobFailed("no instance could be started")
        if self.plan == "detach":
            raise DetachRequested("SIGTERM")
        if session is None:
            _walk(self.ledger, self.job_id, ("intent_recorded", *TO_FOLLOWING, "following", "fetching"))
            session = _rented(self.ledger, self.job_id)
        else:
            _walk(self.ledger, self.job_id, FROM_HAND_OVER)
        if not self.hand_over(session):
            record = session.record
            self.ledger.update_instance(record.job_id, record.offer_id, record.created_at, ended_at=time.time())
            self.log.append(("destroyed", self.job_id))
        self.ledger.transition(self.job_id, "closed", "fetched", outcome="succeeded")
        return "succeeded"


def _with_fake_jobs(runner: QueueRunner, plans: dict[str, str]) -> list[tuple[str, Any]]:
    log: list[tuple[str, Any]] = []

    def fake(job_id: str, key: JobKey) -> Any:
        log.append(("key", (job_id, key.public_line)))
        return FakeJob(runner.ledger, job_id, key, plans[job_id], log)

    runner._runner = fake  # type: ignore[method-assign]
    return log


def test_a_lane_works_through_its_jobs_a_failed_one_does_not_stop_it(ledger: Ledger, loaded: LoadedConfig) -> None:
    ids = ["j1", "j2", "j3", "j4"]
    queue = _queue(ledger, ids)
    told = Told()
    runner, screen = _runner(ledger, queue, loaded, dict.fromkeys(ids), [ids], told)
    log = _with_fake_jobs(runner, {"j1": "fail", "j2": "train", "j3": "train", "j4": "train"})
    runner.run()

    assert [(job.id, job.outcome) for job in ledger.queue_jobs(QUEUE_ID)] == [
        ("j1", "failed"),
        ("j2", "succeeded"),
        ("j3", "succeeded"),
        ("j4", "succeeded"),
    ]
    runs = [value for what, value in log if what == "run"]
    assert [(job_id, session is None) for job_id, session in runs] == [
        ("j1", True),
        ("j2", True),
        ("j3", False),
        ("j4", False),
    ], "the failed job left no instance; j2 rented one; j3 and j4 were handed it"
    keys = dict(value for what, value in log if what == "key")
    assert keys["j1"] != keys["j2"], "a job that rents makes its own key"
    assert keys["j3"] == keys["j4"] == keys["j2"], "the jobs handed the instance use the key it was created with"
    assert load_job_key("j4").private_path.read_bytes() == load_job_key("j2").private_path.read_bytes()
    assert [value for what, value in log if what == "destroyed"] == ["j4"], "only the lane's last job destroys it"
    assert [value for what, value in log if what == "forget_key"] == ["j1", "j2", "j3", "j4"]
    assert [job.id for job in told.ended] == ["j1", "j2", "j3", "j4"]
    assert "job j1 failed: no instance could be started" in screen.getvalue()
    records = ledger.instances()
    assert len({r.instance_id for r in records}) == 1 and [r.job_id for r in records] == ["j2", "j3", "j4"]
    for earlier, later in itertools.pairwise(records):
        assert earlier.ended_at == later.created_at


def test_parallel_lanes_each_work_through_their_jobs(ledger: Ledger, loaded: LoadedConfig) -> None:
    ids = ["j1", "j2", "j3", "j4"]
    queue = _queue(ledger, ids, parallel=2)
    runner, _screen = _runner(ledger, queue, loaded, dict.fromkeys(ids), [["j1", "j2"], ["j3", "j4"]], Told())
    log = _with_fake_jobs(runner, dict.fromkeys(ids, "train"))
    runner.run()
    assert {job.outcome for job in ledger.queue_jobs(QUEUE_ID)} == {"succeeded"}
    handed = {job_id for what, (job_id, session) in [e for e in log if e[0] == "run"] if session is not None}
    assert handed == {"j2", "j4"}
    assert sorted(value for what, value in log if what == "destroyed") == ["j2", "j4"]


def test_a_detach_leaves_the_jobs_not_started_waiting(ledger: Ledger, loaded: LoadedConfig) -> None:
    ids = ["j1", "j2", "j3"]
    queue = _queue(ledger, ids)
    runner, _screen = _runner(ledger, queue, loaded, dict.fromkeys(ids), [ids], Told())
    log = _with_fake_jobs(runner, {"j1": "train", "j2": "detach", "j3": "train"})
    with pytest.raises(DetachRequested):
        runner.run()
    assert [job.state for job in ledger.queue_jobs(QUEUE_ID)] == ["closed", "intent_recorded", "planned"]
    assert [i.job_id for i in ledger.instances(live_only=True)] == ["j2"], "left to its watchdog, for attach"
    assert [value[0] for what, value in log if what == "run"] == ["j1", "j2"]


def test_a_detach_asked_for_between_jobs_starts_no_other(ledger: Ledger, loaded: LoadedConfig) -> None:
    ids = ["j1", "j2"]
    queue = _queue(ledger, ids)
    runner, _screen = _runner(ledger, queue, loaded, dict.fromkeys(ids), [ids], Told())
    log = _with_fake_jobs(runner, {"j1": "fail", "j2": "train"})
    runner.request_detach("SIGHUP")
    with pytest.raises(DetachRequested, match="SIGHUP"):
        runner.run()
    assert log == [] and ledger.job("j2").state == "planned"


def test_attach_closes_a_job_whose_result_is_home_then_goes_on_with_the_lane(
    ledger: Ledger, loaded: LoadedConfig
) -> None:
    ids = ["j1", "j2"]
    queue = _queue(ledger, ids)
    _walk(ledger, "j1", ("intent_recorded", *TO_FOLLOWING, "following", "fetching"))
    ledger.update_job("j1", result_path="/out/j1/lora.safetensors")
    create_job_key("j1")
    runner, _screen = _runner(ledger, queue, loaded, dict.fromkeys(ids), [ids], Told())
    log: list[tuple[str, Any]] = []
    closed: list[tuple[str, str]] = []

    def fake(job_id: str, key: JobKey) -> Any:
        job = FakeJob(ledger, job_id, key, "train", log)
        job.close = lambda outcome, detail: closed.append((job_id, outcome))  # type: ignore[attr-defined]
        return job

    runner._runner = fake  # type: ignore[method-assign]
    runner._take_over_running(0, runner.lanes[0])
    assert closed == [("j1", "succeeded")] and log == [], "no instance is left to follow and nothing is rented"


def test_a_job_that_would_use_what_a_running_lane_still_needs_is_skipped(ledger: Ledger, loaded: LoadedConfig) -> None:
    queue = _queue(ledger, ["a", "b"], max_cost=1.0, parallel=2)
    told = Told()
    runner, _screen = _runner(
        ledger, queue, loaded, {"a": _estimate(0.7, 1.0), "b": _estimate(0.5, 1.0)}, [["a"], ["b"]], told
    )
    _bill(ledger, "a", 0.2)  # a runs on lane 0: $0.20 spent of its $0.70, so $0.50 is kept for it
    runner.active[0] = SimpleNamespace(job=ledger.job("a"))  # type: ignore[assignment]
    assert runner._committed() == pytest.approx(0.5)
    assert runner._committed(but="a") == 0.0
    assert runner._next_job(runner.lanes[1]) is None
    assert ledger.job("b").error == "skipped: budget: $0.30 of $1.00 left, the job's estimate is $0.50"
