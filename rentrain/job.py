"""The job runner: rent, sync, bootstrap, train, follow, fetch, destroy. Unattended, and nothing left billing.

Every state change goes to the ledger before it is acted on. Four guards keep an instance from billing
for nothing: this module's `finally` (and the CLI's signal handling), the ledger (`rentrain down`), the
watchdog on the instance, and the budget, checked before renting and while training.

Each phase is a module of rentrain.job_phases, sharing one JobContext; JobRunner composes them into a job.
"""

from __future__ import annotations

import posixpath
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from providers.base import Offer, Provider
from remote.config import LoadedConfig
from remote.events import DoneEvent, ErrorEvent
from rentrain.job_phases.context import (
    CONNECTION_LOST,
    BudgetReached,
    DetachRequested,
    HostLost,
    JobContext,
    JobFailed,
    Outcome,
    RunSettings,
    Session,
    budget_reached,
    deadline_reached,
)
from rentrain.job_phases.fetch import Fetcher
from rentrain.job_phases.follow import Follower
from rentrain.job_phases.prepare import Preparer
from rentrain.job_phases.provision import Provisioner
from rentrain.job_phases.teardown import Teardown
from rentrain.ledger import JobRecord, Ledger
from rentrain.progress import RunProgress
from rentrain.sshkeys import JobKey
from rentrain.transport import SshEndpoint

__all__ = [
    "BudgetReached",
    "DetachRequested",
    "HostLost",
    "JobFailed",
    "JobRunner",
    "Outcome",
    "RunSettings",
    "Session",
    "budget_reached",
    "new_job_id",
]


