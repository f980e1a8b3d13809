"""A simulated instance: a real sshd on a loopback port with its own host key, workspace and environment.

The test process runs as root (as CI does); every simulated instance logs in as the current user, and
its sessions get RENTRAIN_WORKDIR (plus any provider variables) through sshd's SetEnv. Killing the
instance kills sshd and every process that carries its RENTRAIN_WORKDIR, detached ones included.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def descendants(root: int) -> list[int]:
    """Every process below `root` in the process tree, now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class SshdInstance:
    def __init__(self, root: Path, authorized_key: str, env: dict[str, str] | None = None, port: int | None = None):
        self.root = root
        self.workdir = root / "workspace"
        self.port = port or free_port()
        self.user = getpass.getuser()
        # a machine of its own: its own home (so no start-up file of the test machine's user runs in its
        # sessions: root's pyenv init, killed mid-rehash with a session, left a lock that stalled later logins)
        self.home = root / "home"
        self.env = {"RENTRAIN_WORKDIR": str(self.workdir), "HOME": str(self.home), **(env or {})}
        self.authorized_key = authorized_key
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def host_key_path(self) -> Path:
        return self.root / "ssh_host_ed25519_key"

    def host_key_line(self) -> str:
        return " ".join(self.host_key_path.with_suffix(".pub").read_text().split()[:2])

    def start(self, new_host_key: bool = False) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        if new_host_key or not self.host_key_path.exists():
            for path in (self.host_key_path, self.host_key_path.with_suffix(".pub")):
                path.unlink(missing_ok=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key_path)], check=True)
        (self.root / "authorized_keys").write_text(self.authorized_key + "\n")
        set_env = " ".join(f'"{k}={v}"' for k, v in self.env.items())
        config = f"""
Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key_path}
AuthorizedKeysFile {self.root}/authorized_keys
PidFile {self.root}/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
SetEnv {set_env}
Subsystem sftp internal-sftp
LogLevel ERROR
"""
        (self.root / "sshd_config").write_text(config)
        log = (self.root / "sshd.log").open("ab")
        self.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.root / "sshd_config")], stdout=log, stderr=log
        )
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.root / 'sshd.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not start listening")

    def stop_sshd(self) -> None:
        """Drop SSH only: the listener and every open connection end; detached processes go on (an SSH
        outage, not a dead host)."""
        if self.process is not None and self.process.poll() is None:
            sessions = descendants(self.process.pid)
            self.process.kill()
            self.process.wait(timeout=10)
            for pid in sessions:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.process = None

    def processes(self) -> list[int]:
        marker = f"RENTRAIN_WORKDIR={self.workdir}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                found.append(int(entry.name))
        return found

    def kill(self) -> None:
        """The host dies: sshd and everything started through it end at once."""
        self.stop_sshd()
        for _ in range(5):
            pids = self.processes()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
