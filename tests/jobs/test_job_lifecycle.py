"""The job runner's life cycle against a fake provider and a fake SSH connection: setup steps that outlive SSH
drops, a create that answers after its timeout, the label sweep when a job closes, the setup's failed phases,
and errors of the job's own (a file name the client refuses) that end the job instead of counting as a lost
host."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from providers.base import BadRequest, Instance, Offer, ProviderDown, ProviderError, ProviderInfo
from remote.config import load_config
from rentrain.job import HostLost, JobFailed, JobRunner, RunSettings, Session
from rentrain.job_phases import prepare as prepare_phase
from rentrain.ledger import InstanceRecord, JobRecord, JobState, Ledger
from rentrain.progress import RunProgress
from rentrain.remote_job import RemoteLayout
from rentrain.sshkeys import JobKey
from rentrain.transport import CommandResult, SshEndpoint, SshUnavailable, UnsafeRemotePath

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "config.toml"
LABEL = "rentrain-j1"
OFFER = Offer(
    provider="vast",
    offer_id="7001",
    gpu_model="RTX 4090",
    gpu_name_raw="RTX 4090",
    gpu_count=1,
    vram_gb=24,
    price_per_hour=0.4,
)


def _instance(instance_id: str, status: str = "running", label: str = LABEL) -> Instance:
    return Instance(provider="vast", id=instance_id, label=label, status=status)  # type: ignore[arg-type]


class FakeProvider:
    """A market whose answers the test sets: `listed` is what each list_instances call returns, in turn (the
    last one repeats)."""

    info = ProviderInfo(name="vast", display_name="Vast.ai")

    def __init__(self, create_error: ProviderError | None = None, listed: list[list[Instance]] | None = None):
        self.create_error = create_error
        self.listed = listed or [[]]
        self.lists = 0
        self.destroyed: list[str] = []
        self.created: list[str] = []
        self.list_error: ProviderError | None = None

    def create(self, offer: Offer, launch: object) -> Instance:
        if self.create_error is not None:
            raise self.create_error
        self.created.append(offer.offer_id)
        raise AssertionError("this test rents nothing more")

    def list_instances(self, label_prefix: str) -> list[Instance]:
        assert label_prefix == LABEL
        if self.list_error is not None:
            raise self.list_error
        self.lists += 1
        return self.listed[min(self.lists, len(self.listed)) - 1]

    def get(self, instance_id: str) -> Instance:
        return _instance(instance_id, "gone" if instance_id in self.destroyed else "running")

    def destroy(self, instance_id: str) -> None:
        self.destroyed.append(instance_id)

    def self_destroy_recipe(self) -> None:
        return None

    def forget_ssh_key(self, public_line: str) -> None:
        pass


def _runner(tmp_path: Path, provider: FakeProvider, said: list[str], **settings: Any) -> JobRunner:
    run_settings = RunSettings(provider="vast", poll_seconds=0.01, **settings)
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    job = JobRecord(
        id="j1",
        created_at=time.time(),
        config_path=str(EXAMPLE),
        provider="vast",
        label=LABEL,
        state="planned",
        output_dir=str(tmp_path / "output"),
        settings_json=run_settings.model_dump_json(),
    )
    ledger.create_job(job)
    view = RunProgress(Console(file=open(os.devnull, "w")))  # noqa: SIM115 - lives as long as the test
    key = JobKey(private_path=tmp_path / "key", public_line="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKey j1")
    return JobRunner(ledger, job, load_config(EXAMPLE), provider, run_settings, key, view, said.append)  # type: ignore[arg-type]


# The states provision() takes a job through up to an instance that answers SSH; then the setup's, up to the follow.
TO_SSH: tuple[JobState, ...] = ("intent_recorded", "creating", "waiting_ssh")
TO_FOLLOWING: tuple[JobState, ...] = (*TO_SSH, "syncing", "watchdog", "bootstrapping", "training", "following")


def _walk(runner: JobRunner, states: tuple[JobState, ...]) -> None:
    for state in states:
        runner.job = runner.ledger.transition("j1", state)


def _live_record(runner: JobRunner, instance_id: str = "1001") -> InstanceRecord:
    record = InstanceRecord(
        job_id="j1",
        provider="vast",
        offer_id="7001",
        gpu="1x RTX 4090",
        usd_per_hour=0.4,
        created_at=time.time(),
        instance_id=instance_id,
    )
    runner.ledger.add_instance(record)
    return record


# ------------------------------------------------------------------------------------------ a create's late answer


def test_a_create_that_timed_out_is_watched_until_its_late_instance_turns_up(tmp_path: Path) -> None:
    provider = FakeProvider(
        ProviderDown("vast", "could not reach the API: read timed out"),
        listed=[[], [], [], [_instance("late", "provisioning")]],  # the machine is listed a while after the timeout
    )
    said: list[str] = []
    runner = _runner(tmp_path, provider, said, create_window_seconds=60)
    assert runner.provisioner.provision(OFFER) is None
    assert provider.destroyed == ["late"] and provider.lists == 4
    [record] = runner.ledger.instances("j1")
    assert record.instance_id == "late" and record.ended_at is not None  # its cost is in the ledger
    assert any("left behind" in line for line in said)


def test_a_create_that_timed_out_is_watched_for_the_create_window_only(tmp_path: Path) -> None:
    provider = FakeProvider(ProviderDown("vast", "HTTP 504"))
    runner = _runner(tmp_path, provider, [], create_window_seconds=0.3)
    started = time.time()
    assert runner.provisioner.provision(OFFER) is None
    assert provider.lists > 1 and time.time() - started >= 0.3
    assert provider.destroyed == [] and runner.ledger.instances("j1")[0].ended_at is not None


def test_a_create_the_provider_refused_is_checked_once_without_waiting(tmp_path: Path) -> None:
    provider = FakeProvider(BadRequest("vast", "invalid image", 400))
    runner = _runner(tmp_path, provider, [], create_window_seconds=3600)
    assert runner.provisioner.provision(OFFER) is None
    assert provider.lists == 1


# ------------------------------------------------------------------------------------------ the sweep at the close


def test_the_close_destroys_an_instance_with_the_jobs_label_that_no_record_ended(tmp_path: Path) -> None:
    provider = FakeProvider(
        listed=[
            [_instance("known"), _instance("stray"), _instance("old", "gone"), _instance("other", label="rentrain-j10")]
        ]
    )
    said: list[str] = []
    runner = _runner(tmp_path, provider, said)
    record = _live_record(runner, "known")
    runner.ledger.update_instance("j1", "7001", record.created_at, ended_at=time.time(), end_reason="done")
    runner.close("succeeded", "result fetched")
    assert provider.destroyed == ["stray"]
    assert runner.ledger.job("j1").state == "closed"
    assert any("destroyed instance stray" in line for line in said)


def test_a_close_that_cannot_list_says_so_and_names_the_command(tmp_path: Path) -> None:
    provider = FakeProvider()
    provider.list_error = ProviderDown("vast", "HTTP 503")
    said: list[str] = []
    runner = _runner(tmp_path, provider, said)
    runner.close("failed", "trainer error")
    assert runner.ledger.job("j1").state == "closed"
    assert any("could not check vast" in line and "rentrain down j1" in line for line in said)


# ------------------------------------------------------------------------------------------ setup over SSH


class FakeSftp:
    def __init__(self, remote: DroppingRemote):
        self.remote = remote

    @contextmanager
    def open(self, path: str, mode: str) -> Iterator[Any]:
        self.remote.drop_once(f"write {path}")
        chunks: list[bytes] = []

        class Handle:
            def write(self, data: bytes) -> None:
                chunks.append(data)

        yield Handle()
        self.remote.files[path] = b"".join(chunks).decode()

    def put(self, local: str, path: str) -> None:
        self.remote.drop_once(f"put {path}")
        self.remote.files[path] = Path(local).read_text()

    def close(self) -> None:
        pass


class DroppingRemote:
    """An SSH connection that drops the first time each operation is tried (with a paramiko-like EOFError),
    and does it the second time."""

    def __init__(self, layout: RemoteLayout, phases: list[dict[str, Any]], drops: bool = True):
        self.layout = layout
        self.phases = phases
        self.drops = drops
        self.endpoint = SshEndpoint(host="127.0.0.1", port=1, user="root")
        self.key_path = Path("/nonexistent")
        self.pinned_host_key = "ssh-ed25519 AAAA"
        self.dropped: set[str] = set()
        self.done: list[str] = []
        self.files: dict[str, str] = {}
        self.closed = 0

    def drop_once(self, operation: str) -> None:
        if self.drops and operation not in self.dropped:
            self.dropped.add(operation)
            raise EOFError(f"{operation}: the connection dropped")
        self.done.append(operation)

    def run(
        self,
        command: str,
        timeout: float | None = 120,
        check: bool = True,
        retries: int = 3,
        stdin: str | None = None,
    ) -> CommandResult:
        self.drop_once(command)
        answers = {
            f"cat {self.layout.bootstrap_exit} 2>/dev/null": str(int(not all(p["ok"] for p in self.phases))),
            f"cat {self.layout.bootstrap_events}": "\n".join(json.dumps(p) for p in self.phases),
            f"cat {self.layout.root}/python": "/usr/bin/python3",
        }
        return CommandResult(exit_code=0, stdout=answers.get(command, ""), stderr="")

    def upload_tree(self, local: Path, remote_dir: str, scratch: Path, exclude: tuple[str, ...] = ()) -> None:
        self.drop_once(f"upload {remote_dir}")

    def upload_files(self, local_root: Path, files: list[str], remote_dir: str, scratch: Path) -> None:
        self.drop_once(f"upload {remote_dir}")

    def sftp(self) -> FakeSftp:
        return FakeSftp(self)

    def close(self) -> None:
        self.closed += 1


class QuietRemote:
    """The setup's second connection (its heartbeats), which these tests do not look at."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def run(self, command: str, **kwargs: Any) -> CommandResult:
        return CommandResult(exit_code=0, stdout="", stderr="")

    def close(self) -> None:
        pass


