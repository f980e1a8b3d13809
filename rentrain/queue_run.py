"""Running a queue: each lane is one rental working through its jobs in turn, handing the instance from one job
to the next (one setup, one base model download); lanes run side by side up to --parallel.

One budget and one deadline cover the queue: a job whose estimate no longer fits is skipped with the reason,
and once the budget or the deadline is reached every job not started is skipped. A job that fails does not
stop the others; a host that dies takes the running job (from its last state) and the rest of its lane to
the next offer.
"""

from __future__ import annotations

import posixpath
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field

from rich.console import Console

from providers.base import NotFound, Offer, Provider
from remote.config import LoadedConfig
from rentrain.costs import JobEstimate
from rentrain.job import DetachRequested, JobFailed, JobRunner, RunSettings, Session
from rentrain.job_phases.context import budget_reached, clock_time, deadline_reached
from rentrain.ledger import IllegalTransition, JobRecord, Ledger, QueueRecord
from rentrain.progress import RunProgress, plain_printer
from rentrain.remote_job import RemoteLayout
from rentrain.sshkeys import JobKey, fresh_job_key, load_job_key, share_job_key
from rentrain.transport import TransportError


@dataclass
class QueuedJob:
    """What running one job of the queue needs besides its ledger record."""

    loaded: LoadedConfig
    settings: RunSettings
    estimate: JobEstimate | None


@dataclass
class Lane:
    """One rental's share of the queue, and the job that takes the instance over next."""

    jobs: list[str]
    offers: list[Offer]
    handed: Session | None = None  # the instance the job before left to the next one
    key_of: str | None = None  # the job whose key the instance knows


@dataclass
class QueueHooks:
    """What the queue tells the world: a job ended (report, notification), the queue stopped early."""

    job_ended: Callable[[JobRecord], object] = lambda _job: None
    stopped: Callable[[str], None] = lambda _reason: None