# Trainer errors that come from the job itself (its config, model, data, its size for the GPU, a training that
# diverged): the instance stays fit for another job. Any other ("internal": a crash, a CUDA fault) may be the
# host's.
JOB_ERRORS = frozenset({"config", "model", "data", "out_of_memory", "diverged"})


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class JobRunner:
    """One job, start to end, composed of its phases (rentrain.job_phases): provision, prepare, follow, fetch,
    teardown. They share one JobContext: the job's ledger record, provider, settings and key."""

    def __init__(
        self,
        ledger: Ledger,
        job: JobRecord,
        loaded: LoadedConfig,
        provider: Provider | None,
        settings: RunSettings,
        key: JobKey,
        view: RunProgress,
        say: Callable[[str], None],
        sleep: Callable[[float], None] = time.sleep,
    ):
        """`say` shows one line of plain text: messages carry provider and host text, never markup."""
        self.context = JobContext(ledger, job, loaded, provider, settings, key, view, say, sleep)
        self.ledger, self.loaded, self.provider, self.settings, self.key = ledger, loaded, provider, settings, key
        self.teardown = Teardown(self.context)
        self.preparer = Preparer(self.context)
        self.provisioner = Provisioner(self.context, self.teardown, self.preparer)
        self.fetcher = Fetcher(self.context)
        self.context.meter.bytes_fetched = self.fetcher.bytes_fetched
        self.follower = Follower(self.context, self.fetcher)
        # Set by a queue: asked when training ended on a healthy instance (done, or failed by the job's own
        # error); True when the queue's next job has taken the instance over, so it is not destroyed.
        self.hand_over: Callable[[Session], bool] | None = None

    @property
    def job(self) -> JobRecord:
        """The job's ledger record as this client last saw it."""
        return self.context.job

    @job.setter
    def job(self, job: JobRecord) -> None:
        self.context.job = job

    @property
    def detach_requested(self) -> str | None:
        """Why the user asked to detach (set by signal handlers; acted on once the watchdog runs)."""
        return self.context.detach_requested

    @detach_requested.setter
    def detach_requested(self, reason: str | None) -> None:
        self.context.detach_requested = reason

    def run(self, offers: list[Offer], detach_after_start: bool = False, session: Session | None = None) -> Outcome:
        """Provision in ranked order, train, fetch, destroy. Resumes on the next offer when a host dies.

        `session` continues on an instance the job already has (attach)."""
        assert self.provider is not None
        self.context.meter.offers.update((offer.offer_id, offer) for offer in offers)
        failed_hosts = self.ledger.failed_hosts(self.settings.provider)
        candidates = [o for o in offers if o.offer_id not in failed_hosts][: self.settings.max_offers]
        retries = 0
        tried = 0
        while True:
            if session is None:
                if not candidates:
                    break
                offer = candidates.pop(0)
                tried += 1
                session = self.provisioner.provision(offer)
                if session is None:
                    continue
                start: Callable[[], Outcome] = partial(self.train_on, session, detach_after_start)
            else:
                start = partial(self.continue_on, session)
            try:
                return start()
            except HostLost as exc:
                retries += 1
                self.context.say(f"host lost: {exc}")
                self.job = self.ledger.job(self.job.id)
                if self.job.state == "closed":  # `rentrain down` ended its instance, then closed it
                    session.remote.close()
                    raise JobFailed(
                        f"job {self.job.id} was closed meanwhile ({self.job.outcome}); not renting again"
                    ) from None
                self.ledger.record_failed_host(self.settings.provider, session.record.offer_id, f"lost mid-run: {exc}")
                self.teardown.destroy(session, f"host lost: {exc}")
                session = None
                spent = self._out_of_time_or_money()
                if spent:
                    self.teardown.close_job("failed", spent)
                    raise JobFailed(
                        f"{spent}; not renting again (the watchdog may have ended the instance for it)"
                    ) from None
                if retries > self.settings.max_retries:
                    self.teardown.close_job("failed", f"gave up after {retries} lost hosts")
                    raise JobFailed(f"gave up after {retries} lost hosts; last: {exc}") from None
                candidates = [
                    o for o in candidates if o.offer_id not in self.ledger.failed_hosts(self.settings.provider)
                ]
                self.context.say(f"resuming from {self.job.last_state_path or 'the start'} on the next offer")
        self.teardown.close_job("failed", f"no instance could be started ({tried} offers tried)")
        raise JobFailed(f"no instance could be started ({tried} offers tried); see rentrain offers")

    def _out_of_time_or_money(self) -> str | None:
        over = budget_reached(self.ledger, self.job.id, self.settings.max_cost) or deadline_reached(
            self.settings.deadline
        )
        if over:
            return over
        if (
            self.settings.max_hours is not None
            and time.time() - self.context.job_started_at() >= self.settings.max_hours * 3600
        ):
            return f"deadline reached: {self.settings.max_hours} h since the first instance"
        return None

    def run_on_host(
        self, endpoint: SshEndpoint, key_path: Path, detach_after_start: bool = False, trust_new_host: bool = False
    ) -> Outcome:
        """--provider ssh: the same pipeline on a machine rented by hand; nothing to create or destroy. Its host
        key must be in the user's known_hosts (unless `trust_new_host`); it is pinned for the job either way."""
        session = self.provisioner.connect_by_hand(endpoint, key_path, trust_new_host)
        return self.train_on(session, detach_after_start)

    def continue_on(self, session: Session) -> Outcome:
        """Finish a job from wherever its client stopped."""
        with self._destroy_on_failure(session):
            if self.job.state in ("intent_recorded", "creating", "waiting_ssh", "syncing", "bootstrapping", "watchdog"):
                with self.context.meter.phase("prepare"):
                    self.preparer.prepare(session)
            if self.job.state == "destroying":
                self.teardown.destroy(session, "finishing an interrupted destroy")
                outcome: Outcome = "succeeded" if self.job.result_path else "failed"
                self.teardown.close_job(outcome, "destroyed on attach")
                return outcome
            if self.job.state == "fetching":
                self.job = self.ledger.transition(self.job.id, "following", "re-reading events on attach")
                self.context.events_offset = 0
            return self.follow_to_end(session)

    @contextmanager
    def _destroy_on_failure(self, session: Session) -> Iterator[None]:
        """Anything unexpected: keep the trainer's log, destroy the instance, close the job, re-raise.
        Detaching and a lost host are not failures of the job."""
        try:
            yield
        except (DetachRequested, HostLost):
            raise
        except Exception as exc:
            self.fetcher.fetch_logs(session)
            self.teardown.destroy(session, f"{type(exc).__name__}: {exc}")
            if self.job.state != "closed":
                self.teardown.close_job("failed", f"{type(exc).__name__}: {exc}")
            raise

    def close(self, outcome: Outcome, detail: str) -> None:
        """Close the job from outside the runner (the CLI after Ctrl-C), with the same last label sweep; a job
        already closed (the Ctrl-C came as it closed) stays as it was."""
        self.job = self.ledger.job(self.job.id)
        if self.job.state != "closed":
            self.teardown.close_job(outcome, detail)

    def train_on(self, session: Session, detach_after_start: bool = False) -> Outcome:
        with self._destroy_on_failure(session):
            with self.context.meter.phase("prepare"):
                self.preparer.prepare(session)
            if detach_after_start or self.detach_requested:
                raise DetachRequested(self.detach_requested or "--detach")
            return self.follow_to_end(session)

    @property
    def guarded(self) -> bool:
        """Whether setup is over and training runs: only then may the user choose to detach. The watchdog runs
        from the start of setup, so a client that dies before (kill -9) is covered too; but a user who stops
        it during setup is there to see the instance destroyed."""
        return self.job.state in ("training", "following", "fetching")

    def follow_to_end(self, session: Session) -> Outcome:
        try:
            with self.context.meter.phase("training"):
                final = self.follower.follow(session)
        except BudgetReached as exc:
            return self._stop_at_limit(session, str(exc))
        if isinstance(final, ErrorEvent) and final.kind == "interrupted":
            limit = self._out_of_time_or_money()
            if limit:  # the instance's watchdog stopped the trainer at the budget or the deadline
                return self._stop_at_limit(session, limit)
        if isinstance(final, DoneEvent):
            try:
                with self.context.meter.phase("fetch"):
                    self.fetcher.fetch_outputs(session, final)
            except CONNECTION_LOST as exc:
                # the instance holds the only copy: leave it to its watchdog, which stops (not destroys) it
                raise DetachRequested(
                    f"the result could not be fetched ({exc}); the instance keeps it. Try again with "
                    f"rentrain attach {self.job.id}"
                ) from None
            result_path = str(self.context.output_dir / posixpath.basename(final.path))
            self._release(session, "training done and results home")
            self.teardown.close_job("succeeded", f"{final.path} fetched", result_path=result_path)
            return "succeeded"
        self.fetcher.fetch_logs(session)
        if final.kind in JOB_ERRORS:  # the job's own: the host is fine for the queue's next job
            self._release(session, f"training failed: {final.message}")
        else:
            self.teardown.destroy(session, f"training failed: {final.message}")
        self.teardown.close_job("failed", f"trainer error ({final.kind})", error=final.message)
        return "failed"

    def _stop_at_limit(self, session: Session, reason: str) -> Outcome:
        """The budget or the deadline is reached: the trainer stops (saving its state), what it made comes
        home, the instance is destroyed."""
        try:
            self.fetcher.stop_trainer(session)
            with self.context.meter.phase("fetch"):
                self.fetcher.fetch_outputs(session, final=None)
        except CONNECTION_LOST:
            # the instance's watchdog, at the same limit, ended it first; the checkpoints fetched stay home
            self.context.say(f"{reason}: the instance's watchdog ended it first; what was fetched so far is home")
        self.teardown.destroy(session, reason)
        self.teardown.close_job("failed", reason)
        return "failed"

    def _release(self, session: Session, reason: str) -> None:
        """The job is done with the instance: the queue's next job takes it over, or it is destroyed."""
        if self.hand_over is None or not self.hand_over(session):
            self.teardown.destroy(session, reason)