OK_PHASES = [{"name": name, "ok": True, "seconds": 0.1, "detail": "fine"} for name in ("python", "packages", "gpu")]


def _session(
    runner: JobRunner, phases: list[dict[str, Any]] = OK_PHASES, drops: bool = True
) -> tuple[Session, DroppingRemote]:
    layout = RemoteLayout(root="/workspace/rentrain/j1")
    remote = DroppingRemote(layout, phases, drops)
    record = _live_record(runner)
    _walk(runner, TO_SSH)
    return Session(record=record, remote=remote, layout=layout), remote  # type: ignore[arg-type]


def test_every_setup_step_reconnects_and_runs_again_after_an_ssh_drop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prepare_phase, "Remote", QuietRemote)
    said: list[str] = []
    runner = _runner(tmp_path, FakeProvider(), said)
    session, remote = _session(runner)
    runner.preparer.prepare(session)
    assert runner.job.state == "training"
    assert remote.dropped == set(remote.done)  # everything that dropped was done afterwards
    layout = session.layout
    assert {layout.watchdog_settings, layout.config} <= set(remote.files)
    assert any("watchdog.py" in operation for operation in remote.done)
    assert any("remote.trainer" in operation for operation in remote.done)
    assert remote.closed >= len(remote.dropped)  # each drop closed the connection, the next step reconnected
    assert any("SSH dropped while" in line for line in said)
    watchdog = json.loads(remote.files[layout.watchdog_settings])
    assert watchdog["setup_timeout_seconds"] >= runner.settings.setup_timeout_seconds


