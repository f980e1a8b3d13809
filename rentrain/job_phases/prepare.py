"""Preparing an instance: the watchdog first, then setup (bootstrap while the job's files upload), then the
trainer started. Each step is idempotent and outlives SSH drops."""

from __future__ import annotations

import json
import posixpath
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from providers.base import SelfDestructRecipe
from remote.config import FLUX_PARTS, TrainConfig, model_source_kind
from remote.fetch_model import part_argument
from rentrain.hub_access import token_for_download
from rentrain.job_phases.context import CONNECTION_LOST, HostLost, JobContext, JobFailed, Session
from rentrain.remote_job import (
    bootstrap_command,
    payload_source,
    remote_train_config,
    trainer_command,
    watchdog_command,
)
from rentrain.transport import Remote, TransportError
from rentrain.upload_list import list_dataset_files

T = TypeVar("T")

# While setup runs, a second connection touches the instance's heartbeat this often: an upload holds the
# first one for as long as it takes, and the watchdog must not take that silence for a client gone.
SETUP_HEARTBEAT_SECONDS = 10
# Setup may take longer by the time the job's uploads need at this rate (4 Mbit/s, a slow home uplink).
UPLOAD_FLOOR_BYTES_PER_SECOND = 500_000


def _size_on_disk(path: Path) -> int:
    """Bytes in a file or under a folder (0 when it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _parts(train: TrainConfig) -> list[tuple[str, str]]:
    """Flux.1's separate files the config names: (key, local path or https URL)."""
    return [(part, reference) for part in FLUX_PARTS if (reference := getattr(train, part)) is not None]


