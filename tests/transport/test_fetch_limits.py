"""What comes back is bounded: a name rule and a size cap for each fetched file, checked before and while it
downloads, caps for a training state's folder, a total for the job. Against a real sshd on loopback."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

import rentrain.transport as transport
from remote.config import load_config
from remote.events import CheckpointEvent, DoneEvent, SampleEvent
from rentrain.commands.jobs import _fetch_everything
from rentrain.fetch_limits import fetch_limits
from rentrain.job import JobRunner, RunSettings, Session
from rentrain.ledger import InstanceRecord, JobRecord, Ledger
from rentrain.progress import RunProgress
from rentrain.remote_job import RemoteLayout
from rentrain.sshkeys import JobKey, create_job_key
from rentrain.transport import FetchBudget, FetchRefused, FileLimit, Remote, SshEndpoint, TreeLimit
from tests.e2e.conftest import write_job
from tests.sim.sshd import SshdInstance

MIB = 1 << 20
LORA = FileLimit(what="LoRA file", max_bytes=MIB, suffix=".safetensors")
STATE = TreeLimit(what="training state", max_bytes=2 * MIB, max_files=4)


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[tuple[Remote, Path]]:
    """A connected Remote and the job's output folder on the instance."""
    key = create_job_key("fetch")
    sim = SshdInstance(tmp_path / "inst", key.public_line)
    sim.start()
    connection = Remote(SshEndpoint(host="127.0.0.1", port=sim.port, user=sim.user), key.private_path, None)
    connection.run("true")
    output = sim.workdir / "job" / "output"
    output.mkdir(parents=True)
    yield connection, output
    connection.close()
    sim.kill()


def test_a_file_over_its_cap_is_refused_before_it_downloads(remote: tuple[Remote, Path], tmp_path: Path) -> None:
    connection, output = remote
    huge = output / "lora-000001.safetensors"
    with huge.open("wb") as handle:
        handle.truncate(64 << 30)  # 64 GiB (sparse): only a stat before the download keeps this quick
    budget = FetchBudget(100 * MIB)
    local = tmp_path / "home" / huge.name
    with pytest.raises(FetchRefused, match=r"more than a LoRA file of this config can be .* not downloaded"):
        connection.download(str(huge), str(output), local, None, LORA, budget)
    assert not local.exists() and not local.with_name(huge.name + ".part").exists()
    assert budget.left == 100 * MIB


