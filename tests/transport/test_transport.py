"""SSH transport against real sshd processes on loopback: pinning, commands, rsync, SFTP, safe downloads."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from rentrain.sshkeys import create_job_key
from rentrain.transport import (
    HostKeyMismatch,
    Remote,
    SshEndpoint,
    SshUnavailable,
    TransportError,
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
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


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


def test_download_checks_name_hash_and_never_overwrites(instance: tuple[SshdInstance, Path], tmp_path: Path) -> None:
    sim, key_path = instance
    remote = _remote(sim, key_path)
    job_dir = sim.workdir / "job"
    job_dir.mkdir(parents=True)
    payload = b"lora weights" * 100
    (job_dir / "lora-000001.safetensors").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    local = tmp_path / "out" / "lora-000001.safetensors"
    remote.download(str(job_dir / "lora-000001.safetensors"), str(job_dir), local, digest)
    assert local.read_bytes() == payload
    assert remote.download(str(job_dir / "lora-000001.safetensors"), str(job_dir), local, digest) == local
    # a sample grid has no hash: already home means nothing to do, and the file is untouched
    assert remote.download(str(job_dir / "lora-000001.safetensors"), str(job_dir), local, None) == local
    with pytest.raises(TransportError, match="sha256 mismatch"):
        remote.download(str(job_dir / "lora-000001.safetensors"), str(job_dir), tmp_path / "other.safetensors", "0" * 64)
    assert not (tmp_path / "other.safetensors").exists()
    local.write_bytes(b"user's own file")
    with pytest.raises(TransportError, match="never overwrites"):
        remote.download(str(job_dir / "lora-000001.safetensors"), str(job_dir), local, digest)
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
    assert check_remote_path("/work/job/./out/a-000001.safetensors", "/work/job") == "/work/job/out/a-000001.safetensors"


def test_commands_with_hostile_names_stay_quoted(instance: tuple[SshdInstance, Path]) -> None:
    sim, key_path = instance
    remote = _remote(sim, key_path)
    hostile = str(sim.workdir / "x; touch pwned")
    remote.run(f"mkdir -p {shlex.quote(hostile)}")
    assert (sim.workdir / "x; touch pwned").is_dir()
    login_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    assert not (login_home / "pwned").exists() and not (sim.workdir / "pwned").exists()


def test_rsync_that_loses_its_connection_is_retried(instance: tuple[SshdInstance, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first rsync dies as a dropped SSH connection does (exit 255); the retry completes the copy."""
    sim, key_path = instance
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    marker = tmp_path / "failed-once"
    real_rsync = shutil.which("rsync")
    (shim_dir / "rsync").write_text(
        f"#!/bin/sh\nif [ ! -e {marker} ]; then touch {marker}; echo 'connection reset' >&2; exit 255; fi\nexec {real_rsync} \"$@\"\n"
    )
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


def test_downloaded_trees_bring_no_symlinks(instance: tuple[SshdInstance, Path], tmp_path: Path) -> None:
    """A host cannot plant a link that a later upload (resume on the next host) would follow."""
    sim, key_path = instance
    state = sim.workdir / "job" / "output" / "lora-000001-state"
    state.mkdir(parents=True)
    (state / "lora.safetensors").write_bytes(b"weights")
    (state / "steal").symlink_to(Path.home() / ".config" / "rentrain" / "credentials.toml")
    remote = _remote(sim, key_path)
    local = remote.download_tree(str(state), str(sim.workdir / "job" / "output"), tmp_path / "states" / "s", tmp_path)
    assert (local / "lora.safetensors").read_bytes() == b"weights"
    assert not (local / "steal").exists() and not (local / "steal").is_symlink()


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
