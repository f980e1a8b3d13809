"""`--provider ssh`: the user's own machine is checked against the user's known_hosts, as OpenSSH would."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from rentrain.commands.run import run
from rentrain.ledger import Ledger
from rentrain.sshkeys import create_job_key
from rentrain.transport import HostKeyMismatch, Remote, SshEndpoint, UnknownHostKey, user_known_hosts_files
from tests.e2e.conftest import write_job
from tests.sim.sshd import SshdInstance


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[tuple[SshdInstance, Path]]:
    key = create_job_key("own")
    sim = SshdInstance(tmp_path / "box", key.public_line)
    sim.start()
    yield sim, key.private_path
    sim.kill()


def _name(sim: SshdInstance) -> str:
    return f"[127.0.0.1]:{sim.port}"


def _other_key_line(tmp_path: Path) -> str:
    path = tmp_path / "someone-else"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _connect(sim: SshdInstance, key_path: Path, trust_new_host: bool = False) -> tuple[Remote, list[str]]:
    pinned: list[str] = []
    remote = Remote(
        SshEndpoint(host="127.0.0.1", port=sim.port, user=sim.user),
        key_path,
        None,
        on_first_key=pinned.append,
        known_hosts_files=user_known_hosts_files("127.0.0.1"),
        trust_new_host=trust_new_host,
    )
    remote.connect_with_retries(attempts=1)
    return remote, pinned


def test_an_unknown_host_is_refused(machine: tuple[SshdInstance, Path]) -> None:
    sim, key_path = machine
    with pytest.raises(UnknownHostKey, match=r"is not in your known_hosts .*known_hosts.*SHA256:") as refused:
        _connect(sim, key_path)
    assert str(Path.home() / ".ssh" / "known_hosts") in str(refused.value)


def test_an_unknown_host_is_trusted_on_first_use_only_when_asked(machine: tuple[SshdInstance, Path]) -> None:
    sim, key_path = machine
    remote, pinned = _connect(sim, key_path, trust_new_host=True)
    assert remote.run("echo ok").stdout.strip() == "ok"
    assert pinned == [sim.host_key_line()]


def test_a_known_host_is_accepted_and_pinned(machine: tuple[SshdInstance, Path]) -> None:
    sim, key_path = machine
    known = f"other.example ssh-ed25519 AAAA\n{_name(sim)} {sim.host_key_line()}\n"
    _write(Path.home() / ".ssh" / "known_hosts", known)
    remote, pinned = _connect(sim, key_path)
    assert remote.run("echo ok").stdout.strip() == "ok"
    assert pinned == [sim.host_key_line()] and remote.pinned_host_key == sim.host_key_line()


def test_a_changed_key_is_refused_even_with_trust_on_first_use(
    machine: tuple[SshdInstance, Path], tmp_path: Path
) -> None:
    sim, key_path = machine
    _write(Path.home() / ".ssh" / "known_hosts", f"{_name(sim)} {_other_key_line(tmp_path)}\n")
    for trust in (False, True):
        with pytest.raises(HostKeyMismatch, match=r"differs from the one in your known_hosts .*ssh-keygen -R"):
            _connect(sim, key_path, trust_new_host=trust)


def test_a_hashed_entry_is_found(machine: tuple[SshdInstance, Path]) -> None:
    sim, key_path = machine
    known = _write(Path.home() / ".ssh" / "known_hosts", f"{_name(sim)} {sim.host_key_line()}\n")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known)], check=True, capture_output=True)
    assert known.read_text().startswith("|1|") and "127.0.0.1" not in known.read_text()
    remote, _ = _connect(sim, key_path)
    assert remote.run("echo ok").stdout.strip() == "ok"


def test_user_known_hosts_file_from_ssh_config(machine: tuple[SshdInstance, Path], tmp_path: Path) -> None:
    sim, key_path = machine
    home = Path.home()
    _write(
        home / ".ssh" / "config",
        "Host elsewhere\n    UserKnownHostsFile /nowhere\n\n"
        'Host 127.0.0.1\n    UserKnownHostsFile "~/my hosts/known" %d/.ssh/other\n',
    )
    _write(home / "my hosts" / "known", f"{_name(sim)} {sim.host_key_line()}\n")
    _write(home / ".ssh" / "known_hosts", f"{_name(sim)} {_other_key_line(tmp_path)}\n")  # not read: config wins
    assert user_known_hosts_files("127.0.0.1") == [home / "my hosts" / "known", home / ".ssh" / "other"]
    remote, pinned = _connect(sim, key_path)
    assert remote.run("echo ok").stdout.strip() == "ok" and pinned == [sim.host_key_line()]


def test_run_refuses_an_unknown_host_and_names_the_flag(
    machine: tuple[SshdInstance, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim, key_path = machine
    monkeypatch.setenv("COLUMNS", "400")
    config = write_job(tmp_path / "job")
    host = f"{sim.user}@127.0.0.1:{sim.port}"
    result = CliRunner().invoke(run, [str(config), "--provider", "ssh", "--host", host, "--identity", str(key_path)])
    assert result.exit_code == 1, result.output
    assert "is not in your known_hosts" in result.output and "--trust-new-host" in result.output
    job = Ledger().jobs()[-1]
    assert job.state == "closed" and job.outcome == "failed"
    assert not (sim.workdir / "rentrain").exists()  # nothing was sent to the machine
