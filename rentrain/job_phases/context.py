"""What every phase of one job shares: its settings, its ledger record and the state moves, the host checks.

Every state change goes to the ledger before it is acted on (rentrain.job says which guards keep an instance
from billing for nothing).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from providers.base import Instance, NotFound, Provider, ProviderError
from remote.config import JobSettings, LoadedConfig
from rentrain.accounts import reconcile, record_created, record_started, watchdog_stops
from rentrain.job_phases.meter import JobMeter
from rentrain.ledger import IllegalTransition, InstanceRecord, JobRecord, JobState, Ledger
from rentrain.paths import state_dir
from rentrain.progress import RunProgress
from rentrain.remote_job import RemoteLayout, is_alive_command
from rentrain.sshkeys import JobKey
from rentrain.transport import NETWORK_ERRORS, Remote, SshUnavailable

Outcome = Literal["succeeded", "failed", "cancelled"]

# The connection dropped (retried, then the host may count as lost). Any other TransportError is the job's
# own (a refused file name, a failed command, a host key that does not match): it ends the job, never a host.
CONNECTION_LOST = (*NETWORK_ERRORS, SshUnavailable)

# The [rentrain] table's defaults: a run's settings named after its keys take theirs from here.
TABLE_DEFAULTS = JobSettings()


class RunSettings(BaseModel):
    provider: str
    max_cost: float | None = TABLE_DEFAULTS.max_cost
    max_hours: float | None = TABLE_DEFAULTS.max_hours
    idle_timeout_minutes: float = TABLE_DEFAULTS.idle_timeout_minutes
    max_offers: int = TABLE_DEFAULTS.max_offers
    max_retries: int = TABLE_DEFAULTS.max_retries
    image: str = TABLE_DEFAULTS.image
    disk_gb: int = TABLE_DEFAULTS.disk_gb
    ssh_wait_seconds: float = 600  # an instance not reachable by then is destroyed and the next offer taken
    # SSH gone this long while the provider still says running: the host counts as dead (destroyed, next offer,
    # resume). One poll that finds SSH gone takes ~15 s against a host that refuses connections and ~90 s
    # against one that stays silent (measured: Remote retries 5 connects of up to 15 s, 1-8 s apart); 120 s
    # allows two silent rounds, longer than the blips we know (an SSH proxy restarting, a laptop changing
    # networks: seconds to a minute), where 300 s let a dead host bill four to six rounds. A host the provider
    # reports exited is replaced at once.
    ssh_lost_seconds: float = 120
    # How long setup (SSH up -> trainer started) may take, client and watchdog alike, plus the job's uploads at
    # UPLOAD_FLOOR_BYTES_PER_SECOND. Measured on the simulator: 5 s (bootstrap 2.7 s: the gpu phase imports
    # torch). On a rented GPU with the default image: the train extra's wheels (~150 MB, bitsandbytes the
    # largest) install in 0.5-2 min, CUDA starts in seconds, and a 2-7 GB base model downloads in 0.5-2 min
    # at the 500-1000 Mbit/s most offers list, ~10 min at 100 Mbit/s. About 10 min on a slow host, x3.
    setup_timeout_seconds: float = 1800
    # After a create that failed on the wire (a timeout, a 5xx), the provider may still make the machine: its
    # label is looked for until this long after the create was sent. Our HTTP timeout is 30 s and front-end
    # proxies cut a request after ~100 s (Cloudflare's default), so an instance that such a create made is
    # listed by then; the job's last label sweep at its close is the second line.
    create_window_seconds: float = 120
    poll_seconds: float = 5
    watchdog_poll_seconds: float = 15
    identity: str | None = None  # --provider ssh: the user's own key for the machine rented by hand
    # GPUs per instance asked for (--gpus, else [rentrain] gpu_count): replacement offers are searched with
    # it. Each instance's own count (the processes the trainer runs there) is in its ledger record.
    gpus: int = Field(TABLE_DEFAULTS.gpu_count, ge=1, le=8)
    # --deadline: the unix time by which the job (a queue: its every job) has ended, client and watchdog alike
    deadline: float | None = None
    # Training keys that differ from the config file's (`rentrain continue`: more epochs, its own output_name);
    # every command that loads a job's config applies them (rentrain.job_config).
    train_overrides: dict[str, Any] = {}


class JobFailed(Exception):
    pass


class HostLost(Exception):
    pass


class DetachRequested(Exception):
    """Leave the instance running under its watchdog; `rentrain attach` takes over later."""


class BudgetReached(Exception):
    pass


@dataclass
class Session:
    """One instance in use by the job."""

    record: InstanceRecord
    remote: Remote
    layout: RemoteLayout
    python: str = "python3"
    # A queue's later job on the same rental: the base model folder its first job set up (linked, not fetched
    # again), and the folder of the job before it there (whose watchdog stops once this job's runs).
    shared_model: str | None = None
    handed_from: RemoteLayout | None = None

    @property
    def gpus(self) -> int:
        """The trainer's data-parallel processes on this instance: one per GPU it was rented with."""
        return self.record.gpu_count


