"""SSH to a rented instance: paramiko for commands and SFTP, OpenSSH rsync for bulk copies.

The host key is recorded at first contact per instance and must match afterwards. There is no global
known_hosts: Vast reuses proxy ports across tenants, so a shared file is wrong both ways (a stale entry
blocks a new instance; a blanket "accept" lets anyone on a reused port in).
"""

from __future__ import annotations

import base64
import posixpath
import re
import shlex
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import paramiko
from pydantic import BaseModel

from remote.hashing import file_sha256

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
NETWORK_ERRORS = (paramiko.SSHException, OSError, EOFError, socket.timeout)


class SshEndpoint(BaseModel):
    host: str
    port: int
    user: str

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


class CommandResult(BaseModel):
    exit_code: int
    stdout: str
    stderr: str


class TransportError(RuntimeError):
    pass


class HostKeyMismatch(TransportError):
    pass


class SshUnavailable(TransportError):
    pass


class UnsafeRemotePath(TransportError):
    pass


class _PinningPolicy(paramiko.MissingHostKeyPolicy):
    def __init__(self, on_first_key: Callable[[str], None]):
        self.on_first_key = on_first_key

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.on_first_key(f"{key.get_name()} {key.get_base64()}")


class Remote:
    """One SSH connection to one instance, re-established with backoff when it drops."""

    def __init__(
        self,
        endpoint: SshEndpoint,
        key_path: Path,
        pinned_host_key: str | None,
        on_first_key: Callable[[str], None] = lambda _key: None,
        connect_timeout: float = 15,
        keepalive_seconds: int = 15,
    ):
        self.endpoint = endpoint
        self.key_path = key_path
        self.pinned_host_key = pinned_host_key
        self._on_first_key = on_first_key
        self.connect_timeout = connect_timeout
        self.keepalive_seconds = keepalive_seconds
        self._client: paramiko.SSHClient | None = None

    def _remember_key(self, key_line: str) -> None:
        self.pinned_host_key = key_line
        self._on_first_key(key_line)

    def connect(self) -> None:
        self.close()
        client = paramiko.SSHClient()
        if self.pinned_host_key:
            key_type, key_data = self.pinned_host_key.split()[:2]
            client.get_host_keys().add(
                self.endpoint.known_hosts_name, key_type, paramiko.PKey.from_type_string(key_type, _b64(key_data))
            )
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        else:
            client.set_missing_host_key_policy(_PinningPolicy(self._remember_key))
        try:
            client.connect(
                self.endpoint.host,
                port=self.endpoint.port,
                username=self.endpoint.user,
                key_filename=str(self.key_path),
                look_for_keys=False,
                allow_agent=False,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyMismatch(
                f"{self.endpoint.host}:{self.endpoint.port} presented a different host key than at first contact; "
                "refusing to connect (the port may now belong to someone else's machine)"
            ) from exc
        except paramiko.SSHException as exc:
            client.close()
            if "not found in known_hosts" in str(exc):
                raise HostKeyMismatch(f"{self.endpoint.host}:{self.endpoint.port}: {exc}") from exc
            raise
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(self.keepalive_seconds)
        self._client = client

    def connect_with_retries(self, attempts: int = 5, first_delay: float = 1.0, max_delay: float = 30.0) -> None:
        delay = first_delay
        for attempt in range(1, attempts + 1):
            try:
                self.connect()
                return
            except HostKeyMismatch:
                raise
            except NETWORK_ERRORS as exc:
                if attempt == attempts:
                    raise SshUnavailable(f"{self.endpoint.host}:{self.endpoint.port} unreachable: {exc}") from exc
                time.sleep(delay)
                delay = min(max_delay, delay * 2)

    def _live_client(self) -> paramiko.SSHClient:
        transport = self._client.get_transport() if self._client else None
        if transport is None or not transport.is_active():
            self.connect_with_retries()
        assert self._client is not None
        return self._client

    def run(self, command: str, timeout: float | None = 120, check: bool = True, retries: int = 3) -> CommandResult:
        """Run a shell command (built with shlex.quote by the caller). Retries on a dropped connection,
        so only idempotent commands belong here."""
        for attempt in range(1, retries + 1):
            try:
                client = self._live_client()
                _, stdout, stderr = client.exec_command(command, timeout=timeout)
                out = stdout.read().decode("utf-8", "replace")
                err = stderr.read().decode("utf-8", "replace")
                code = stdout.channel.recv_exit_status()
                break
            except HostKeyMismatch:
                raise
            except NETWORK_ERRORS as exc:
                self.close()
                if attempt == retries:
                    raise SshUnavailable(f"command failed, connection lost: {exc}") from exc
                time.sleep(min(10, 2**attempt))
        result = CommandResult(exit_code=code, stdout=out, stderr=err)
        if check and code != 0:
            raise TransportError(f"remote command failed ({code}): {command}\n{err.strip()[-2000:]}")
        return result

    def sftp(self) -> paramiko.SFTPClient:
        return self._live_client().open_sftp()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def has_command(self, name: str) -> bool:
        return self.run(f"command -v {shlex.quote(name)}", check=False).exit_code == 0

    def known_hosts_file(self, folder: Path) -> Path:
        """A known_hosts file holding only this instance's pinned key, for OpenSSH (rsync)."""
        if not self.pinned_host_key:
            raise TransportError("no host key recorded yet: connect with paramiko first")
        path = folder / f"known_hosts-{self.endpoint.host}-{self.endpoint.port}"
        path.write_text(f"{self.endpoint.known_hosts_name} {self.pinned_host_key}\n")
        path.chmod(0o600)
        return path

    def ssh_command(self, folder: Path) -> list[str]:
        return [
            "ssh",
            "-i",
            str(self.key_path),
            "-p",
            str(self.endpoint.port),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts_file(folder)}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ConnectTimeout=20",
        ]

    def upload_tree(self, local_dir: Path, remote_dir: str, scratch: Path, exclude: tuple[str, ...] = ()) -> None:
        """Copy local_dir's contents into remote_dir: rsync when both ends have it, else SFTP."""
        self.run(f"mkdir -p {shlex.quote(remote_dir)}")
        if shutil.which("rsync") and self.has_command("rsync"):
            # --copy-links: a symlink in the user's folder (or a staged base model) uploads as the file it
            # points to; --protect-args: remote paths reach rsync on the far side without a shell
            command = ["rsync", "-a", "--copy-links", "--protect-args", "--partial", "--checksum", "--delete-excluded"]
            command += [f"--exclude={pattern}" for pattern in exclude]
            command += ["-e", shlex.join(self.ssh_command(scratch))]
            command += [f"{local_dir}/", f"{self.endpoint.user}@{self.endpoint.host}:{remote_dir}/"]
            _run_rsync(command)
        else:
            self._sftp_upload(local_dir, remote_dir, exclude)

    def _sftp_upload(self, local_dir: Path, remote_dir: str, exclude: tuple[str, ...]) -> None:
        sftp = self.sftp()
        try:
            for path in sorted(local_dir.rglob("*")):
                relative = path.relative_to(local_dir)
                if any(relative.match(pattern) or part == pattern for pattern in exclude for part in relative.parts):
                    continue
                target = posixpath.join(remote_dir, *relative.parts)
                if path.is_dir():
                    try:
                        sftp.mkdir(target)
                    except OSError:
                        pass
                    continue
                try:
                    if sftp.stat(target).st_size == path.stat().st_size:
                        continue
                except OSError:
                    pass
                sftp.put(str(path), target)
        finally:
            sftp.close()

    def download(self, remote_path: str, remote_root: str, local_path: Path, expected_sha256: str | None) -> Path:
        """Fetch one file that the remote side named, after checking the name stays inside remote_root.
        Written to a .part file and renamed once its sha256 matches; an existing file is never overwritten."""
        check_remote_path(remote_path, remote_root)
        if local_path.exists():
            if expected_sha256 is None or file_sha256(local_path) == expected_sha256:
                return local_path  # already home (a sample grid has no hash: same job, same name)
            raise TransportError(f"{local_path} exists and differs; rentrain never overwrites a file")
        local_path.parent.mkdir(parents=True, exist_ok=True)
        partial = local_path.with_name(local_path.name + ".part")
        sftp = self.sftp()
        try:
            sftp.get(remote_path, str(partial))
        finally:
            sftp.close()
        if expected_sha256 and file_sha256(partial) != expected_sha256:
            partial.unlink()
            raise TransportError(f"{remote_path}: sha256 mismatch after download")
        partial.rename(local_path)
        return local_path

    def read_from(self, remote_path: str, offset: int, max_bytes: int = 4 << 20) -> bytes:
        """Bytes of a remote file from `offset` on (b"" when it does not exist yet)."""
        sftp = self.sftp()
        try:
            with sftp.open(remote_path, "rb") as handle:
                handle.seek(offset)
                return bytes(handle.read(max_bytes))
        except FileNotFoundError:
            return b""
        finally:
            sftp.close()

    def download_tree(self, remote_dir: str, remote_root: str, local_dir: Path, scratch: Path) -> Path:
        """Copy a folder the remote side named (checked to lie inside remote_root) into local_dir."""
        check_remote_path(remote_dir, remote_root)
        local_dir.mkdir(parents=True, exist_ok=True)
        if shutil.which("rsync") and self.has_command("rsync"):
            # --no-links: a host cannot plant a symlink here that a later upload would follow
            command = ["rsync", "-a", "--no-links", "--protect-args", "--partial", "-e", shlex.join(self.ssh_command(scratch))]
            command += [f"{self.endpoint.user}@{self.endpoint.host}:{remote_dir}/", f"{local_dir}/"]
            _run_rsync(command)
            return local_dir
        sftp = self.sftp()
        try:
            self._sftp_get_tree(sftp, remote_dir, local_dir)
        finally:
            sftp.close()
        return local_dir

    def _sftp_get_tree(self, sftp: paramiko.SFTPClient, remote_dir: str, local_dir: Path) -> None:
        for entry in sftp.listdir_attr(remote_dir):
            if not SAFE_NAME.match(entry.filename):
                raise UnsafeRemotePath(f"{remote_dir}/{entry.filename!r} has an unexpected file name")
            source = posixpath.join(remote_dir, entry.filename)
            if entry.st_mode is not None and stat.S_ISDIR(entry.st_mode):
                (local_dir / entry.filename).mkdir(exist_ok=True)
                self._sftp_get_tree(sftp, source, local_dir / entry.filename)
            elif entry.st_mode is not None and stat.S_ISREG(entry.st_mode):
                sftp.get(source, str(local_dir / entry.filename))

    def remote_size(self, remote_path: str) -> int | None:
        sftp = self.sftp()
        try:
            attributes = sftp.stat(remote_path)
            return attributes.st_size if attributes.st_mode is not None and stat.S_ISREG(attributes.st_mode) else None
        except OSError:
            return None
        finally:
            sftp.close()


def check_remote_path(remote_path: str, remote_root: str) -> str:
    """A path the remote host sent: absolute, normalised, inside remote_root, every name below it plain."""
    normalised = posixpath.normpath(remote_path)
    root = posixpath.normpath(remote_root)
    if not normalised.startswith(root + "/") or ".." in remote_path.split("/"):
        raise UnsafeRemotePath(f"{remote_path!r} is outside the job folder {remote_root!r}")
    if not all(SAFE_NAME.match(part) for part in normalised[len(root) + 1 :].split("/")):
        raise UnsafeRemotePath(f"{remote_path!r} has an unexpected file name")
    return normalised



def _b64(text: str) -> bytes:
    return base64.b64decode(text)


def _run_rsync(command: list[str], attempts: int = 3) -> None:
    for attempt in range(1, attempts + 1):
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode == 0:
            return
        # 255: ssh failed; 10/12/30/35: socket or protocol trouble. --partial keeps what arrived.
        if completed.returncode not in (10, 12, 30, 35, 255) or attempt == attempts:
            raise TransportError(f"rsync failed ({completed.returncode}): {completed.stderr.strip()[-2000:]}")
        time.sleep(2**attempt)
