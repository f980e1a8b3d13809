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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from providers.base import (
    Instance,
    LaunchSpec,
    NoCapacity,
    NotFound,
    Offer,
    OfferGone,
    Provider,
    ProviderError,
    SelfDestructRecipe,
)
from remote.config import LoadedConfig, model_source_kind
from remote.events import EVENTS_FILE, CheckpointEvent, DoneEvent, ErrorEvent, Event, SampleEvent, parse_event
from rentrain.ledger import InstanceRecord, JobRecord, JobState, Ledger
from rentrain.paths import state_dir
from rentrain.progress import RunProgress
from rentrain.remote_job import (
    RemoteLayout,
    bootstrap_command,
    is_alive_command,
    job_root,
    payload_source,
    probe_workdir,
    remote_model_reference,
    remote_train_config,
    trainer_command,
    watchdog_command,
)
from rentrain.sshkeys import JobKey
from rentrain.transport import (
    NETWORK_ERRORS,
    Remote,
    SshEndpoint,
    SshUnavailable,
    TransportError,
    check_remote_path,
)

Outcome = Literal["succeeded", "failed", "cancelled"]


class RunSettings(BaseModel):
    provider: str
    max_cost: float | None = None
    max_hours: float | None = None
    idle_timeout_minutes: float = 20
    max_offers: int = 5
    max_retries: int = 2
    image: str = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
    disk_gb: int = 40
    ssh_wait_seconds: float = 600  # an instance not reachable by then is destroyed and the next offer taken
    ssh_lost_seconds: float = 300  # SSH gone this long while the provider has no news: the host counts as dead
    bootstrap_seconds: float = 1800
    poll_seconds: float = 5
    watchdog_poll_seconds: float = 15
    identity: str | None = None  # --provider ssh: the user's own key for the machine rented by hand
    # GPUs per instance asked for (--gpus, else [rentrain] gpu_count): replacement offers are searched with
    # it. Each instance's own count (the processes the trainer runs there) is in its ledger record.
    gpus: int = Field(1, ge=1, le=8)


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

    # ------------------------------------------------------------------ ledger helpers

    def _move(self, state: JobState, detail: str = "", **fields: object) -> None:
        self.job = self.ledger.transition(self.job.id, state, detail, **fields)

    def _end_instance_record(self, record: InstanceRecord, reason: str) -> None:
        self.ledger.update_instance(record.job_id, record.offer_id, record.created_at, ended_at=time.time(), end_reason=reason)

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
                start = lambda s=session: self.train_on(s, detach_after_start)  # noqa: E731
            else:
                start = lambda s=session: self.continue_on(s)  # noqa: E731
            try:
                return start()
            except HostLost as exc:
                retries += 1
                self.say(f"[yellow]host lost[/]: {exc}")
                self.ledger.record_failed_host(self.settings.provider, session.record.offer_id, f"lost mid-run: {exc}")
                self.destroy(session, f"host lost: {exc}")
                session = None
                self.job = self.ledger.job(self.job.id)
                if self.job.state == "closed":
                    raise JobFailed(f"job {self.job.id} was closed meanwhile ({self.job.outcome}); not renting again") from None
                spent = self._out_of_time_or_money()
                if spent:
                    self._close("failed", spent)
                    raise JobFailed(f"{spent}; not renting again (the watchdog may have ended the instance for it)") from None
                if retries > self.settings.max_retries:
                    self._close("failed", f"gave up after {retries} lost hosts")
                    raise JobFailed(f"gave up after {retries} lost hosts; last: {exc}") from None
                candidates = [o for o in candidates if o.offer_id not in self.ledger.failed_hosts(self.settings.provider)]
                self.say(f"resuming from {self.job.last_state_path or 'the start'} on the next offer")
        self._close("failed", f"no instance could be started ({tried} offers tried)")
        raise JobFailed(f"no instance could be started ({tried} offers tried); see rentrain offers")

    def _out_of_time_or_money(self) -> str | None:
        over = budget_reached(self.ledger, self.job.id, self.settings.max_cost)
        if over:
            return over
        if self.settings.max_hours is not None and time.time() - self.job_started_at() >= self.settings.max_hours * 3600:
            return f"deadline reached: {self.settings.max_hours} h since the first instance"
        return None

    def job_started_at(self) -> float:
        """When the job's first instance was asked for: --max-hours counts from here, across instances."""
        instances = [i for i in self.ledger.instances(self.job.id) if i.instance_id or i.provider == "ssh"]
        return instances[0].created_at if instances else time.time()

    def run_on_host(self, endpoint: SshEndpoint, key_path: Path, detach_after_start: bool = False) -> Outcome:
        """--provider ssh: the same pipeline on a machine rented by hand; nothing to create or destroy."""
        record = InstanceRecord(
            job_id=self.job.id,
            provider="ssh",
            offer_id=f"{endpoint.user}@{endpoint.host}:{endpoint.port}",
            gpu="machine rented by hand" if self.settings.gpus == 1 else f"{self.settings.gpus} GPUs, machine rented by hand",
            gpu_count=self.settings.gpus,
            usd_per_hour=0.0,
            created_at=time.time(),
        )
        self.ledger.add_instance(record)
        self._move("intent_recorded", f"ssh {record.offer_id}")
        self._move("waiting_ssh")
        remote = Remote(endpoint, key_path, None, on_first_key=lambda key: self._pin(record, key))
        remote.connect_with_retries(attempts=3)
        self.ledger.update_instance(
            record.job_id, record.offer_id, record.created_at,
            running_at=time.time(), ssh_host=endpoint.host, ssh_port=endpoint.port, ssh_user=endpoint.user,
        )
        session = Session(record=record, remote=remote, layout=RemoteLayout(root=job_root(probe_workdir(remote), self.job.id)))
        return self.train_on(session, detach_after_start)

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
        session.remote.run(watchdog_command(session.layout, session.python))

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
                    f"instance {instance.id} is stopped (its watchdog kept the results): `rentrain attach {self.job.id}` "
                    f"starts it, fetches and destroys; `rentrain down {self.job.id}` destroys it"
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
        failure = error or (detail if outcome != "succeeded" else None)
        self._move("closed", detail, outcome=outcome, error=failure, **fields)

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
            job_id=self.job.id, image=self.settings.image, disk_gb=self.settings.disk_gb, ssh_public_key=self.key.public_line
        )
        try:
            instance = self.provider.create(offer, launch)
        except (OfferGone, NoCapacity) as exc:
            self.say(f"offer {offer.offer_id} ({offer.gpu_model}) is gone: {exc.message}; taking the next")
            self._end_instance_record(record, f"not created: {exc.message}")
            return None
        except ProviderError as exc:
            self.say(f"[yellow]creating on offer {offer.offer_id} failed[/]: {exc.message}; taking the next")
            self._adopt_by_label(record, f"create failed: {exc.message}")
            return None
        record = record.model_copy(update={"instance_id": instance.id})
        self.ledger.update_instance(record.job_id, record.offer_id, record.created_at, instance_id=instance.id)
        self._move("waiting_ssh", f"instance {instance.id}")
        self.say(f"rented {record.gpu} ({offer.provider} instance {instance.id}) at ${offer.price_per_hour:.3f}/h; waiting for SSH")
        endpoint = self._wait_for_ssh(instance)
        if endpoint is None:
            self.ledger.record_failed_host(self.settings.provider, offer.offer_id, "SSH never became reachable")
            self.destroy_instance(record, "SSH never became reachable")
            return None
        remote = Remote(endpoint, self.key.private_path, None, on_first_key=lambda key: self._pin(record, key))
        try:
            remote.connect_with_retries(attempts=max(2, int(self.settings.ssh_wait_seconds // 5)), max_delay=5)
            self.ledger.update_instance(
                record.job_id, record.offer_id, record.created_at,
                running_at=time.time(), ssh_host=endpoint.host, ssh_port=endpoint.port, ssh_user=endpoint.user,
            )
            root = job_root(probe_workdir(remote), self.job.id)
        except (*NETWORK_ERRORS, TransportError) as exc:
            self.say(f"[yellow]instance {instance.id} is not usable over SSH[/]: {exc}")
            self.ledger.record_failed_host(self.settings.provider, offer.offer_id, f"SSH failed: {exc}")
            remote.close()
            self.destroy_instance(record, f"SSH failed: {exc}")
            return None
        return Session(record=record, remote=remote, layout=RemoteLayout(root=root))

    def _pin(self, record: InstanceRecord, host_key: str) -> None:
        self.ledger.update_instance(record.job_id, record.offer_id, record.created_at, host_key=host_key)

    def _adopt_by_label(self, record: InstanceRecord, reason: str) -> None:
        """A create that failed on the wire may still have made a machine: find it by label and end it.
        The record stays open (so `rentrain down` keeps looking) until the provider says nothing is there."""
        assert self.provider is not None
        try:
            for instance in self.provider.list_instances(f"rentrain-{self.job.id}"):
                self.provider.destroy(instance.id)
                self.say(f"destroyed instance {instance.id} that the failed create left behind")
        except ProviderError as exc:
            raise JobFailed(
                f"could not check for a half-created instance ({exc.message}); run: rentrain down {self.job.id}"
            ) from None
        self._end_instance_record(record, reason)

    def _wait_for_ssh(self, instance: Instance) -> SshEndpoint | None:
        assert self.provider is not None
        deadline = time.time() + self.settings.ssh_wait_seconds
        while time.time() < deadline:
            try:
                current = self.provider.get(instance.id)
            except NotFound:
                return None
            except ProviderError as exc:
                self.say(f"[yellow]provider error while waiting[/]: {exc.message}")
                current = None
            if current is not None:
                if current.status in ("exited", "gone"):
                    self.say(f"instance {instance.id} {current.provider_status}: {current.status_message or 'no reason given'}")
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
        """Whether the instance's watchdog runs: only then may the client go away."""
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
            except (*NETWORK_ERRORS, TransportError) as exc:
                # the instance holds the only copy: leave it to its watchdog, which stops (not destroys) it
                raise DetachRequested(
                    f"the result could not be fetched ({exc}); the instance keeps it. Try again with "
                    f"rentrain attach {self.job.id}"
                ) from None
            self.destroy(session, "training done and results home")
            self._close("succeeded", f"{final.path} fetched", result_path=str(self.output_dir / posixpath.basename(final.path)))
            return "succeeded"
        self.fetch_logs(session)
        self.destroy(session, f"training failed: {final.message}")
        self._close("failed", f"trainer error ({final.kind})", error=final.message)
        return "failed"

    def prepare(self, session: Session) -> None:
        remote, layout = session.remote, session.layout
        train = self.loaded.train
        self._move("syncing", f"to {layout.root}", remote_dir=layout.root, events_offset=0)
        remote.run(f"mkdir -p {shlex.quote(layout.root)} {shlex.quote(layout.output)} {shlex.quote(layout.model)}")
        remote.upload_tree(payload_source(), posixpath.join(layout.payload, "remote"), self.scratch, exclude=("__pycache__", "*.pyc"))
        model_reference = remote_model_reference(train, layout)
        fetch_on_instance = model_source_kind(train.pretrained_model_name_or_path) in ("hub", "url")
        self._move("bootstrapping", "in parallel with the dataset upload")
        remote.run(bootstrap_command(layout, train.pretrained_model_name_or_path if fetch_on_instance else "", session.gpus))
        self._upload(session, train.train_data_dir, layout.dataset, "dataset")
        if train.reg_data_dir is not None:
            self._upload(session, train.reg_data_dir, layout.reg, "regularisation images")
        self._upload_model(session)
        if isinstance(train.sample_prompts, Path):
            sftp = remote.sftp()
            try:
                sftp.put(str(train.sample_prompts), layout.sample_prompts)
            finally:
                sftp.close()
        resume = self._upload_resume_state(session)
        self._write_remote_file(session, layout.config, remote_train_config(train, layout))
        session.python = self._await_bootstrap(session, fetch_on_instance, model_reference)
        self._move("watchdog")
        self._write_remote_file(session, layout.watchdog_settings, json.dumps(self._watchdog_settings(session)))
        remote.run(watchdog_command(layout, session.python))
        on = f" on {session.gpus} GPUs (data parallel)" if session.gpus > 1 else ""
        self._move("training", (f"resume from {resume}" if resume else "fresh start") + on)
        remote.run(f"rm -f {shlex.quote(layout.events)}")
        self.events_offset = 0
        self.ledger.update_job(self.job.id, events_offset=0, remote_dir=layout.root)
        remote.run(trainer_command(layout, session.python, resume, session.gpus))

    def _upload(self, session: Session, local: Path, remote_dir: str, what: str) -> None:
        files = [p for p in local.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        started = time.time()
        self.say(f"uploading the {what}: {len(files)} files, {size / 1e6:.1f} MB")
        session.remote.upload_tree(local, remote_dir, self.scratch)
        seconds = max(time.time() - started, 1e-3)
        self.say(f"uploaded the {what} in {seconds:.1f} s ({size / 1e6 / seconds:.1f} MB/s, checksummed)")

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

    def _await_bootstrap(self, session: Session, model_fetched: bool, model_reference: str) -> str:
        remote, layout = session.remote, session.layout
        deadline = time.time() + self.settings.bootstrap_seconds
        while time.time() < deadline:
            code = remote.run(f"cat {shlex.quote(layout.bootstrap_exit)} 2>/dev/null", check=False).stdout.strip()
            if code:
                break
            self.sleep(self.settings.poll_seconds)
        else:
            raise JobFailed(f"bootstrap did not finish within {self.settings.bootstrap_seconds:.0f} s")
        phases = [json.loads(line) for line in remote.run(f"cat {shlex.quote(layout.bootstrap_events)}", check=False).stdout.splitlines() if line.strip()]
        for phase in phases:
            mark = "ok" if phase.get("ok") else "[red]failed[/]"
            self.say(f"setup {phase.get('name')}: {mark} in {phase.get('seconds', 0):.1f} s ({phase.get('detail', '')})")
        if code != "0":
            failed = next((p for p in phases if not p.get("ok")), {"name": "bootstrap", "detail": f"exit {code}"})
            message = f"setup failed in phase {failed.get('name')}: {failed.get('detail')}"
            if failed.get("name") in ("python", "packages", "gpu"):
                raise HostLost(f"a broken host: {message}")  # the next offer may well work
            raise JobFailed(message)
        if model_fetched:
            self._await_model(session)
        return remote.run(f"cat {shlex.quote(posixpath.join(layout.root, 'python'))}").stdout.strip() or "python3"

    def _await_model(self, session: Session) -> None:
        model_dir = session.layout.model
        deadline = time.time() + self.settings.bootstrap_seconds
        while time.time() < deadline:
            probe = session.remote.run(
                f"if [ -f {shlex.quote(model_dir)}/.ready ]; then echo ready; elif [ -f {shlex.quote(model_dir)}/.failed ]; then echo failed; fi",
                check=False,
            ).stdout.strip()
            if probe == "ready":
                return
            if probe == "failed":
                log = session.remote.run(f"tail -n 5 {shlex.quote(session.layout.root)}/model.log", check=False).stdout
                raise JobFailed(f"downloading the base model on the instance failed: {log.strip()}")
            self.sleep(self.settings.poll_seconds)
        raise JobFailed("the base model download did not finish in time")

    def _watchdog_settings(self, session: Session) -> dict[str, object]:
        recipe: SelfDestructRecipe | None = self.provider.self_destroy_recipe() if self.provider is not None else None
        return {
            "started_at": self.job_started_at() if session.record.instance_id else session.record.created_at,
            "usd_per_hour": session.record.usd_per_hour,
            "max_hours": self.settings.max_hours,
            "max_cost": self._remaining_budget(session),
            "idle_timeout_seconds": self.settings.idle_timeout_minutes * 60,
            "poll_seconds": self.settings.watchdog_poll_seconds,
            "events_file": "output/events.jsonl",
            "recipe": recipe.model_dump() if recipe is not None else None,
        }

    def _remaining_budget(self, session: Session) -> float | None:
        """The budget left for this instance: the whole budget less what earlier instances of the job cost."""
        if self.settings.max_cost is None:
            return None
        earlier = sum(
            i.cost() for i in self.ledger.instances(self.job.id) if i.created_at != session.record.created_at
        )
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
            except (*NETWORK_ERRORS, TransportError) as exc:
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
        if hasattr(event, "step") and isinstance(getattr(event, "step"), int):
            self.ledger.update_job(self.job.id, last_step=event.step)  # type: ignore[union-attr]
        if isinstance(event, CheckpointEvent):
            self._fetch_checkpoint(session, event)
        elif isinstance(event, SampleEvent):
            self._fetch_file(session, event.path, self.output_dir / "samples" / posixpath.basename(event.path), None)
        elif isinstance(event, (DoneEvent, ErrorEvent)):
            return event
        return None

    # ------------------------------------------------------------------ fetching

    def _fetch_file(self, session: Session, remote_path: str, local: Path, sha256: str | None, attempts: int = 3) -> Path:
        for attempt in range(1, attempts + 1):
            try:
                return session.remote.download(remote_path, session.layout.output, local, sha256)
            except (*NETWORK_ERRORS, TransportError) as exc:
                if attempt == attempts or "never overwrites" in str(exc):
                    raise
                self.say(f"[yellow]fetching {posixpath.basename(remote_path)} failed ({exc}); again[/]")
                self.sleep(2**attempt)
        raise AssertionError("unreachable")

    def _fetch_checkpoint(self, session: Session, event: CheckpointEvent) -> None:
        if session.remote.remote_size(check_remote_path(event.path, session.layout.output)) is None:
            self.say(f"checkpoint {posixpath.basename(event.path)} is no longer on the instance (save_last_n_epochs)")
            return
        self._fetch_file(session, event.path, self.output_dir / posixpath.basename(event.path), event.sha256)
        if event.state_dir:
            name = posixpath.basename(check_remote_path(event.state_dir, session.layout.output))
            local = session.remote.download_tree(event.state_dir, session.layout.output, self.scratch / "states" / name, self.scratch)
            self.ledger.update_job(self.job.id, last_state_path=str(local))

    def fetch_outputs(self, session: Session, final: DoneEvent | None) -> None:
        self._move("fetching")
        if final is not None:
            local = self._fetch_file(session, final.path, self.output_dir / posixpath.basename(final.path), final.sha256)
            self.ledger.update_job(self.job.id, result_path=str(local), result_sha256=final.sha256)
        session.remote.run(f"touch {shlex.quote(session.layout.fetched)}", check=False)

    def fetch_logs(self, session: Session) -> None:
        try:
            text = session.remote.run(f"tail -n 200 {shlex.quote(session.layout.trainer_log)}", check=False).stdout
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / f"trainer-{self.job.id}.log").write_text(text)
        except Exception as exc:  # noqa: BLE001 - keeping a log must never stop the destroy that follows
            self.say(f"[yellow]could not keep the trainer's log[/]: {exc}")

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
            try:
                session.remote.run(
                    f"kill $(cat {watchdog_pid} 2>/dev/null) 2>/dev/null; kill -TERM -$(cat {trainer_pid} 2>/dev/null) 2>/dev/null; true",
                    check=False,
                )
            except TransportError:
                pass
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
            return
        for attempt in range(6):
            try:
                self.provider.destroy(record.instance_id)
            except NotFound:
                pass
            except ProviderError as exc:
                self.say(f"[yellow]destroy failed ({exc.message}); retrying[/]")
                self.sleep(min(30, 2**attempt))
                continue
            if self._confirmed_gone(record.instance_id):
                self._end_instance_record(record, reason)
                self._forget_key()
                self.say(f"instance {record.instance_id} destroyed; job cost so far ${self.ledger.job_cost(self.job.id):.4f}")
                return
            self.sleep(min(30, 2**attempt))
        raise JobFailed(
            f"instance {record.instance_id} could not be confirmed destroyed: it may still bill. "
            f"Run: rentrain down {self.job.id}"
        )

    def _forget_key(self) -> None:
        """Where the job's key went onto the account (RunPod), take it off: it would reach future pods."""
        assert self.provider is not None
        if not self.key.public_line or self.ledger.instances(self.job.id, live_only=True):
            return
        try:
            self.provider.forget_ssh_key(self.key.public_line)
        except ProviderError as exc:
            self.say(f"[yellow]could not remove the job's SSH key from the account[/]: {exc.message}")

    def _confirmed_gone(self, instance_id: str) -> bool:
        assert self.provider is not None
        try:
            return self.provider.get(instance_id).status == "gone"
        except NotFound:
            return True
        except ProviderError:
            return False