def test_a_file_that_grows_while_downloading_is_refused(
    remote: tuple[Remote, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection, output = remote
    growing = output / "lora-000001.safetensors"
    growing.write_bytes(b"w" * (MIB // 2))
    checked = transport._check_size

    def check_then_grow(remote_path: str, size: int, limit: FileLimit) -> None:
        checked(remote_path, size, limit)
        with growing.open("ab") as handle:  # the host writes on, after the size was checked
            handle.write(os.urandom(3 * MIB))

    monkeypatch.setattr(transport, "_check_size", check_then_grow)
    local = tmp_path / "home" / growing.name
    with pytest.raises(FetchRefused, match="grew past"):
        connection.download(str(growing), str(output), local, None, LORA)
    assert not local.exists() and not local.with_name(growing.name + ".part").exists()


def test_names_and_kinds_of_fetched_files_are_checked(remote: tuple[Remote, Path], tmp_path: Path) -> None:
    connection, output = remote
    (output / "grid.png").write_bytes(b"png")
    with pytest.raises(FetchRefused, match=r"announced as a LoRA file, which ends in \.safetensors"):
        connection.download(str(output / "grid.png"), str(output), tmp_path / "grid.png", None, LORA)
    (output / "lora.safetensors").symlink_to("/etc/passwd")
    with pytest.raises(FetchRefused, match="not a plain file"):
        connection.download(str(output / "lora.safetensors"), str(output), tmp_path / "lora.safetensors", None, LORA)
    assert not list(tmp_path.glob("*.safetensors*")) and not (tmp_path / "grid.png").exists()


def test_the_jobs_total_is_capped(remote: tuple[Remote, Path], tmp_path: Path) -> None:
    connection, output = remote
    for name in ("a-000001.safetensors", "a-000002.safetensors"):
        (output / name).write_bytes(b"x" * (MIB - 1))
    budget = FetchBudget(MIB + MIB // 2)
    first = str(output / "a-000001.safetensors")
    connection.download(first, str(output), tmp_path / "1.safetensors", None, LORA, budget)
    with pytest.raises(FetchRefused, match="this job's downloads would pass"):
        connection.download(
            str(output / "a-000002.safetensors"), str(output), tmp_path / "2.safetensors", None, LORA, budget
        )
    assert not (tmp_path / "2.safetensors").exists()
    assert budget.left == MIB // 2 + 1


@pytest.mark.parametrize("with_rsync", [True, False])
def test_a_training_state_folder_is_bounded(
    remote: tuple[Remote, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_rsync: bool
) -> None:
    connection, output = remote
    if not with_rsync:
        monkeypatch.setattr(connection, "has_command", lambda _name: False)
    state = output / "a-000001-state"
    state.mkdir()
    (state / "lora.safetensors").write_bytes(b"w" * 1000)
    (state / "training.pt").write_bytes(b"t" * 1000)
    got = connection.download_tree(str(state), str(output), tmp_path / "ok", tmp_path, STATE)
    assert sorted(p.name for p in got.iterdir()) == ["lora.safetensors", "training.pt"]

    for index in range(4):
        (state / f"extra{index}").write_bytes(b"e")
    with pytest.raises(FetchRefused, match="more than 4 files"):
        connection.download_tree(str(state), str(output), tmp_path / "many", tmp_path, STATE)
    for index in range(4):
        (state / f"extra{index}").unlink()

    (state / "training.pt").write_bytes(b"t" * (3 * MIB))
    with pytest.raises(FetchRefused, match="more than a training state of this config can"):
        connection.download_tree(str(state), str(output), tmp_path / "big", tmp_path, STATE)
    assert not (tmp_path / "big").exists()

    (state / "training.pt").write_bytes(b"t" * 1000)
    listed = transport._list_tree

    def list_then_grow(*args: object, **kwargs: object) -> dict[str, int]:
        found = listed(*args, **kwargs)  # type: ignore[arg-type]
        with (state / "training.pt").open("ab") as handle:
            handle.write(b"g" * (3 * MIB))
        return found

    monkeypatch.setattr(transport, "_list_tree", list_then_grow)
    with pytest.raises(FetchRefused, match="grew"):
        connection.download_tree(str(state), str(output), tmp_path / "grown", tmp_path, STATE)
    assert not (tmp_path / "grown" / "training.pt").exists()


def test_an_events_file_over_its_cap_is_refused(remote: tuple[Remote, Path]) -> None:
    connection, output = remote
    (output / "events.jsonl").write_bytes(b"{}\n" * 1000)
    assert connection.read_from(str(output / "events.jsonl"), 0, size_cap=3000) == b"{}\n" * 1000
    with pytest.raises(FetchRefused, match="more than the"):
        connection.read_from(str(output / "events.jsonl"), 0, size_cap=2999)


def test_caps_follow_the_config(tmp_path: Path) -> None:
    config = write_job(tmp_path / "job")
    train = load_config(config).train
    small = fetch_limits(train, total_steps=4)
    assert small.lora.suffix == ".safetensors" and small.sample.suffix == ".png"
    bigger_rank = fetch_limits(train.model_copy(update={"network_dim": 64}), total_steps=4)
    assert bigger_rank.lora.max_bytes > small.lora.max_bytes
    with_conv = fetch_limits(train.model_copy(update={"network_args": ["conv_dim=8"]}), total_steps=4)
    assert with_conv.lora.max_bytes > small.lora.max_bytes
    more_prompts = fetch_limits(train.model_copy(update={"sample_prompts": ["a", "b", "c"]}), total_steps=4)
    assert more_prompts.sample.max_bytes > small.sample.max_bytes
    longer = fetch_limits(train.model_copy(update={"save_every_n_steps": 1}), total_steps=400)
    assert longer.total_bytes > small.total_bytes
    # a model whose family the config does not pin may be SDXL: its LoRA is larger than an SD 1.5 one
    unknown = fetch_limits(train.model_copy(update={"pretrained_model_name_or_path": "some/model"}), total_steps=4)
    assert unknown.lora.max_bytes > small.lora.max_bytes


def _runner(tmp_path: Path, said: list[str]) -> JobRunner:
    config = write_job(tmp_path / "job")
    ledger = Ledger()
    job = JobRecord(
        id="job-1",
        created_at=0.0,
        config_path=str(config),
        provider="ssh",
        label="rentrain-job-1",
        state="planned",
        output_dir=str(tmp_path / "out"),
        total_steps=4,
    )
    ledger.create_job(job)
    key = JobKey(private_path=tmp_path / "k", public_line="")
    view = RunProgress(Console(file=open(os.devnull, "w")))  # noqa: SIM115 - lives as long as the test
    return JobRunner(ledger, job, load_config(config), None, RunSettings(provider="ssh"), key, view, said.append)


def _session(remote: object, root: str) -> Session:
    record = InstanceRecord(job_id="job-1", provider="ssh", offer_id="h", gpu="g", usd_per_hour=0.0, created_at=0.0)
    return Session(record=record, remote=remote, layout=RemoteLayout(root=root))  # type: ignore[arg-type]


def test_fetch_command_brings_what_the_events_name_within_the_limits(
    remote: tuple[Remote, Path], tmp_path: Path
) -> None:
    connection, output = remote
    runner = _runner(tmp_path, [])
    session = _session(connection, str(output.parent))
    lora = b"lora" * 1000
    (output / "e2e-000001.safetensors").write_bytes(lora)
    (output / "e2e.safetensors").write_bytes(lora)
    (output / "samples").mkdir()
    (output / "samples" / "e2e-000001.png").write_bytes(b"png")
    digest = hashlib.sha256(lora).hexdigest()
    events = [
        CheckpointEvent(path=str(output / "e2e-000001.safetensors"), sha256=digest, epoch=1, step=2),
        SampleEvent(path=str(output / "samples" / "e2e-000001.png"), epoch=1, step=2),
        DoneEvent(path=str(output / "e2e.safetensors"), sha256=digest, step=4, epoch=2, wall_seconds=1.0),
    ]
    (output / "events.jsonl").write_text("".join(e.model_dump_json() + "\n" for e in events))
    assert _fetch_everything(runner, session) == 3
    home = tmp_path / "out"
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*.*")) == [
        "e2e-000001.safetensors",
        "e2e.safetensors",
        "samples/e2e-000001.png",
    ]
    with (output / "events.jsonl").open("ab") as handle:  # a host that floods the events file
        handle.truncate(runner.fetcher.fetch_limits.events_bytes + 1)
    with pytest.raises(FetchRefused):
        _fetch_everything(runner, session)


def test_a_refused_fetch_is_not_retried(tmp_path: Path) -> None:
    said: list[str] = []
    runner = _runner(tmp_path, said)

    class HostileRemote:
        calls = 0

        def download(self, *args: object) -> Path:
            HostileRemote.calls += 1
            raise FetchRefused("the host is hostile or broken")

    session = _session(HostileRemote(), "/w/job")
    with pytest.raises(FetchRefused):
        runner.fetcher.fetch_file(session, "/w/job/output/a.safetensors", tmp_path / "a.safetensors", "0" * 64)
    assert HostileRemote.calls == 1 and said == []