class Preparer:
    def __init__(self, context: JobContext):
        self.context = context
        self.setup_deadline = 0.0  # set when the watchdog starts: setup must be done by then

    def prepare(self, session: Session) -> None:
        """Set the instance up and start the trainer. The watchdog starts first, as soon as the payload is there:
        from then on a client that dies leaves the instance to it. Each step is idempotent and outlives SSH
        drops (reconnect, run it again) until the host counts as lost."""
        remote, layout = session.remote, session.layout
        self.context.move("syncing", f"to {layout.root}", remote_dir=layout.root, events_offset=0)
        folders = shlex.join([layout.root, layout.output] + ([] if session.shared_model else [layout.model]))
        self._setup_step(session, "creating the job folder", lambda: remote.run(f"mkdir -p {folders}"))
        if session.shared_model:
            link = shlex.join(["ln", "-sfn", session.shared_model, layout.model])
            self._setup_step(session, "linking the rental's base model", lambda: remote.run(link))
        payload = posixpath.join(layout.payload, "remote")
        self._setup_step(
            session,
            "uploading the trainer",
            lambda: remote.upload_tree(
                payload_source(), payload, self.context.scratch, exclude=("__pycache__", "*.pyc")
            ),
        )
        self._start_watchdog(session)
        if self.context.provider is not None:
            self._setup_step(session, "retiring the earlier jobs' watchdogs", lambda: self._retire(session))
        with self._setup_heartbeats(session):
            resume = self._set_up(session)
        on = f" on {session.gpus} GPUs (data parallel)" if session.gpus > 1 else ""
        self.context.move("training", (f"resume from {resume}" if resume else "fresh start") + on)
        self._setup_step(session, "clearing old events", lambda: remote.run(f"rm -f {shlex.quote(layout.events)}"))
        self.context.events_offset = 0
        self.context.ledger.update_job(self.context.job.id, events_offset=0, remote_dir=layout.root)
        command = trainer_command(layout, session.python, resume, session.gpus)
        self._setup_step(session, "starting the trainer", lambda: remote.run(command))

    def _set_up(self, session: Session) -> str | None:
        """Bootstrap on the instance while the job's files upload; wait for both. The resume state's path there."""
        remote, layout = session.remote, session.layout
        train = self.context.loaded.train
        model_fetched = model_source_kind(train.pretrained_model_name_or_path) in ("hub", "url")
        parts = [part_argument(part, url) for part, url in _parts(train) if url.startswith("https://")]
        fetch_on_instance = model_fetched or bool(parts)
        self.context.move("bootstrapping", "in parallel with the dataset upload")
        model = train.pretrained_model_name_or_path if model_fetched else ""

        def step(what: str, action: Callable[[], T]) -> T:
            return self._setup_step(session, what, action)

        token = token_for_download([model, *(url for _part, url in _parts(train) if url.startswith("https://"))])
        setup = bootstrap_command(layout, model, session.gpus, parts, token_on_stdin=token is not None)
        step("starting the setup", lambda: remote.run(setup, stdin=None if token is None else token + "\n"))
        with self.context.meter.phase("upload"):
            resume = self._upload_job_files(session)
        config = remote_train_config(train, layout)
        step("writing the config", lambda: self._write_remote_file(session, layout.config, config))
        session.python = step("waiting for the setup", lambda: self._await_bootstrap(session, fetch_on_instance))
        step("reading the setup's times", lambda: self._measure_setup(session))
        return resume

    def _upload_job_files(self, session: Session) -> str | None:
        """The dataset, the regularisation images, a local model, the sample prompts and the resume state go up;
        each counts its bytes to the meter. The resume state's path on the instance."""
        train, layout = self.context.loaded.train, session.layout

        def step(what: str, action: Callable[[], T]) -> T:
            return self._setup_step(session, what, action)

        step("uploading the dataset", lambda: self._upload(session, train.train_data_dir, layout.dataset, "dataset"))
        reg = train.reg_data_dir
        if reg is not None:
            what = "regularisation images"
            step(f"uploading the {what}", lambda: self._upload(session, reg, layout.reg, what))
        step("uploading the base model", lambda: self._upload_model(session))
        prompts = train.sample_prompts
        if isinstance(prompts, Path):
            step("uploading the sample prompts", lambda: self._put_file(session, prompts, layout.sample_prompts))
            self.context.meter.bytes_up += _size_on_disk(prompts)
        resume: str | None = step("uploading the training state", lambda: self._upload_resume_state(session))
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
                    self.context.say(f"SSH dropped while {what} ({exc}); reconnecting")
                session.remote.close()
                self.context.check_host(session, lost_since, exc)
                self.context.sleep(self.context.settings.poll_seconds)

    def _start_watchdog(self, session: Session) -> None:
        """Guard 0: the watchdog runs before anything slow happens on the instance (packages, the model, the
        uploads), so a client killed during setup leaves it to end the instance."""
        self.context.move("watchdog")
        self.setup_deadline = time.time() + self._setup_limit()
        settings = json.dumps(self._watchdog_settings(session))
        layout = session.layout
        write = lambda: self._write_remote_file(session, layout.watchdog_settings, settings)  # noqa: E731
        self._setup_step(session, "writing the watchdog's settings", write)
        command = watchdog_command(layout)
        started = self._setup_step(session, "starting the watchdog", lambda: session.remote.run(command, check=False))
        if started.exit_code != 0:
            raise JobFailed(f"the watchdog did not start on the instance: {(started.stderr or started.stdout).strip()}")

    def _retire(self, session: Session) -> None:
        """On a rented instance every other job folder is a queue's earlier job there, over and home: their
        watchdogs stop (this job's guards the instance now; also after an attach that lost track of them),
        and the previous job's copies of the dataset and outputs are removed from the host."""
        ours = session.layout.root
        folders = shlex.quote(posixpath.dirname(ours))
        stop = (
            f'for d in {folders}/*/; do d="${{d%/}}"; [ "$d" = {shlex.quote(ours)} ] && continue; '
            '[ -f "$d/watchdog.pid" ] && kill "$(cat "$d/watchdog.pid")" 2>/dev/null; done; true'
        )
        session.remote.run(stop, check=False)
        previous = session.handed_from
        if previous is not None:
            session.remote.run(shlex.join(["rm", "-rf", previous.dataset, previous.reg, previous.output]), check=False)

    def _setup_limit(self) -> float:
        """Seconds this setup may take: setup_timeout_seconds, plus the uploads at UPLOAD_FLOOR_BYTES_PER_SECOND."""
        train = self.context.loaded.train
        sources = [train.train_data_dir, train.reg_data_dir, train.vae, self.context.job.last_state_path]
        sources += [reference for _, reference in _parts(train) if not reference.startswith("https://")]
        if model_source_kind(train.pretrained_model_name_or_path) in ("local_file", "local_dir"):
            sources.append(train.pretrained_model_name_or_path)
        uploads = sum(_size_on_disk(Path(source)) for source in sources if source is not None)
        return self.context.settings.setup_timeout_seconds + uploads / UPLOAD_FLOOR_BYTES_PER_SECOND

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
        listing = list_dataset_files(local, self.context.loaded.train.caption_extension)
        size = listing.bytes
        started = time.time()
        self.context.say(f"uploading the {what}: {listing.file_count} files, {size / 1e6:.1f} MB")
        session.remote.upload_files(local, listing.files, remote_dir, self.context.scratch)
        self.context.meter.bytes_up += size
        seconds = max(time.time() - started, 1e-3)
        self.context.say(f"uploaded the {what} in {seconds:.1f} s ({size / 1e6 / seconds:.1f} MB/s, checksummed)")

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
        train = self.context.loaded.train
        kind = model_source_kind(train.pretrained_model_name_or_path)
        source = Path(train.pretrained_model_name_or_path)
        if kind == "local_dir":
            session.remote.upload_tree(source, session.layout.model, self.context.scratch)
            self.context.meter.bytes_up += _size_on_disk(source)
        elif kind == "local_file":
            staging = self.context.scratch / "model-upload"
            staging.mkdir(exist_ok=True)
            link = staging / source.name
            if not link.exists():
                link.symlink_to(source)
            session.remote.upload_tree(staging, session.layout.model, self.context.scratch)
            self.context.meter.bytes_up += _size_on_disk(source)
        if train.vae is not None and Path(train.vae).exists():
            self._upload_beside_model(session, Path(train.vae), "vae")
        for part, reference in _parts(train):
            if not reference.startswith("https://"):  # a local file (the config check allows no other)
                self._upload_beside_model(session, Path(reference), part)

    def _upload_beside_model(self, session: Session, local: Path, folder: str) -> None:
        """A model file the config names apart (a VAE, Flux.1's ae, clip_l, t5xxl) into the model's `folder`,
        where rentrain.remote_job.remote_train_config points the instance's config."""
        staging = self.context.scratch / f"{folder}-upload"
        staging.mkdir(exist_ok=True)
        if not (staging / local.name).exists():
            (staging / local.name).symlink_to(local)
        session.remote.upload_tree(staging, posixpath.join(session.layout.model, folder), self.context.scratch)
        self.context.meter.bytes_up += _size_on_disk(local)

    def _upload_resume_state(self, session: Session) -> str | None:
        state = self.context.job.last_state_path
        if not state:
            return None
        local = Path(state)
        target = posixpath.join(session.layout.output, local.name)
        session.remote.upload_tree(local, target, self.context.scratch)
        self.context.meter.bytes_up += _size_on_disk(local)
        return target

    def _await_bootstrap(self, session: Session, model_fetched: bool) -> str:
        """Wait for bootstrap.sh (and the model download) until the setup deadline; the trainer's Python."""
        remote, layout = session.remote, session.layout
        read_exit = f"cat {shlex.quote(layout.bootstrap_exit)} 2>/dev/null"
        while not (code := remote.run(read_exit, check=False).stdout.strip()):
            self._before_setup_deadline("the instance's setup")
            self.context.sleep(self.context.settings.poll_seconds)
        phases = self._instance_phases(session)
        for phase in phases:
            mark = "ok" if phase.get("ok") else "FAILED"
            detail = str(phase.get("detail", ""))
            self.context.say(f"setup {phase.get('name')}: {mark} in {phase.get('seconds', 0):.1f} s ({detail})")
        if code != "0":
            failed = next((p for p in phases if not p.get("ok")), {"name": "bootstrap", "detail": f"exit {code}"})
            message = f"setup failed in phase {failed.get('name')}: {failed.get('detail')}"
            if failed.get("name") in ("packages", "gpu"):
                raise HostLost(f"a broken host: {message}")  # the next offer may well work
            raise JobFailed(message)  # python: the image's, the same on every offer
        if model_fetched:
            self._await_model(session)
        return remote.run(f"cat {shlex.quote(posixpath.join(layout.root, 'python'))}").stdout.strip() or "python3"

    def _instance_phases(self, session: Session) -> list[dict[str, Any]]:
        """The bootstrap's phases as the instance timed them (bootstrap.jsonl)."""
        events = session.remote.run(f"cat {shlex.quote(session.layout.bootstrap_events)}", check=False).stdout
        return [json.loads(line) for line in events.splitlines() if line.strip()]

    def _measure_setup(self, session: Session) -> None:
        """The bootstrap's seconds and the base model's download (seconds, and bytes on the instance's disk), as
        the instance timed them; counted once every read succeeded (the step may run again after an SSH drop)."""
        phases = self._instance_phases(session)
        downloaded = [p for p in phases if p.get("name") == "model" and p.get("ok")]
        model_bytes = 0
        if downloaded:  # the instance fetched the model itself (a hub id or a URL; not a queue's later job)
            du = session.remote.run(f"du -sb {shlex.quote(session.layout.model)}", check=False).stdout.split()
            model_bytes = int(du[0]) if du and du[0].isdigit() else 0
            self.context.meter.add("model_download", float(downloaded[-1].get("seconds", 0)))
        self.context.meter.model_download_bytes += model_bytes
        self.context.meter.add("bootstrap", sum(float(p.get("seconds", 0)) for p in phases if p.get("name") != "model"))

    def _await_model(self, session: Session) -> None:
        model_dir = shlex.quote(session.layout.model)
        probe = f"if [ -f {model_dir}/.ready ]; then echo ready; elif [ -f {model_dir}/.failed ]; then echo failed; fi"
        while (state := session.remote.run(probe, check=False).stdout.strip()) != "ready":
            if state == "failed":
                log = session.remote.run(f"tail -n 5 {shlex.quote(session.layout.root)}/model.log", check=False).stdout
                raise JobFailed(f"downloading the base model on the instance failed: {log.strip()}")
            self._before_setup_deadline("the base model download")
            self.context.sleep(self.context.settings.poll_seconds)

    def _before_setup_deadline(self, what: str) -> None:
        if time.time() >= self.setup_deadline:
            raise JobFailed(
                f"{what} did not finish within the setup's {self._setup_limit():.0f} s (the instance's watchdog "
                "ends it then too)"
            )

    def _watchdog_settings(self, session: Session) -> dict[str, object]:
        recipe: SelfDestructRecipe | None = (
            self.context.provider.self_destroy_recipe() if self.context.provider is not None else None
        )
        started_at = self.context.job_started_at() if session.record.instance_id else session.record.created_at
        return {
            "started_at": started_at,
            "usd_per_hour": session.record.usd_per_hour,
            "max_hours": self._hours_allowed(started_at),
            "max_cost": self._remaining_budget(session),
            "idle_timeout_seconds": self.context.settings.idle_timeout_minutes * 60,
            "setup_timeout_seconds": self._setup_limit(),
            "heartbeat_seconds": SETUP_HEARTBEAT_SECONDS,
            "poll_seconds": self.context.settings.watchdog_poll_seconds,
            "events_file": "output/events.jsonl",
            "recipe": recipe.model_dump() if recipe is not None else None,
        }

    def _hours_allowed(self, started_at: float) -> float | None:
        """The watchdog's hard limit from `started_at`: --max-hours, or the time left until the deadline."""
        limits = [self.context.settings.max_hours]
        if self.context.settings.deadline is not None:
            limits.append(max(0.0, self.context.settings.deadline - started_at) / 3600)
        return min((limit for limit in limits if limit is not None), default=None)

    def _remaining_budget(self, session: Session) -> float | None:
        """The budget left for this instance: the whole budget less what the job's (a queue: the queue's) other
        instance records cost so far."""
        if self.context.settings.max_cost is None:
            return None
        ledger, job = self.context.ledger, self.context.job
        jobs = [j.id for j in ledger.queue_jobs(job.queue_id)] if job.queue_id else [job.id]
        earlier = sum(
            i.cost()
            for job_id in jobs
            for i in ledger.instances(job_id)
            if (i.job_id, i.created_at) != (session.record.job_id, session.record.created_at)
        )
        return max(0.0, self.context.settings.max_cost - earlier - self.context.reserved_by_others())

    def guard_restarted(self, session: Session) -> None:
        """A restarted instance has no watchdog: start one that only watches for the client going away
        (its deadline and budget were what stopped it)."""
        self.context.heartbeat(session, force=True)
        settings = {**self._watchdog_settings(session), "started_at": time.time(), "max_hours": None, "max_cost": None}
        self._write_remote_file(session, session.layout.watchdog_settings, json.dumps(settings))
        session.remote.run(f"rm -f {shlex.quote(posixpath.join(session.layout.root, 'watchdog.pid'))}")
        session.remote.run(watchdog_command(session.layout))
