"""The job runner: rent, sync, bootstrap, train, follow, fetch, destroy. Unattended, and nothing left billing.

Every state change goes to the ledger before it is acted on. Four guards keep an instance from billing
for nothing: this module's `finally` (and the CLI's signal handling), the ledger (`rentrain down`), the
watchdog on the instance, and the budget, checked before renting and while training.
"""

from __future__ import annotations

import json
import posixpath
import secrets
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, Field

from providers.base import (
    Instance,
    LaunchSpec,
    NoCapacity,
    NotFound,
    Offer,
    OfferGone,
    Provider,
    ProviderDown,
    ProviderError,
    SelfDestructRecipe,
)
from remote.config import JobSettings, LoadedConfig, model_source_kind
from remote.events import EVENTS_FILE, CheckpointEvent, DoneEvent, ErrorEvent, Event, SampleEvent, parse_event
from rentrain.fetch_limits import FetchLimits, fetch_limits
from rentrain.ledger import IllegalTransition, InstanceRecord, JobRecord, JobState, Ledger
from rentrain.paths import state_dir
from rentrain.progress import RunProgress
from rentrain.remote_job import (
    RemoteLayout,
    bootstrap_command,
    is_alive_command,
    job_root,
    payload_source,
    probe_workdir,
    remote_train_config,
    trainer_command,
    watchdog_command,
)
from rentrain.sshkeys import JobKey, forget_job_key
from rentrain.transport import (
    NETWORK_ERRORS,
    FetchBudget,
    FetchRefused,
    Remote,
    SshEndpoint,
    SshUnavailable,
    TransportError,
    UnknownHostKey,
    check_remote_path,
    user_known_hosts_files,
)
from rentrain.upload_list import list_dataset_files

Outcome = Literal["succeeded", "failed", "cancelled"]
T = TypeVar("T")

# The connection dropped (retried, then the host may count as lost). Any other TransportError is the job's
# own (a refused file name, a failed command, a host key that does not match): it ends the job, never a host.
CONNECTION_LOST = (*NETWORK_ERRORS, SshUnavailable)
# While setup runs, a second connection touches the instance's heartbeat this often: an upload holds the
# first one for as long as it takes, and the watchdog must not take that silence for a client gone.
SETUP_HEARTBEAT_SECONDS = 10
# Setup may take longer by the time the job's uploads need at this rate (4 Mbit/s, a slow home uplink).
UPLOAD_FLOOR_BYTES_PER_SECOND = 500_000


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

    @property
    def gpus(self) -> int:
        """The trainer's data-parallel processes on this instance: one per GPU it was rented with."""
        return self.record.gpu_count


def budget_reached(ledger: Ledger, job_id: str, max_cost: float | None) -> str | None:
    """The client's meter: a message once the job's billed time x price reaches the budget."""
    if max_cost is None:
        return None
    spent = ledger.job_cost(job_id)
    return f"budget reached: ${spent:.2f} of ${max_cost:.2f}" if spent >= max_cost else None


