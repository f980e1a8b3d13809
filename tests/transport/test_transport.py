"""SSH transport against real sshd processes on loopback: pinning, commands, rsync, SFTP, safe downloads."""

from __future__ import annotations

import hashlib
import os
import pwd
import shlex
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rentrain.remote_job import RemoteLayout, bootstrap_command
from rentrain.sshkeys import create_job_key
from rentrain.transport import (
    FetchRefused,
    FileLimit,
    HostKeyMismatch,
    Remote,
    SshEndpoint,
    SshUnavailable,
    TransportError,
    TreeLimit,
    UnsafeRemotePath,
    check_remote_path,
)
from tests.sim.sshd import SshdInstance


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[tuple[SshdInstance, Path]]:
    key = create_job_key("t1")
    sim = SshdInstance(tmp_path / "inst", key.public_line, env={"CONTAINER_ID": "42"})
    sim.start()
    yield sim, key.private_path
    sim.kill()


def _remote(sim: SshdInstance, key_path: Path, pinned: str | None = None, seen: list[str] | None = None) -> Remote:
    endpoint = SshEndpoint(host="127.0.0.1", port=sim.port, user=sim.user)
    return Remote(endpoint, key_path, pinned, on_first_key=(seen.append if seen is not None else lambda _k: None))


def test_job_key_is_private_and_unique() -> None:
    first = create_job_key("a")
    second = create_job_key("b")
    assert first.private_path.stat().st_mode & 0o777 == 0o600
    assert first.public_line != second.public_line
    assert first.public_line.startswith("ssh-ed25519 ") and first.public_line.endswith("rentrain-a")
    with pytest.raises(FileExistsError):
        create_job_key("a")


def test_first_contact_records_host_key_and_commands_run(instance: tuple[SshdInstance, Path]) -> None:
    sim, key_path = instance
    seen: list[str] = []
    remote = _remote(sim, key_path, seen=seen)
    result = remote.run("echo $RENTRAIN_WORKDIR $CONTAINER_ID; echo err >&2")
    assert result.stdout.split() == [str(sim.workdir), "42"]
    assert result.stderr.strip() == "err"
    assert seen == [sim.host_key_line()]
    failing = remote.run("exit 3", check=False)
    assert failing.exit_code == 3
    with pytest.raises(TransportError, match=r"remote command failed \(3\)"):
        remote.run("exit 3")
    remote.close()


def test_changed_host_key_is_refused(instance: tuple[SshdInstance, Path]) -> None:
    sim, key_path = instance
    pinned = sim.host_key_line()
    assert _remote(sim, key_path, pinned).run("true").exit_code == 0
    sim.stop_sshd()
    sim.start(new_host_key=True)  # same port, someone else's machine
    with pytest.raises(HostKeyMismatch, match="different host key"):
        _remote(sim, key_path, pinned).run("true")


def test_reconnects_after_ssh_drops(instance: tuple[SshdInstance, Path]) -> None:
    sim, key_path = instance
    remote = _remote(sim, key_path)
    remote.run("true")
    sim.stop_sshd()
    sim.start()
    assert remote.run("echo back").stdout.strip() == "back"


def test_unreachable_host_gives_up_after_bounded_retries(tmp_path: Path) -> None:
    key = create_job_key("t2")
    remote = Remote(SshEndpoint(host="127.0.0.1", port=1, user="root"), key.private_path, None, connect_timeout=1)
    with pytest.raises(SshUnavailable):
        remote.connect_with_retries(attempts=2, first_delay=0.01)