def budget_reached(ledger: Ledger, job_id: str, max_cost: float | None) -> str | None:
    """The client's meter: a message once the billed time x price reaches the budget: the job's own, or for a
    job of a queue the queue's (all its jobs together)."""
    if max_cost is None:
        return None
    queue_id = ledger.job(job_id).queue_id
    spent = ledger.queue_cost(queue_id) if queue_id else ledger.job_cost(job_id)
    whose = "the queue's " if queue_id else ""
    return f"budget reached: ${spent:.2f} of {whose}${max_cost:.2f}" if spent >= max_cost else None


def deadline_reached(deadline: float | None, now: float | None = None) -> str | None:
    if deadline is None or (time.time() if now is None else now) < deadline:
        return None
    return f"deadline reached: {clock_time(deadline)}"


def clock_time(at: float) -> str:
    """A unix time as the user's local clock shows it."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(at))


def trainer_alive(session: Session) -> bool:
    return session.remote.run(is_alive_command(session.layout.trainer_pid), check=False).exit_code == 0


class JobContext:
    """One job as every phase sees it: its ledger record (moved only through `move`), its provider (None on a
    machine rented by hand), its settings and key, where it keeps files, and how it talks to the user."""

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
        self.ledger = ledger
        self.job = job
        self.loaded = loaded
        self.provider = provider
        self.settings = settings
        self.key = key
        self.view = view
        self.say = say
        self.sleep = sleep
        self.scratch = state_dir() / "jobs" / job.id
        self.scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.output_dir = Path(job.output_dir)
        self.events_offset = job.events_offset
        self.last_heartbeat = 0.0
        self.detach_requested: str | None = None  # set by signal handlers; acted on once the watchdog runs
        self.meter = JobMeter()  # what this client measures of the job, recorded when it closes
        # A queue's lanes side by side: what the other lanes' running jobs are still expected to cost, kept out
        # of the budget this job's watchdog gets
        self.reserved_by_others: Callable[[], float] = lambda: 0.0

    def move(self, state: JobState, detail: str = "", **fields: object) -> None:
        try:
            self.job = self.ledger.transition(self.job.id, state, detail, **fields)
        except IllegalTransition as exc:
            if exc.from_state != "closed" or self.job.state == "closed":
                raise
            # another command (`rentrain down`) closed the job while this client followed it
            raise JobFailed(f"job {self.job.id} was closed meanwhile; a closed job is never reopened") from None

    def end_instance_record(self, record: InstanceRecord, reason: str, at: float | None = None) -> None:
        """The record is over: its instance was destroyed (and that confirmed), or never made. Its billing ends
        `at` (default: now)."""
        ended_at = time.time() if at is None else at
        self.ledger.update_instance(
            record.job_id, record.offer_id, record.created_at, ended_at=ended_at, end_reason=reason
        )

    def instance_created(self, record: InstanceRecord, instance: Instance) -> InstanceRecord:
        """The create answered: the record gets the instance's id and starts billing (rentrain.accounts)."""
        return record_created(self.ledger, record, instance, answered_at=time.time())

    def saw_instance(self, instance: Instance, following: bool = True) -> None:
        """What the provider said of one of the job's instances now: its live record's billing follows it. Not
        `following`: this client just came back to the job (attach), so a change it finds may be old."""
        for record in self.ledger.instances(self.job.id, live_only=True):
            if record.provider == instance.provider and record.instance_id == instance.id:
                reconcile(self.ledger, record, instance, following=following)

    def instance_started(self, record: InstanceRecord, at: float) -> None:
        record_started(self.ledger, record, at)

    def read_watchdog_record(self, session: Session) -> None:
        """Once a stopped instance answers SSH again: when its watchdog stopped it, from the watchdog's own log,
        replaces the guess the ledger made (the last time rentrain saw it running)."""
        log = session.remote.run(f"cat {shlex.quote(session.layout.watchdog_log)}", check=False).stdout
        for stopped_at in watchdog_stops(log):
            self.ledger.place_change(session.record, "stopped", stopped_at, "the watchdog's record")

    def job_started_at(self) -> float:
        """When the job's first instance was asked for: --max-hours counts from here, across instances."""
        instances = [i for i in self.ledger.instances(self.job.id) if i.instance_id or i.provider == "ssh"]
        return instances[0].created_at if instances else time.time()

    def heartbeat(self, session: Session, force: bool = False) -> None:
        if force or time.time() - self.last_heartbeat >= 10:
            session.remote.run(f"touch {shlex.quote(session.layout.heartbeat)}")
            self.last_heartbeat = time.time()
            self.ledger.update_job(self.job.id, client_seen_at=self.last_heartbeat)
            self.ledger.saw_instance(session.record, "running", self.last_heartbeat)

    def check_host(self, session: Session, lost_since: float, error: Exception, grace: bool = True) -> None:
        """Raise HostLost when the provider says the instance is down, or SSH has been gone too long."""
        if self.provider is not None and session.record.instance_id is not None:
            try:
                instance = self.provider.get(session.record.instance_id)
                self.saw_instance(instance)
                if instance.status in ("exited", "gone", "stopped"):
                    raise HostLost(f"instance {instance.id} is {instance.provider_status}")
            except NotFound:
                raise HostLost(f"instance {session.record.instance_id} no longer exists") from None
            except ProviderError:
                pass
        if grace and time.time() - lost_since >= self.settings.ssh_lost_seconds:
            raise HostLost(f"no SSH for {time.time() - lost_since:.0f} s ({error})")