@dataclass
class QueueRunner:
    ledger: Ledger
    queue: QueueRecord
    jobs: dict[str, QueuedJob]
    lanes: list[Lane]
    provider: Provider
    console: Console
    hooks: QueueHooks = field(default_factory=QueueHooks)
    stop_reason: str | None = None  # the budget or the deadline reached: no job starts any more
    cancelled: threading.Event = field(default_factory=threading.Event)
    detach_requested: str | None = None
    active: dict[int, JobRunner] = field(default_factory=dict)  # lane index -> its running job
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, attach: bool = False) -> None:
        """Every lane to its end; up to `parallel` at a time, longest first. With `attach`, a lane's job that is
        under way (its client went away) is taken over first. DetachRequested when the user detached."""
        if self.queue.parallel <= 1 or len(self.lanes) == 1:
            for index in range(len(self.lanes)):
                self._run_lane(index, attach)
            return
        pool = ThreadPoolExecutor(max_workers=self.queue.parallel, thread_name_prefix="rentrain-lane")
        futures = [pool.submit(self._run_lane, index, attach) for index in range(len(self.lanes))]
        try:
            while wait(futures, timeout=1.0).not_done:
                pass
        except KeyboardInterrupt:
            self.request_detach("Ctrl-C")  # nothing new starts; the driver asks whether to destroy or detach
            raise
        finally:
            pool.shutdown(wait=False)
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error

    def request_detach(self, reason: str) -> None:
        """From a signal handler: every running job detaches at its next safe point; no job starts after."""
        self.detach_requested = reason
        for runner in list(self.active.values()):
            runner.detach_requested = reason

    # ------------------------------------------------------------------ one lane

    def _run_lane(self, index: int, attach: bool) -> None:
        lane = self.lanes[index]
        if attach:
            self._take_over_running(index, lane)
        while not self.cancelled.is_set():
            if self.detach_requested:
                raise DetachRequested(self.detach_requested)
            session, lane.handed = lane.handed, None
            job_id = session.record.job_id if session is not None else self._next_job(lane)
            if job_id is None:
                return
            key = share_job_key(lane.key_of, job_id) if session is not None and lane.key_of else fresh_job_key(job_id)
            self._drive_job(index, self._runner(job_id, key), session)

    def _take_over_running(self, index: int, lane: Lane) -> None:
        """attach QUEUE: the lane's job that was under way when its client went away."""
        self._end_unfinished_hand_overs(lane)
        for job_id in [j for j in lane.jobs if self.ledger.job(j).is_open]:
            self._take_over(index, job_id)

    def _take_over(self, index: int, job_id: str) -> None:
        runner = self._runner(job_id, load_job_key(job_id))
        session = None
        if any(i.ended_at is None for i in self.ledger.instances(job_id)) and runner.job.remote_dir:
            session = runner.provisioner.reattach(runner.key.private_path, start_stopped=True)
        if session is None:
            if runner.job.result_path:
                runner.close("succeeded", "its result was home; only the teardown was left")
                return
            if runner.job.state != "destroying":  # its instance is gone: the next offer takes the job on
                runner.context.move("destroying", "its instance is gone")
            for record in self.ledger.instances(job_id, live_only=True):
                runner.teardown.destroy_instance(record, "unusable when the client came back")
            plain_printer(self.console)(
                f"job {job_id}'s instance is gone; resuming from {runner.job.last_state_path or 'the start'}"
            )
        self._drive_job(index, runner, session)

    def _end_unfinished_hand_overs(self, lane: Lane) -> None:
        """A client that died in the middle of a hand-over leaves a job not started with the instance: it is
        destroyed (the job starts on a rental of its own), never left billing."""
        for job_id in lane.jobs:
            if self.ledger.job(job_id).state != "planned":
                continue
            for record in self.ledger.instances(job_id, live_only=True):
                if record.instance_id is not None:
                    with suppress(NotFound):
                        self.provider.destroy(record.instance_id)
                ended = {"ended_at": time.time(), "end_reason": "destroyed on attach: a hand-over left unfinished"}
                self.ledger.update_instance(job_id, record.offer_id, record.created_at, **ended)

    def _next_job(self, lane: Lane) -> str | None:
        """The lane's next job to start; jobs that no longer fit the budget or the deadline are skipped."""
        skipped: list[JobRecord] = []
        chosen = None
        with self._lock:
            for job_id in lane.jobs:
                job = self.ledger.job(job_id)
                if job.state != "planned":
                    continue
                reason = self.stop_reason or self._does_not_fit(job_id)
                if reason is None:
                    chosen = job_id
                    break
                if self._skip(job, reason):
                    skipped.append(job)
        for job in skipped:  # reports and notifications, outside the lock: other lanes go on meanwhile
            self.hooks.job_ended(self.ledger.job(job.id))
        return chosen

    def _does_not_fit(self, job_id: str) -> str | None:
        estimate = self.jobs[job_id].estimate
        if estimate is None:
            return None
        if self.queue.max_cost is not None:
            left = self.queue.max_cost - self.ledger.queue_cost(self.queue.id) - self._committed()
            if estimate.cost_usd > left:
                return f"budget: ${max(left, 0):.2f} of ${self.queue.max_cost:.2f} left, the job's estimate is " + (
                    f"${estimate.cost_usd:.2f}"
                )
        if self.queue.deadline is not None:
            minutes_left = (self.queue.deadline - time.time()) / 60
            if estimate.total_hours * 60 > minutes_left:
                return (
                    f"deadline: {clock_time(self.queue.deadline)} is {max(minutes_left, 0):.0f} min away, "
                    f"the job's estimate is {estimate.total_hours * 60:.0f} min"
                )
        return None

    def _committed(self, but: str | None = None) -> float:
        """What the jobs running on the lanes (but job `but`) are still expected to cost: their estimate less what
        they cost so far. Money the budget keeps for them."""
        owed = 0.0
        for runner in [r for r in list(self.active.values()) if r.job.id != but]:
            estimate = self.jobs[runner.job.id].estimate
            if estimate is not None:
                owed += max(0.0, estimate.cost_usd - self.ledger.job_cost(runner.job.id))
        return owed

    def _skip(self, job: JobRecord, reason: str) -> bool:
        text = f"skipped: {reason}"
        try:
            self.ledger.transition(job.id, "closed", text, outcome="skipped", error=text)
        except IllegalTransition:
            return False  # `rentrain down QUEUE` closed it meanwhile
        plain_printer(self.console)(f"job {job.id} ({job.config_path}) {text}")
        return True

    def _runner(self, job_id: str, key: JobKey) -> JobRunner:
        queued = self.jobs[job_id]
        job = self.ledger.job(job_id)
        view = RunProgress(self.console)
        say = plain_printer(self.console)
        runner = JobRunner(self.ledger, job, queued.loaded, self.provider, queued.settings, key, view, say)
        return runner

    def _drive_job(self, index: int, runner: JobRunner, session: Session | None) -> None:
        """Run one job on the lane's instance (or a new rental); then the next job of the lane takes over the
        instance it leaves, if any."""
        lane = self.lanes[index]
        runner.hand_over = lambda ending: self._hand_over(lane, runner.job.id, ending)
        runner.context.reserved_by_others = lambda: self._committed(but=runner.job.id)
        runner.detach_requested = self.detach_requested
        self.active[index] = runner  # kept on Ctrl-C and detach: the driver acts on the runner
        job_id = runner.job.id
        say = plain_printer(self.console)
        say(f"job {job_id}: {runner.loaded.path}")
        try:
            with runner.context.view if self.queue.parallel <= 1 else nullcontext():
                runner.run(lane.offers, session=session)
        except (JobFailed, TransportError) as exc:  # the job's own failure; it is closed, the lane goes on
            say(f"job {job_id} failed: {exc}")
        self.active.pop(index, None)
        job = self.ledger.job(job_id)
        if job.state == "closed":
            runner.teardown.forget_key()
            self.hooks.job_ended(job)
        self._check_stop(job_id)

    def _check_stop(self, job_id: str) -> None:
        """The budget or the deadline reached: no job of the queue starts any more."""
        over = budget_reached(self.ledger, job_id, self.queue.max_cost) or deadline_reached(self.queue.deadline)
        with self._lock:
            if not over or self.stop_reason is not None:
                return
            self.stop_reason = over
        plain_printer(self.console)(f"queue {self.queue.id}: {over}; no further job starts")
        self.hooks.stopped(over)

    def _hand_over(self, lane: Lane, job_id: str, session: Session) -> bool:
        """The job is done with a healthy instance: the lane's next job that still fits takes it over (a new
        instance record for it, the old one ended at the same moment). False: nothing follows, destroy it."""
        if self.cancelled.is_set() or self.detach_requested:
            return False
        self._check_stop(job_id)
        next_id = self._next_job(lane)
        if next_id is None:
            return False
        # the ledger's record, not the session's copy: it has what was learnt since (SSH address, host key)
        old = next(
            i
            for i in self.ledger.instances(job_id)
            if (i.offer_id, i.created_at) == (session.record.offer_id, session.record.created_at)
        )
        detail = f"takes instance {old.instance_id} over from job {job_id}"
        try:
            record = self.ledger.hand_over_instance(old, next_id, detail)
        except IllegalTransition:
            return False  # `rentrain down QUEUE` cancelled it meanwhile
        root = posixpath.join(posixpath.dirname(session.layout.root), next_id)
        lane.handed = Session(
            record=record,
            remote=session.remote,
            layout=RemoteLayout(root=root),
            python=session.python,
            shared_model=session.shared_model or session.layout.model,
            handed_from=session.layout,
        )
        lane.key_of = job_id
        plain_printer(self.console)(f"job {next_id} takes the instance over from job {job_id}")
        return True