def _tree(root: Path) -> dict[str, str]:
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_upload_with_rsync_then_without(instance: tuple[SshdInstance, Path], tmp_path: Path) -> None:
    sim, key_path = instance
    source = tmp_path / "src"
    (source / "10_x").mkdir(parents=True)
    (source / "10_x" / "a b.png").write_bytes(b"\x89PNG" + bytes(range(256)) * 40)
    (source / "10_x" / "a b.txt").write_text("caption")
    (source / "skip.pyc").write_text("no")
    remote = _remote(sim, key_path)
    remote.run("true")
    target = str(sim.workdir / "job" / "dataset")
    remote.upload_tree(source, target, tmp_path, exclude=("*.pyc",))
    expected = {k: v for k, v in _tree(source).items() if not k.endswith(".pyc")}
    assert _tree(Path(target)) == expected
    # SFTP fallback gives the same result
    sftp_target = str(sim.workdir / "job" / "sftp")
    remote.has_command = lambda name: False  # type: ignore[method-assign]
    remote.upload_tree(source, sftp_target, tmp_path, exclude=("*.pyc",))
    assert _tree(Path(sftp_target)) == expected


LORA = FileLimit(what="LoRA file", max_bytes=1 << 20, suffix=".safetensors")


def test_download_checks_name_hash_and_never_overwrites(instance: tuple[SshdInstance, Path], tmp_path: Path) -> None:
    sim, key_path = instance
    remote = _remote(sim, key_path)
    job_dir = sim.workdir / "job"
    job_dir.mkdir(parents=True)
    payload = b"lora weights" * 100
    remote_file = str(job_dir / "lora-000001.safetensors")
    (job_dir / "lora-000001.safetensors").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    local = tmp_path / "out" / "lora-000001.safetensors"
    remote.download(remote_file, str(job_dir), local, digest, LORA)
    assert local.read_bytes() == payload
    assert remote.download(remote_file, str(job_dir), local, digest, LORA) == local
    # a sample grid has no hash: already home means nothing to do, and the file is untouched
    assert remote.download(remote_file, str(job_dir), local, None, LORA) == local
    with pytest.raises(TransportError, match="sha256 mismatch"):
        remote.download(remote_file, str(job_dir), tmp_path / "other.safetensors", "0" * 64, LORA)
    assert not (tmp_path / "other.safetensors").exists()
    local.write_bytes(b"user's own file")
    with pytest.raises(TransportError, match="never overwrites"):
        remote.download(remote_file, str(job_dir), local, digest, LORA)
    assert local.read_bytes() == b"user's own file"


@pytest.mark.parametrize(
    "path",
    [
        "/work/job/../../etc/passwd",
        "/etc/passwd",
        "/work/jobx/a.safetensors",
        "/work/job/-rf",
        "/work/job/a;rm.x",
        "relative",
        "/work/job/a b;x/$(id)/state",
        "/work/job/out/../out/a.safetensors",
    ],
)
def test_unsafe_remote_paths_are_refused(path: str) -> None:
    with pytest.raises(UnsafeRemotePath):
        check_remote_path(path, "/work/job")


def test_safe_remote_path_is_normalised() -> None:
    normalised = check_remote_path("/work/job/./out/a-000001.safetensors", "/work/job")
    assert normalised == "/work/job/out/a-000001.safetensors"


def test_commands_with_hostile_names_stay_quoted(instance: tuple[SshdInstance, Path]) -> None:
    sim, key_path = instance
    remote = _remote(sim, key_path)
    hostile = str(sim.workdir / "x; touch pwned")
    remote.run(f"mkdir -p {shlex.quote(hostile)}")
    assert (sim.workdir / "x; touch pwned").is_dir()
    login_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    assert not (login_home / "pwned").exists() and not (sim.workdir / "pwned").exists()