def test_the_watchdog_starts_before_the_instances_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepare_phase, "Remote", QuietRemote)
    runner = _runner(tmp_path, FakeProvider(), [])
    session, remote = _session(runner)
    runner.preparer.prepare(session)
    order = [op for op in remote.done if "watchdog.py" in op or "bootstrap.sh" in op or op.startswith("upload")]
    assert "watchdog.py" in order[1] and "bootstrap.sh" in order[2]  # after the payload, before the rest
    assert order[0] == f"upload {session.layout.payload}/remote"


def test_a_host_whose_ssh_stays_dead_during_setup_is_lost(tmp_path: Path) -> None:
    runner = _runner(tmp_path, FakeProvider(), [], ssh_lost_seconds=0.2)
    session, _remote = _session(runner)

    def dead() -> None:
        raise SshUnavailable("127.0.0.1:1 unreachable")

    with pytest.raises(HostLost, match="no SSH for"):
        runner.preparer._setup_step(session, "uploading the dataset", dead)


@pytest.mark.parametrize(("phase", "error"), [("python", JobFailed), ("packages", HostLost), ("gpu", HostLost)])
def test_a_failed_phase_is_the_images_or_the_hosts(tmp_path: Path, phase: str, error: type[Exception]) -> None:
    """Python comes with the image, the same on every offer: no other host would do better."""
    runner = _runner(tmp_path, FakeProvider(), [])
    phases = [{"name": phase, "ok": False, "seconds": 0.1, "detail": "found Python 3.10.12 at /usr/bin/python3"}]
    session, _remote = _session(runner, phases, drops=False)
    runner.preparer.setup_deadline = time.time() + 60
    with pytest.raises(error, match=f"setup failed in phase {phase}"):
        runner.preparer._await_bootstrap(session, model_fetched=False)


# ------------------------------------------------------------------------------------------ the job's own errors