def _size_on_disk(path: Path) -> int:
    """Bytes in a file or under a folder (0 when it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class JobRunner:
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
        self.setup_deadline = 0.0  # set when the watchdog starts: setup must be done by then
        self.detach_requested: str | None = None  # set by signal handlers; acted on once the watchdog runs

    # ------------------------------------------------------------------ ledger helpers

    def _move(self, state: JobState, detail: str = "", **fields: object) -> None:
        try:
            self.job = self.ledger.transition(self.job.id, state, detail, **fields)
        except IllegalTransition as exc:
            if exc.from_state != "closed" or self.job.state == "closed":
                raise
            # another command (`rentrain down`) closed the job while this client followed it
            raise JobFailed(f"job {self.job.id} was closed meanwhile; a closed job is never reopened") from None

    def _end_instance_record(self, record: InstanceRecord, reason: str) -> None:
        self.ledger.update_instance(
            record.job_id, record.offer_id, record.created_at, ended_at=time.time(), end_reason=reason
        )

    # ------------------------------------------------------------------ the whole job

    def run(self, offers: list[Offer], detach_after_start: bool = False, session: Session | None = None) -> Outcome:
        """Provision in ranked order, train, fetch, destroy. Resumes on the next offer when a host dies.

        `session` continues on an instance the job already has (attach)."""
        assert self.provider is not None
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
                session = self.provision(offer)
                if session is None:
                    continue
                start: Callable[[], Outcome] = partial(self.train_on, session, detach_after_start)
            else:
                start = partial(self.continue_on, session)
            try:
                return start()
            except HostLost as exc:
                retries += 1
                self.say(f"host lost: {exc}")
                self.job = self.ledger.job(self.job.id)
                if self.job.state == "closed":  # `rentrain down` ended its instance, then closed it
                    session.remote.close()
                    raise JobFailed(
                        f"job {self.job.id} was closed meanwhile ({self.job.outcome}); not renting again"
                    ) from None
                self.ledger.record_failed_host(self.settings.provider, session.record.offer_id, f"lost mid-run: {exc}")
                self.destroy(session, f"host lost: {exc}")
                session = None
                spent = self._out_of_time_or_money()
                if spent:
                    self._close("failed", spent)
                    raise JobFailed(
                        f"{spent}; not renting again (the watchdog may have ended the instance for it)"
                    ) from None
                if retries > self.settings.max_retries:
                    self._close("failed", f"gave up after {retries} lost hosts")
                    raise JobFailed(f"gave up after {retries} lost hosts; last: {exc}") from None
                candidates = [
                    o for o in candidates if o.offer_id not in self.ledger.failed_hosts(self.settings.provider)
                ]
                self.say(f"resuming from {self.job.last_state_path or 'the start'} on the next offer")
        self._close("failed", f"no instance could be started ({tried} offers tried)")
        raise JobFailed(f"no instance could be started ({tried} offers tried); see rentrain offers")

    def _out_of_time_or_money(self) -> str | None:
        over = budget_reached(self.ledger, self.job.id, self.settings.max_cost)
        if over:
            return over
        if (
            self.settings.max_hours is not None
            and time.time() - self.job_started_at() >= self.settings.max_hours * 3600
        ):
            return f"deadline reached: {self.settings.max_hours} h since the first instance"
        return None

    def job_started_at(self) -> float:
        """When the job's first instance was asked for: --max-hours counts from here, across instances."""
        instances = [i for i in self.ledger.instances(self.job.id) if i.instance_id or i.provider == "ssh"]
        return instances[0].created_at if instances else time.time()

    def run_on_host(
        self, endpoint: SshEndpoint, key_path: Path, detach_after_start: bool = False, trust_new_host: bool = False
    ) -> Outcome:
        """--provider ssh: the same pipeline on a machine rented by hand; nothing to create or destroy. Its host
        key must be in the user's known_hosts (unless `trust_new_host`); it is pinned for the job either way."""
        gpus = "" if self.settings.gpus == 1 else f"{self.settings.gpus} GPUs, "
        record = InstanceRecord(
            job_id=self.job.id,
            provider="ssh",
            offer_id=f"{endpoint.user}@{endpoint.host}:{endpoint.port}",
            gpu=f"{gpus}machine rented by hand",
            gpu_count=self.settings.gpus,
            usd_per_hour=0.0,
            created_at=time.time(),
        )
        self.ledger.add_instance(record)
        self._move("intent_recorded", f"ssh {record.offer_id}")
        self._move("waiting_ssh")
        try:
            remote = Remote(
                endpoint,
                key_path,
                None,
                on_first_key=lambda key: self._pin(record, key),
                known_hosts_files=user_known_hosts_files(endpoint.host),
                trust_new_host=trust_new_host,
            )
            remote.connect_with_retries(attempts=3)
        except TransportError as exc:
            trust = isinstance(exc, UnknownHostKey)
            hint = " Or, to trust it on first use, run again with --trust-new-host." if trust else ""
            self._end_instance_record(record, f"not connected: {exc}")
            self._close("failed", f"could not connect: {exc}")
            raise JobFailed(f"{exc}{hint}") from None
        self._record_connected(record, endpoint)
        layout = RemoteLayout(root=job_root(probe_workdir(remote), self.job.id))
        return self.train_on(Session(record=record, remote=remote, layout=layout), detach_after_start)

    def reattach(self, key_path: Path, start_stopped: bool = True) -> Session | None:
        """The session of a job whose client went away: same instance, same pinned host key. A stopped
        instance (the watchdog keeping unfetched results) is started again when `start_stopped`, and gets
        a watchdog again. None when the instance is gone (it is destroyed if anything of it is left)."""
        live = [i for i in self.ledger.instances(self.job.id) if i.ended_at is None and i.ssh_host]
        if not live or not self.job.remote_dir:
            raise JobFailed(f"job {self.job.id} has no running instance to attach to (state {self.job.state})")
        record = live[-1]
        assert record.ssh_port is not None and record.ssh_user is not None
        endpoint = SshEndpoint(host=record.ssh_host or "", port=record.ssh_port, user=record.ssh_user)
        restarted = False
        if self.provider is not None and record.instance_id is not None:
            current, restarted = self._current_endpoint(record, start_stopped)
            if current is None:
                self.destroy_instance(record, "unusable when the client came back")
                return None
            endpoint = current
        remote = Remote(endpoint, key_path, record.host_key, on_first_key=lambda key: self._pin(record, key))
        session = Session(record=record, remote=remote, layout=RemoteLayout(root=self.job.remote_dir))
        try:
            remote.connect_with_retries(attempts=3)
            python_file = shlex.quote(posixpath.join(session.layout.root, "python"))
            session.python = remote.run(f"cat {python_file}", check=False).stdout.strip() or "python3"
            if restarted:
                self._guard_restarted(session)
        except (*NETWORK_ERRORS, TransportError):
            pass  # follow() tells a dead host from a slow network
        return session

    def _guard_restarted(self, session: Session) -> None:
        """A restarted instance has no watchdog: start one that only watches for the client going away
        (its deadline and budget were what stopped it)."""
        self._heartbeat(session, force=True)
        settings = {**self._watchdog_settings(session), "started_at": time.time(), "max_hours": None, "max_cost": None}
        self._write_remote_file(session, session.layout.watchdog_settings, json.dumps(settings))
        session.remote.run(f"rm -f {shlex.quote(posixpath.join(session.layout.root, 'watchdog.pid'))}")
        session.remote.run(watchdog_command(session.layout))

    def _current_endpoint(self, record: InstanceRecord, start_stopped: bool) -> tuple[SshEndpoint | None, bool]:
        """Where the instance answers SSH now (a restart may move its port), and whether it was started."""
        assert self.provider is not None and record.instance_id is not None
        try:
            instance = self.provider.get(record.instance_id)
        except NotFound:
            return None, False
        if instance.status in ("exited", "gone"):
            return None, False
        started = False
        if instance.status == "stopped":
            if not start_stopped:
                raise JobFailed(
                    f"instance {instance.id} is stopped (its watchdog kept the results): "
                    f"`rentrain attach {self.job.id}` starts it, fetches and destroys; "
                    f"`rentrain down {self.job.id}` destroys it"
                )
            self.say(f"instance {instance.id} was stopped by its watchdog to keep unfetched results; starting it")
            self.provider.start(instance.id)
            started = True
        if instance.status != "running" or instance.ssh is None:
            endpoint = self._wait_for_ssh(instance)
            if endpoint is None:
                return None, started
        else:
            endpoint = SshEndpoint(host=instance.ssh.host, port=instance.ssh.port, user=instance.ssh.user)
        self.ledger.update_instance(
            record.job_id, record.offer_id, record.created_at, ssh_host=endpoint.host, ssh_port=endpoint.port
        )
        return endpoint, started

    def continue_on(self, session: Session) -> Outcome:
        """Finish a job from wherever its client stopped."""
        with self._destroy_on_failure(session):
            if self.job.state in ("intent_recorded", "creating", "waiting_ssh", "syncing", "bootstrapping", "watchdog"):
                self.prepare(session)
            if self.job.state == "destroying":
                self.destroy(session, "finishing an interrupted destroy")
                outcome: Outcome = "succeeded" if self.job.result_path else "failed"
                self._close(outcome, "destroyed on attach")
                return outcome
            if self.job.state == "fetching":
                self.job = self.ledger.transition(self.job.id, "following", "re-reading events on attach")
                self.events_offset = 0
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
            self.fetch_logs(session)
            self.destroy(session, f"{type(exc).__name__}: {exc}")
            if self.job.state != "closed":
                self._close("failed", f"{type(exc).__name__}: {exc}")
            raise

    def _close(self, outcome: Outcome, detail: str, error: str | None = None, **fields: object) -> None:
        self._sweep_label()
        failure = error or (detail if outcome != "succeeded" else None)
        self._move("closed", detail, outcome=outcome, error=failure, **fields)

    def close(self, outcome: Outcome, detail: str) -> None:
        """Close the job from outside the runner (the CLI after Ctrl-C), with the same last label sweep; a job
        already closed (the Ctrl-C came as it closed) stays as it was."""
        self.job = self.ledger.job(self.job.id)
        if self.job.state != "closed":
            self._close(outcome, detail)

    def _sweep_label(self) -> None:
        """The job's last guard before it closes: an instance with its label that no record of it ended (a
        create that answered after its timeout and after the create window) is destroyed now."""
        if self.provider is None:
            return
        try:
            destroyed = self._destroy_labelled()
        except ProviderError as exc:
            self.say(
                f"could not check {self.settings.provider} for instances labelled {self.job.label} "
                f"({exc.message}): one may still be billing; run: rentrain down {self.job.id}"
            )
            return
        for instance_id in destroyed:
            self.say(f"destroyed instance {instance_id}: it carried this job's label but no record of it")

    # ------------------------------------------------------------------ provisioning

    def provision(self, offer: Offer) -> Session | None:
        assert self.provider is not None
        record = InstanceRecord(
            job_id=self.job.id,
            provider=offer.provider,
            offer_id=offer.offer_id,
            gpu=f"{offer.gpu_count}x {offer.gpu_model}",
            gpu_count=offer.gpu_count,
            usd_per_hour=offer.price_per_hour,
            created_at=time.time(),
        )
        self.ledger.add_instance(record)
        self._move("intent_recorded", f"offer {offer.offer_id}: {record.gpu} at ${offer.price_per_hour:.3f}/h")
        self._move("creating")
        launch = LaunchSpec(
            job_id=self.job.id,
            image=self.settings.image,
            disk_gb=self.settings.disk_gb,
            ssh_public_key=self.key.public_line,
        )
        try:
            instance = self.provider.create(offer, launch)
        except (OfferGone, NoCapacity) as exc:
            self.say(f"offer {offer.offer_id} ({offer.gpu_model}) is gone: {exc.message}; taking the next")
            self._end_instance_record(record, f"not created: {exc.message}")
            return None
        except ProviderError as exc:
            # a timeout or a 5xx says nothing of what the provider did: it may still make the machine
            on_the_wire = isinstance(exc, ProviderDown) or type(exc) is ProviderError
            self.say(f"creating on offer {offer.offer_id} failed: {exc.message}")
            self._adopt_by_label(record, f"create failed: {exc.message}", wait=on_the_wire)
            self.say("taking the next offer")
            return None
        record = record.model_copy(update={"instance_id": instance.id})
        self.ledger.update_instance(record.job_id, record.offer_id, record.created_at, instance_id=instance.id)
        self._move("waiting_ssh", f"instance {instance.id}")
        self.say(
            f"rented {record.gpu} ({offer.provider} instance {instance.id}) "
            f"at ${offer.price_per_hour:.3f}/h; waiting for SSH"
        )
        endpoint = self._wait_for_ssh(instance)
        if endpoint is None:
            self.ledger.record_failed_host(self.settings.provider, offer.offer_id, "SSH never became reachable")
            self.destroy_instance(record, "SSH never became reachable")
            return None
        remote = Remote(endpoint, self.key.private_path, None, on_first_key=lambda key: self._pin(record, key))
        try:
            remote.connect_with_retries(attempts=max(2, int(self.settings.ssh_wait_seconds // 5)), max_delay=5)
            self._record_connected(record, endpoint)
            root = job_root(probe_workdir(remote), self.job.id)
        except (*NETWORK_ERRORS, TransportError) as exc:
            self.say(f"instance {instance.id} is not usable over SSH: {exc}")
            self.ledger.record_failed_host(self.settings.provider, offer.offer_id, f"SSH failed: {exc}")
            remote.close()
            self.destroy_instance(record, f"SSH failed: {exc}")
            return None
        return Session(record=record, remote=remote, layout=RemoteLayout(root=root))

    def _record_connected(self, record: InstanceRecord, endpoint: SshEndpoint) -> None:
        """The instance answered SSH: from now on `attach`, `logs` and `fetch` reach it there."""
        self.ledger.update_instance(
            record.job_id,
            record.offer_id,
            record.created_at,
            running_at=time.time(),
            ssh_host=endpoint.host,
            ssh_port=endpoint.port,
            ssh_user=endpoint.user,
        )

    def _pin(self, record: InstanceRecord, host_key: str) -> None:
        self.ledger.update_instance(record.job_id, record.offer_id, record.created_at, host_key=host_key)

    def _adopt_by_label(self, record: InstanceRecord, reason: str, wait: bool = True) -> None:
        """A create that failed on the wire may still make a machine, after its answer timed out too: with
        `wait`, look for the job's label until create_window_seconds after the create was sent, and destroy
        what turns up. The record stays open (so `rentrain down` keeps looking) until the provider was asked."""
        assert self.provider is not None
        until = record.created_at + self.settings.create_window_seconds if wait else 0.0
        if until > time.time():
            self.say(f"looking for an instance that create may still make, for up to {until - time.time():.0f} s")
        while True:
            try:
                found = self._destroy_labelled()
            except ProviderError as exc:
                if time.time() < until:
                    self.sleep(self.settings.poll_seconds)
                    continue
                raise JobFailed(
                    f"could not check for a half-created instance ({exc.message}); run: rentrain down {self.job.id}"
                ) from None
            for instance_id in found:
                self.say(f"destroyed instance {instance_id} that the failed create left behind")
            if found:
                self.ledger.update_instance(record.job_id, record.offer_id, record.created_at, instance_id=found[0])
            if found or time.time() >= until:
                break
            self.sleep(self.settings.poll_seconds)
        self._end_instance_record(record, reason)

    def _destroy_labelled(self) -> list[str]:
        """Destroy every instance with this job's label that is neither gone nor ended in the ledger; their ids."""
        assert self.provider is not None
        ended = {i.instance_id for i in self.ledger.instances(self.job.id) if i.ended_at is not None}
        destroyed = []
        for instance in self.provider.list_instances(self.job.label):
            if instance.label != self.job.label or instance.status == "gone" or instance.id in ended:
                continue
            try:
                self.provider.destroy(instance.id)
            except NotFound:
                continue
            destroyed.append(instance.id)
        return destroyed

    def _wait_for_ssh(self, instance: Instance) -> SshEndpoint | None:
        assert self.provider is not None
        deadline = time.time() + self.settings.ssh_wait_seconds
        while time.time() < deadline:
            try:
                current = self.provider.get(instance.id)
            except NotFound:
                return None
            except ProviderError as exc:
                self.say(f"provider error while waiting: {exc.message}")
                current = None
            if current is not None:
                if current.status in ("exited", "gone"):
                    self.say(
                        f"instance {instance.id} {current.provider_status}: "
                        f"{current.status_message or 'no reason given'}"
                    )
                    return None
                if current.status == "running" and current.ssh is not None:
                    return SshEndpoint(host=current.ssh.host, port=current.ssh.port, user=current.ssh.user)
            self.sleep(self.settings.poll_seconds)
        self.say(f"instance {instance.id} was not reachable within {self.settings.ssh_wait_seconds:.0f} s")
        return None

    # ------------------------------------------------------------------ one instance, start to end

    def train_on(self, session: Session, detach_after_start: bool = False) -> Outcome:
        with self._destroy_on_failure(session):
            self.prepare(session)
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
            final = self.follow(session)
        except BudgetReached as exc:
            self._stop_trainer(session)
            self.fetch_outputs(session, final=None)
            self.destroy(session, str(exc))
            self._close("failed", str(exc))
            return "failed"
        if isinstance(final, DoneEvent):
            try:
                self.fetch_outputs(session, final)
            except CONNECTION_LOST as exc:
                # the instance holds the only copy: leave it to its watchdog, which stops (not destroys) it
                raise DetachRequested(
                    f"the result could not be fetched ({exc}); the instance keeps it. Try again with "
                    f"rentrain attach {self.job.id}"
                ) from None
            self.destroy(session, "training done and results home")
            self._close(
                "succeeded", f"{final.path} fetched", result_path=str(self.output_dir / posixpath.basename(final.path))
            )
            return "succeeded"
        self.fetch_logs(session)
        self.destroy(session, f"training failed: {final.message}")
        self._close("failed", f"trainer error ({final.kind})", error=final.message)
        return "failed"

    def prepare(self, session: Session) -> None:
        """Set the instance up and start the trainer. The watchdog starts first, as soon as the payload is there:
        from then on a client that dies leaves the instance to it. Each step is idempotent and outlives SSH
        drops (reconnect, run it again) until the host counts as lost."""
        remote, layout = session.remote, session.layout
        self._move("syncing", f"to {layout.root}", remote_dir=layout.root, events_offset=0)
        folders = shlex.join([layout.root, layout.output, layout.model])
        self._setup_step(session, "creating the job folder", lambda: remote.run(f"mkdir -p {folders}"))
        payload = posixpath.join(layout.payload, "remote")
        self._setup_step(
            session,
            "uploading the trainer",
            lambda: remote.upload_tree(payload_source(), payload, self.scratch, exclude=("__pycache__", "*.pyc")),
        )
        self._start_watchdog(session)
        with self._setup_heartbeats(session):
            resume = self._set_up(session)
        on = f" on {session.gpus} GPUs (data parallel)" if session.gpus > 1 else ""
        self._move("training", (f"resume from {resume}" if resume else "fresh start") + on)
        self._setup_step(session, "clearing old events", lambda: remote.run(f"rm -f {shlex.quote(layout.events)}"))
        self.events_offset = 0
        self.ledger.update_job(self.job.id, events_offset=0, remote_dir=layout.root)
        command = trainer_command(layout, session.python, resume, session.gpus)
        self._setup_step(session, "starting the trainer", lambda: remote.run(command))

    def _set_up(self, session: Session) -> str | None:
        """Bootstrap on the instance while the job's files upload; wait for both. The resume state's path there."""
        remote, layout = session.remote, session.layout
        train = self.loaded.train
        fetch_on_instance = model_source_kind(train.pretrained_model_name_or_path) in ("hub", "url")
        self._move("bootstrapping", "in parallel with the dataset upload")
        model = train.pretrained_model_name_or_path if fetch_on_instance else ""

        def step(what: str, action: Callable[[], T]) -> T:
            return self._setup_step(session, what, action)

        step("starting the setup", lambda: remote.run(bootstrap_command(layout, model, session.gpus)))
        step("uploading the dataset", lambda: self._upload(session, train.train_data_dir, layout.dataset, "dataset"))
        reg = train.reg_data_dir
        if reg is not None:
            what = "regularisation images"
            step(f"uploading the {what}", lambda: self._upload(session, reg, layout.reg, what))
        step("uploading the base model", lambda: self._upload_model(session))
        prompts = train.sample_prompts
        if isinstance(prompts, Path):
            step("uploading the sample prompts", lambda: self._put_file(session, prompts, layout.sample_prompts))
        resume: str | None = step("uploading the training state", lambda: self._upload_resume_state(session))
        config = remote_train_config(train, layout)
        step("writing the config", lambda: self._write_remote_file(session, layout.config, config))
        session.python = step("waiting for the setup", lambda: self._await_bootstrap(session, fetch_on_instance))
        return resume

    def _setup_step(self, session: Session, what: str, step: Callable[[], T]) -> T:
        """Run one idempotent setup step; when SSH drops, reconnect and run it again, as the follow loop does,
        until the provider says the instance is down or SSH has been gone ssh_lost_seconds (HostLost)."""
        lost_since: float | None = None
        while True:
            try:
                return step()
            except CONNECTION_LOST as exc:
                if lost_since is None:
                    lost_since = time.time()
                    self.say(f"SSH dropped while {what} ({exc}); reconnecting")
                session.remote.close()
                self._check_host(session, lost_since, exc)
                self.sleep(self.settings.poll_seconds)

    def _start_watchdog(self, session: Session) -> None:
        """Guard 0: the watchdog runs before anything slow happens on the instance (packages, the model, the
        uploads), so a client killed during setup leaves it to end the instance."""
        self._move("watchdog")
        self.setup_deadline = time.time() + self._setup_limit()
        settings = json.dumps(self._watchdog_settings(session))
        layout = session.layout
        write = lambda: self._write_remote_file(session, layout.watchdog_settings, settings)  # noqa: E731
        self._setup_step(session, "writing the watchdog's settings", write)
        command = watchdog_command(layout)
        started = self._setup_step(session, "starting the watchdog", lambda: session.remote.run(command, check=False))
        if started.exit_code != 0:
            raise JobFailed(f"the watchdog did not start on the instance: {(started.stderr or started.stdout).strip()}")

    def _setup_limit(self) -> float:
        """Seconds this setup may take: setup_timeout_seconds, plus the uploads at UPLOAD_FLOOR_BYTES_PER_SECOND."""
        train = self.loaded.train
        sources = [train.train_data_dir, train.reg_data_dir, train.vae, self.job.last_state_path]
        if model_source_kind(train.pretrained_model_name_or_path) in ("local_file", "local_dir"):
            sources.append(train.pretrained_model_name_or_path)
        uploads = sum(_size_on_disk(Path(source)) for source in sources if source is not None)
        return self.settings.setup_timeout_seconds + uploads / UPLOAD_FLOOR_BYTES_PER_SECOND

    @contextmanager
    def _setup_heartbeats(self, session: Session) -> Iterator[None]:
        """Touch the heartbeat from a second connection while setup runs (see SETUP_HEARTBEAT_SECONDS)."""
        stop = threading.Event()
        remote = Remote(session.remote.endpoint, session.remote.key_path, session.remote.pinned_host_key)
        touch = f"touch {shlex.quote(session.layout.heartbeat)}"

        def beat() -> None:
            try:
                while True:
                    try:
                        remote.run(touch, timeout=30, retries=1)
                    except (*CONNECTION_LOST, TransportError):
                        remote.close()  # the main thread's setup step finds out whether the host is lost
                    if stop.wait(SETUP_HEARTBEAT_SECONDS):
                        return
            finally:
                remote.close()

        thread = threading.Thread(target=beat, name="rentrain-setup-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=2)  # one still connecting ends on its own; it is a daemon

    def _upload(self, session: Session, local: Path, remote_dir: str, what: str) -> None:
        """Only the folder's images and captions go up, in their N_name folders (rentrain.upload_list)."""
        listing = list_dataset_files(local, self.loaded.train.caption_extension)
        size = listing.bytes
        started = time.time()
        self.say(f"uploading the {what}: {listing.file_count} files, {size / 1e6:.1f} MB")
        session.remote.upload_files(local, listing.files, remote_dir, self.scratch)
        seconds = max(time.time() - started, 1e-3)
        self.say(f"uploaded the {what} in {seconds:.1f} s ({size / 1e6 / seconds:.1f} MB/s, checksummed)")

    def _put_file(self, session: Session, local: Path, path: str) -> None:
        sftp = session.remote.sftp()
        try:
            sftp.put(str(local), path)
        finally:
            sftp.close()

    def _write_remote_file(self, session: Session, path: str, text: str) -> None:
        sftp = session.remote.sftp()
        try:
            with sftp.open(path, "w") as handle:
                handle.write(text.encode())
        finally:
            sftp.close()

    def _upload_model(self, session: Session) -> None:
        train = self.loaded.train
        kind = model_source_kind(train.pretrained_model_name_or_path)
        source = Path(train.pretrained_model_name_or_path)
        if kind == "local_dir":
            session.remote.upload_tree(source, session.layout.model, self.scratch)
        elif kind == "local_file":
            staging = self.scratch / "model-upload"
            staging.mkdir(exist_ok=True)
            link = staging / source.name
            if not link.exists():
                link.symlink_to(source)
            session.remote.upload_tree(staging, session.layout.model, self.scratch)
        if train.vae is not None and Path(train.vae).exists():
            vae = Path(train.vae)
            staging = self.scratch / "vae-upload"
            staging.mkdir(exist_ok=True)
            if not (staging / vae.name).exists():
                (staging / vae.name).symlink_to(vae)
            session.remote.upload_tree(staging, posixpath.join(session.layout.model, "vae"), self.scratch)

    def _upload_resume_state(self, session: Session) -> str | None:
        state = self.job.last_state_path
        if not state:
            return None
        local = Path(state)
        target = posixpath.join(session.layout.output, local.name)
        session.remote.upload_tree(local, target, self.scratch)
        return target

    def _await_bootstrap(self, session: Session, model_fetched: bool) -> str:
        """Wait for bootstrap.sh (and the model download) until the setup deadline; the trainer's Python."""
        remote, layout = session.remote, session.layout
        read_exit = f"cat {shlex.quote(layout.bootstrap_exit)} 2>/dev/null"
        while not (code := remote.run(read_exit, check=False).stdout.strip()):
            self._before_setup_deadline("the instance's setup")
            self.sleep(self.settings.poll_seconds)
        events = remote.run(f"cat {shlex.quote(layout.bootstrap_events)}", check=False).stdout
        phases = [json.loads(line) for line in events.splitlines() if line.strip()]
        for phase in phases:
            mark = "ok" if phase.get("ok") else "FAILED"
            detail = str(phase.get("detail", ""))
            self.say(f"setup {phase.get('name')}: {mark} in {phase.get('seconds', 0):.1f} s ({detail})")
        if code != "0":
            failed = next((p for p in phases if not p.get("ok")), {"name": "bootstrap", "detail": f"exit {code}"})
            message = f"setup failed in phase {failed.get('name')}: {failed.get('detail')}"
            if failed.get("name") in ("packages", "gpu"):
                raise HostLost(f"a broken host: {message}")  # the next offer may well work
            raise JobFailed(message)  # python: the image's, the same on every offer
        if model_fetched:
            self._await_model(session)
        return remote.run(f"cat {shlex.quote(posixpath.join(layout.root, 'python'))}").stdout.strip() or "python3"

    def _await_model(self, session: Session) -> None:
        model_dir = shlex.quote(session.layout.model)
        probe = f"if [ -f {model_dir}/.ready ]; then echo ready; elif [ -f {model_dir}/.failed ]; then echo failed; fi"
        while (state := session.remote.run(probe, check=False).stdout.strip()) != "ready":
            if state == "failed":
                log = session.remote.run(f"tail -n 5 {shlex.quote(session.layout.root)}/model.log", check=False).stdout
                raise JobFailed(f"downloading the base model on the instance failed: {log.strip()}")
            self._before_setup_deadline("the base model download")
            self.sleep(self.settings.poll_seconds)

    def _before_setup_deadline(self, what: str) -> None:
        if time.time() >= self.setup_deadline:
            raise JobFailed(
                f"{what} did not finish within the setup's {self._setup_limit():.0f} s (the instance's watchdog "
                "ends it then too)"
            )

    def _watchdog_settings(self, session: Session) -> dict[str, object]:
        recipe: SelfDestructRecipe | None = self.provider.self_destroy_recipe() if self.provider is not None else None
        return {
            "started_at": self.job_started_at() if session.record.instance_id else session.record.created_at,
            "usd_per_hour": session.record.usd_per_hour,
            "max_hours": self.settings.max_hours,
            "max_cost": self._remaining_budget(session),
            "idle_timeout_seconds": self.settings.idle_timeout_minutes * 60,
            "setup_timeout_seconds": self._setup_limit(),
            "heartbeat_seconds": SETUP_HEARTBEAT_SECONDS,
            "poll_seconds": self.settings.watchdog_poll_seconds,
            "events_file": "output/events.jsonl",
            "recipe": recipe.model_dump() if recipe is not None else None,
        }

    def _remaining_budget(self, session: Session) -> float | None:
        """The budget left for this instance: the whole budget less what earlier instances of the job cost."""
        if self.settings.max_cost is None:
            return None
        earlier = sum(i.cost() for i in self.ledger.instances(self.job.id) if i.created_at != session.record.created_at)
        return max(0.0, self.settings.max_cost - earlier)

    # ------------------------------------------------------------------ following

    def follow(self, session: Session) -> DoneEvent | ErrorEvent:
        """Tail events.jsonl from the recorded byte offset until done or error, fetching checkpoints as they land."""
        self._move("following")
        lost_since: float | None = None
        while True:
            if self.detach_requested:
                raise DetachRequested(self.detach_requested)
            try:
                final = self._follow_once(session)
                lost_since = None
            except CONNECTION_LOST as exc:
                lost_since = lost_since or time.time()
                self._check_host(session, lost_since, exc)
                self.sleep(self.settings.poll_seconds)
                continue
            if final is not None:
                return final
            self._check_budget(session)
            self.sleep(self.settings.poll_seconds)

    def _follow_once(self, session: Session) -> DoneEvent | ErrorEvent | None:
        """Read and handle the complete new event lines; notice a trainer that ended without a result."""
        chunk = session.remote.read_from(session.layout.events, self.events_offset)
        self._heartbeat(session)
        complete = chunk[: chunk.rfind(b"\n") + 1]
        for line in complete.splitlines(keepends=True):
            final = None
            try:
                event = parse_event(line)
            except ValueError:
                event = None
            if event is not None:
                final = self._on_event(session, event, line)
            self._advance(len(line))
            if final is not None:
                return final
        if complete or self._trainer_alive(session):
            return None
        # the trainer is gone: one more read for a line written as it ended, then report what it said
        if b"\n" in session.remote.read_from(session.layout.events, self.events_offset):
            return None
        self._check_host(session, time.time(), RuntimeError("the trainer is gone"), grace=False)
        log = session.remote.run(f"tail -n 20 {shlex.quote(session.layout.trainer_log)}", check=False).stdout
        return ErrorEvent(kind="internal", message=f"the trainer exited without a result:\n{log.strip()}")

    def _advance(self, consumed: int) -> None:
        if consumed:
            self.events_offset += consumed
            self.ledger.update_job(self.job.id, events_offset=self.events_offset)

    def _heartbeat(self, session: Session, force: bool = False) -> None:
        if force or time.time() - self.last_heartbeat >= 10:
            session.remote.run(f"touch {shlex.quote(session.layout.heartbeat)}")
            self.last_heartbeat = time.time()
            self.ledger.update_job(self.job.id, client_seen_at=self.last_heartbeat)

    def _trainer_alive(self, session: Session) -> bool:
        return session.remote.run(is_alive_command(session.layout.trainer_pid), check=False).exit_code == 0

    def _check_host(self, session: Session, lost_since: float, error: Exception, grace: bool = True) -> None:
        """Raise HostLost when the provider says the instance is down, or SSH has been gone too long."""
        if self.provider is not None and session.record.instance_id is not None:
            try:
                instance = self.provider.get(session.record.instance_id)
                if instance.status in ("exited", "gone", "stopped"):
                    raise HostLost(f"instance {instance.id} is {instance.provider_status}")
            except NotFound:
                raise HostLost(f"instance {session.record.instance_id} no longer exists") from None
            except ProviderError:
                pass
        if grace and time.time() - lost_since >= self.settings.ssh_lost_seconds:
            raise HostLost(f"no SSH for {time.time() - lost_since:.0f} s ({error})")

    def _check_budget(self, session: Session) -> None:
        over = budget_reached(self.ledger, self.job.id, self.settings.max_cost)
        if over:
            raise BudgetReached(over)

    def _on_event(self, session: Session, event: Event, line: bytes) -> DoneEvent | ErrorEvent | None:
        """Show the event, keep it in the local events.jsonl, fetch what it announces."""
        self.view.handle(event)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with (self.output_dir / EVENTS_FILE).open("ab") as copy:
            copy.write(line.rstrip(b"\n") + b"\n")
        if hasattr(event, "step") and isinstance(event.step, int):
            self.ledger.update_job(self.job.id, last_step=event.step)
        if isinstance(event, CheckpointEvent):
            self._fetch_checkpoint(session, event)
        elif isinstance(event, SampleEvent):
            self._fetch_file(session, event.path, self.output_dir / "samples" / posixpath.basename(event.path), None)
        elif isinstance(event, (DoneEvent, ErrorEvent)):
            return event
        return None

    # ------------------------------------------------------------------ fetching

    @cached_property
    def fetch_limits(self) -> FetchLimits:
        return fetch_limits(self.loaded.train, self.job.total_steps)

    @cached_property
    def fetch_budget(self) -> FetchBudget:
        """What this client may still bring home of the job, over all its fetches."""
        return FetchBudget(self.fetch_limits.total_bytes)

    def _fetch_file(
        self, session: Session, remote_path: str, local: Path, sha256: str | None, attempts: int = 3
    ) -> Path:
        # LoRA files (checkpoint, done) come with their hash; sample grids without one
        limit = self.fetch_limits.lora if sha256 is not None else self.fetch_limits.sample
        root = session.layout.output
        for attempt in range(1, attempts + 1):
            try:
                return session.remote.download(remote_path, root, local, sha256, limit, self.fetch_budget)
            except FetchRefused:
                raise  # the host is hostile or broken: asking again cannot help
            except (*NETWORK_ERRORS, TransportError) as exc:
                if attempt == attempts or "never overwrites" in str(exc):
                    raise
                self.say(f"fetching {posixpath.basename(remote_path)} failed ({exc}); again")
                self.sleep(2**attempt)
        raise AssertionError("unreachable")

    def _fetch_checkpoint(self, session: Session, event: CheckpointEvent) -> None:
        if session.remote.remote_size(check_remote_path(event.path, session.layout.output)) is None:
            self.say(f"checkpoint {posixpath.basename(event.path)} is no longer on the instance (save_last_n_epochs)")
            return
        self._fetch_file(session, event.path, self.output_dir / posixpath.basename(event.path), event.sha256)
        if event.state_dir:
            name = posixpath.basename(check_remote_path(event.state_dir, session.layout.output))
            local = session.remote.download_tree(
                event.state_dir,
                session.layout.output,
                self.scratch / "states" / name,
                self.scratch,
                self.fetch_limits.state,
                self.fetch_budget,
            )
            self.ledger.update_job(self.job.id, last_state_path=str(local))

    def fetch_outputs(self, session: Session, final: DoneEvent | None) -> None:
        self._move("fetching")
        if final is not None:
            local_path = self.output_dir / posixpath.basename(final.path)
            local = self._fetch_file(session, final.path, local_path, final.sha256)
            self.ledger.update_job(self.job.id, result_path=str(local), result_sha256=final.sha256)
        session.remote.run(f"touch {shlex.quote(session.layout.fetched)}", check=False)

    def fetch_logs(self, session: Session) -> None:
        try:
            text = session.remote.run(f"tail -n 200 {shlex.quote(session.layout.trainer_log)}", check=False).stdout
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / f"trainer-{self.job.id}.log").write_text(text)
        except Exception as exc:
            self.say(f"could not keep the trainer's log: {exc}")

    def _stop_trainer(self, session: Session) -> None:
        pid_file = shlex.quote(session.layout.trainer_pid)
        session.remote.run(f"kill -TERM -$(cat {pid_file}) 2>/dev/null; sleep 2", check=False)
        for _ in range(30):
            if not self._trainer_alive(session):
                return
            self.sleep(1)

    # ------------------------------------------------------------------ ending

    def destroy(self, session: Session, reason: str) -> None:
        """End the session: destroy the instance (or, on a machine rented by hand, stop our processes)."""
        if self.provider is None:
            watchdog_pid = shlex.quote(posixpath.join(session.layout.root, "watchdog.pid"))
            trainer_pid = shlex.quote(session.layout.trainer_pid)
            with suppress(TransportError):
                session.remote.run(
                    f"kill $(cat {watchdog_pid} 2>/dev/null) 2>/dev/null; "
                    f"kill -TERM -$(cat {trainer_pid} 2>/dev/null) 2>/dev/null; true",
                    check=False,
                )
        session.remote.close()
        self.destroy_instance(session.record, reason)

    def destroy_instance(self, record: InstanceRecord, reason: str) -> None:
        """Destroy and confirm with the provider that it is gone; the ledger keeps the real cost."""
        self._move("destroying", reason)
        if self.provider is None:
            self._end_instance_record(record, reason)
            return
        if record.instance_id is None:
            self._adopt_by_label(record, reason)
            self._forget_key()  # a create cut short (Ctrl-C, a timeout) registered the key all the same
            return
        for attempt in range(6):
            try:
                self.provider.destroy(record.instance_id)
            except NotFound:
                pass
            except ProviderError as exc:
                self.say(f"destroy failed ({exc.message}); retrying")
                self.sleep(min(30, 2**attempt))
                continue
            if self._confirmed_gone(record.instance_id):
                self._end_instance_record(record, reason)
                self._forget_key()
                self.say(
                    f"instance {record.instance_id} destroyed; job cost so far ${self.ledger.job_cost(self.job.id):.4f}"
                )
                return
            self.sleep(min(30, 2**attempt))
        raise JobFailed(
            f"instance {record.instance_id} could not be confirmed destroyed: it may still bill. "
            f"Run: rentrain down {self.job.id}"
        )

    def _forget_key(self) -> None:
        """Once no instance of the job is left, take its key off the account where it went (RunPod): it
        would reach future pods. The ledger records the removal; one that fails stays pending for the
        next rentrain command."""
        if self.provider is None or not self.key.public_line or self.ledger.instances(self.job.id, live_only=True):
            return
        problem = forget_job_key(self.ledger, self.job.id, self.provider, self.key.public_line)
        if problem:
            self.say(f"warning: {problem}")

    def _confirmed_gone(self, instance_id: str) -> bool:
        assert self.provider is not None
        try:
            return self.provider.get(instance_id).status == "gone"
        except NotFound:
            return True
        except ProviderError:
            return False