def test_rsync_that_loses_its_connection_is_retried(
    instance: tuple[SshdInstance, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first rsync dies as a dropped SSH connection does (exit 255); the retry completes the copy."""
    sim, key_path = instance
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    marker = tmp_path / "failed-once"
    real_rsync = shutil.which("rsync")
    fail_once = f"if [ ! -e {marker} ]; then touch {marker}; echo 'connection reset' >&2; exit 255; fi"
    (shim_dir / "rsync").write_text(f'#!/bin/sh\n{fail_once}\nexec {real_rsync} "$@"\n')
    (shim_dir / "rsync").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim_dir}:{os.environ['PATH']}")
    monkeypatch.setattr("rentrain.transport.time.sleep", lambda _s: None)
    source = tmp_path / "src"
    source.mkdir()
    (source / "big.bin").write_bytes(os.urandom(1 << 20))
    remote = _remote(sim, key_path)
    remote.run("true")
    target = str(sim.workdir / "dataset")
    remote.upload_tree(source, target, tmp_path)
    assert marker.exists()
    assert _tree(Path(target)) == _tree(source)


def test_rsync_gives_up_on_a_permanent_error(instance: tuple[SshdInstance, Path], tmp_path: Path) -> None:
    sim, key_path = instance
    remote = _remote(sim, key_path)
    remote.run("true")
    with pytest.raises(TransportError, match="rsync failed"):
        remote.upload_tree(tmp_path / "does-not-exist", str(sim.workdir / "x"), tmp_path)


STATE = TreeLimit(what="training state", max_bytes=1 << 20, max_files=8)


def test_downloaded_trees_bring_no_symlinks(instance: tuple[SshdInstance, Path], tmp_path: Path) -> None:
    """A host cannot plant a link that a later upload (resume on the next host) would follow: a state folder
    holding one is refused, and nothing of it comes home."""
    sim, key_path = instance
    state = sim.workdir / "job" / "output" / "lora-000001-state"
    state.mkdir(parents=True)
    (state / "lora.safetensors").write_bytes(b"weights")
    remote = _remote(sim, key_path)
    output = str(sim.workdir / "job" / "output")
    local = remote.download_tree(str(state), output, tmp_path / "states" / "s", tmp_path, STATE)
    assert (local / "lora.safetensors").read_bytes() == b"weights"
    (state / "steal").symlink_to(Path.home() / ".config" / "rentrain" / "credentials.toml")
    with pytest.raises(FetchRefused, match="not a plain file"):
        remote.download_tree(str(state), output, tmp_path / "states" / "t", tmp_path, STATE)
    assert not (tmp_path / "states" / "t").exists()


def test_upload_follows_the_users_own_symlinks(instance: tuple[SshdInstance, Path], tmp_path: Path) -> None:
    sim, key_path = instance
    real = tmp_path / "elsewhere" / "model.safetensors"
    real.parent.mkdir()
    real.write_bytes(b"base model")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "model.safetensors").symlink_to(real)
    remote = _remote(sim, key_path)
    remote.run("true")
    remote.upload_tree(staging, str(sim.workdir / "model"), tmp_path)
    uploaded = sim.workdir / "model" / "model.safetensors"
    assert not uploaded.is_symlink() and uploaded.read_bytes() == b"base model"


def _listed_source(tmp_path: Path) -> tuple[Path, list[str]]:
    """A dataset folder holding more than its list: a key, a linked image, a folder that is itself a link."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "photo.png").write_bytes(b"\x89PNG linked" * 50)
    (outside / "id_rsa").write_text("private key")
    (outside / "pictures").mkdir()
    (outside / "pictures" / "c.png").write_bytes(b"\x89PNG c" * 50)
    source = tmp_path / "dataset"
    (source / "10_x").mkdir(parents=True)
    (source / "10_x" / "a b.png").write_bytes(b"\x89PNG" + bytes(range(256)) * 40)
    (source / "10_x" / "a b.txt").write_text("caption")
    (source / "10_x" / "linked.png").symlink_to(outside / "photo.png")
    (source / "10_x" / "id_rsa").symlink_to(outside / "id_rsa")
    (source / "10_x" / ".env").write_text("KEY=secret")
    (source / "5_y").symlink_to(outside / "pictures", target_is_directory=True)
    return source, ["10_x/a b.png", "10_x/a b.txt", "10_x/linked.png", "5_y/c.png"]


def _uploaded(target: Path) -> dict[str, bytes]:
    return {str(p.relative_to(target)): p.read_bytes() for p in sorted(target.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("with_rsync", [True, False])
def test_upload_files_sends_exactly_the_list(
    instance: tuple[SshdInstance, Path], tmp_path: Path, with_rsync: bool
) -> None:
    sim, key_path = instance
    source, files = _listed_source(tmp_path)
    remote = _remote(sim, key_path)
    remote.run("true")
    if not with_rsync:
        remote.has_command = lambda name: False  # type: ignore[method-assign]
    target = sim.workdir / "job" / "dataset"
    remote.upload_files(source, files, str(target), tmp_path)
    assert _uploaded(target) == {name: (source / name).read_bytes() for name in files}
    assert not any(p.is_symlink() for p in target.rglob("*"))
    assert (target / "5_y").is_dir()
    remote.upload_files(source, files, str(target), tmp_path)  # again, as a resumed job does: nothing changes
    assert _uploaded(target) == {name: (source / name).read_bytes() for name in files}


def test_rsync_works_from_a_state_folder_whose_path_has_spaces(
    instance: tuple[SshdInstance, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HOME="/home/a b": the job's key and pinned known_hosts live under it, and OpenSSH splits an unquoted
    UserKnownHostsFile on spaces (and expands % in file names)."""
    sim, key_path = instance
    state = tmp_path / "home of a b" / "100%x 'quoted'"
    state.mkdir(parents=True)
    spaced_key = state / "job key"
    shutil.copy(key_path, spaced_key)
    spaced_key.chmod(0o600)
    monkeypatch.setattr("rentrain.transport.time.sleep", lambda _s: None)
    source, files = _listed_source(tmp_path)
    remote = _remote(sim, spaced_key)
    remote.run("true")
    target = sim.workdir / "job" / "dataset"
    remote.upload_files(source, files, str(target), state)
    assert _uploaded(target) == {name: (source / name).read_bytes() for name in files}
    state_dir = sim.workdir / "job" / "output" / "lora-000001-state"
    state_dir.mkdir(parents=True)
    (state_dir / "lora.safetensors").write_bytes(b"weights" * 100)
    fetched = remote.download_tree(str(state_dir), str(state_dir.parent), state / "states" / "s", state, STATE)
    assert (fetched / "lora.safetensors").read_bytes() == b"weights" * 100


def test_the_setup_gets_the_hub_token_on_standard_input_and_nowhere_else(
    instance: tuple[SshdInstance, Path],
) -> None:
    """The laptop's Hugging Face token reaches the instance's setup (and so the model download) as HF_TOKEN, through
    the command's standard input: not in the command line, a file, the setup's log or any later command."""
    sim, key_path = instance
    token = "hf_notARealToken0123456789"
    layout = RemoteLayout(root=str(sim.workdir / "rentrain" / "j1"))
    script = Path(layout.payload) / "remote" / "bootstrap.sh"
    script.parent.mkdir(parents=True)
    # stands in for bootstrap.sh: records what it was given, as the model download would use it
    script.write_text('echo "token length ${#HF_TOKEN}" > "$1/seen"\n')
    command = bootstrap_command(layout, "someone/gated-model", 1, token_on_stdin=True)
    assert token not in command
    remote = _remote(sim, key_path)
    remote.run(f"mkdir -p {shlex.quote(layout.root)}")
    remote.run(command, stdin=token + "\n")
    seen = Path(layout.root) / "seen"
    for _ in range(100):
        if seen.exists() and seen.read_text():
            break
        time.sleep(0.05)
    assert seen.read_text().strip() == f"token length {len(token)}"
    assert token not in (Path(layout.root) / "bootstrap.log").read_text()
    assert remote.run('echo "[$HF_TOKEN]"').stdout.strip() == "[]"  # later commands do not have it
    remote.close()