class EventRemote:
    """A trainer that announces `event` and nothing else."""

    def __init__(self, event: dict[str, Any]):
        self.line = (json.dumps(event) + "\n").encode()
        self.closed = False

    def read_from(self, path: str, offset: int, max_bytes: int = 4 << 20) -> bytes:
        return self.line[offset:]

    def run(self, command: str, **kwargs: Any) -> CommandResult:
        return CommandResult(exit_code=0, stdout="", stderr="")

    def remote_size(self, path: str) -> int | None:
        return 4

    def download(self, remote_path: str, remote_root: str, *args: Any) -> Path:
        from rentrain.transport import check_remote_path

        check_remote_path(remote_path, remote_root)  # the real download checks the name first
        raise AssertionError("a refused name must not be downloaded")

    def close(self) -> None:
        self.closed = True


ROOT = "/workspace/rentrain/j1"


@pytest.mark.parametrize(
    "event",
    [
        {"event": "checkpoint", "time": 1.0, "step": 4, "epoch": 1, "path": "/etc/passwd", "sha256": "0" * 64},
        {
            "event": "done",
            "time": 1.0,
            "step": 8,
            "epoch": 2,
            "wall_seconds": 9.0,
            "path": f"{ROOT}/output/../../../.ssh/id_rsa",
            "sha256": "0" * 64,
        },
    ],
    ids=["checkpoint", "done"],
)
def test_a_name_the_client_refuses_ends_the_job_and_its_instance_not_the_host(
    tmp_path: Path, event: dict[str, Any]
) -> None:
    provider = FakeProvider()
    runner = _runner(tmp_path, provider, [], ssh_lost_seconds=0)
    _walk(runner, TO_FOLLOWING)
    remote = EventRemote(event)
    session = Session(record=_live_record(runner), remote=remote, layout=RemoteLayout(root=ROOT))  # type: ignore[arg-type]
    with pytest.raises(UnsafeRemotePath):
        runner.run([OFFER], session=session)
    assert provider.destroyed == ["1001"] and remote.closed
    assert provider.created == []  # no second rental
    assert runner.ledger.failed_hosts("vast") == set()  # the host did nothing wrong
    job = runner.ledger.job("j1")
    assert job.state == "closed" and job.outcome == "failed" and "UnsafeRemotePath" in (job.error or "")


class ClosedByDownRemote(EventRemote):
    """`rentrain down` ends the instance and closes the job while this client reads its events."""

    def __init__(self, ledger: Ledger, record: InstanceRecord, provider: FakeProvider):
        super().__init__({})
        self.ledger, self.record, self.provider = ledger, record, provider

    def read_from(self, path: str, offset: int, max_bytes: int = 4 << 20) -> bytes:
        assert self.record.instance_id is not None
        self.provider.destroyed.append(self.record.instance_id)
        self.ledger.update_instance("j1", "7001", self.record.created_at, ended_at=time.time(), end_reason="down")
        self.ledger.transition("j1", "closed", "rentrain down", outcome="cancelled")
        raise SshUnavailable("127.0.0.1:1 refused")


def test_a_job_closed_by_down_while_followed_is_never_reopened(tmp_path: Path) -> None:
    provider = FakeProvider()
    runner = _runner(tmp_path, provider, [])
    record = _live_record(runner)
    _walk(runner, TO_FOLLOWING)
    remote = ClosedByDownRemote(runner.ledger, record, provider)
    session = Session(record=record, remote=remote, layout=RemoteLayout(root=ROOT))  # type: ignore[arg-type]
    with pytest.raises(JobFailed, match="closed meanwhile"):
        runner.run([OFFER], session=session)
    job = runner.ledger.job("j1")
    assert job.state == "closed" and job.outcome == "cancelled"
    assert runner.ledger.transitions("j1")[-1].detail == "rentrain down"  # nothing moved it after the close
    assert provider.created == [] and provider.destroyed == ["1001"]  # no second rental, no second destroy
    assert runner.ledger.failed_hosts("vast") == set()  # the host did nothing wrong


def test_a_move_after_another_command_closed_the_job_fails_the_job_not_the_ledger(tmp_path: Path) -> None:
    runner = _runner(tmp_path, FakeProvider(), [])
    record = _live_record(runner)
    _walk(runner, TO_SSH)
    runner.ledger.transition("j1", "closed", "rentrain down", outcome="cancelled")
    with pytest.raises(JobFailed, match="closed meanwhile"):
        runner.teardown.destroy_instance(record, "SSH never became reachable")
    runner.close("cancelled", "stopped by the user")  # a Ctrl-C as the job closed: it stays as it was
    assert [t.to_state for t in runner.ledger.transitions("j1")][-2:] == ["waiting_ssh", "closed"]
