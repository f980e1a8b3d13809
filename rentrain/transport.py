"""SSH to a rented instance: paramiko for commands and SFTP, OpenSSH rsync for bulk copies.

The host key of a rented instance is recorded at first contact and must match afterwards. There is no
global known_hosts for them: Vast reuses proxy ports across tenants, so a shared file is wrong both ways (a
stale entry blocks a new instance; a blanket "accept" lets anyone on a reused port in). A machine of the
user's own (`--provider ssh`) is checked against the user's known_hosts instead, as OpenSSH would.

Everything that comes back is bounded: each fetched file has a name rule and a size cap, checked before
and while it downloads, and a job's fetches together have a total (FetchRefused when a host breaks one).
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import os
import posixpath
import re
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import paramiko
from pydantic import BaseModel

from remote.hashing import file_sha256
from remote.names import SAFE_NAME

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


class HostKeyRefused(TransportError):
    """The host's key is not one we may trust: never retried."""


class HostKeyMismatch(HostKeyRefused):
    pass


class UnknownHostKey(HostKeyRefused):
    pass


class SshUnavailable(TransportError):
    pass


class FetchRefused(TransportError):
    """The host offered a file we will not take (a name or a size no honest run writes): the host is hostile
    or broken. Ends the job; never retried, and not a lost host."""


class UnsafeRemotePath(FetchRefused):
    pass


class FileLimit(BaseModel):
    """What one fetched file may be: its name's ending and its size."""

    what: str  # "LoRA file", "sample grid", ...: named in the refusal
    max_bytes: int
    suffix: str | None = None  # None: any safe name


class TreeLimit(BaseModel):
    """What one fetched folder (a training state) may hold."""

    what: str
    max_bytes: int  # its files together
    max_files: int
    max_depth: int = 2


class FetchBudget:
    """The bytes a job may still bring home; every fetch takes what it downloads from it."""

    def __init__(self, total_bytes: int):
        self.total_bytes = total_bytes
        self.left = total_bytes

    def take(self, size: int, what: str) -> None:
        if size > self.left:
            raise FetchRefused(
                f"{what}: this job's downloads would pass {_megabytes(self.total_bytes)}, far more than this "
                "config can produce; the host is hostile or broken. Nothing more is fetched from it"
            )
        self.left -= size


class _PinningPolicy(paramiko.MissingHostKeyPolicy):
    def __init__(self, on_first_key: Callable[[str], None]):
        self.on_first_key = on_first_key

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.on_first_key(_key_line(key))


class _RefuseUnknownPolicy(paramiko.MissingHostKeyPolicy):
    def __init__(self, files: Sequence[Path]):
        self.files = files

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        where = ", ".join(str(f) for f in self.files) or "no known_hosts file"
        raise UnknownHostKey(
            f"{hostname} is not in your known_hosts ({where}); it presents the {key.get_name()} key "
            f"{key.fingerprint}. Compare that fingerprint with the one its provider or owner shows you, then add "
            "it (connect once with ssh and answer yes)"
        )


def user_known_hosts_files(host: str) -> list[Path]:
    """The known_hosts files OpenSSH reads for `host`: ~/.ssh/config's UserKnownHostsFile when it sets one,
    else OpenSSH's default pair."""
    value = "~/.ssh/known_hosts ~/.ssh/known_hosts2"
    config_path = Path.home() / ".ssh" / "config"
    if config_path.is_file():
        try:
            config = paramiko.SSHConfig.from_path(str(config_path))
        except (OSError, UnicodeDecodeError, paramiko.ConfigParseError) as exc:
            raise HostKeyRefused(f"{config_path} cannot be read: {exc}") from None
        value = config.lookup(host).get("userknownhostsfile", value)
    tokens = {"d": str(Path.home()), "h": host, "u": getpass.getuser(), "%": "%"}

    def expand(name: str) -> str:
        return re.sub(r"%(.)", lambda match: tokens.get(match.group(1), match.group(0)), name)

    return [Path(os.path.expanduser(expand(name))) for name in shlex.split(value)]


class Remote:
    """One SSH connection to one instance, re-established with backoff when it drops.

    The host key is checked against `pinned_host_key` when there is one; else, when `known_hosts_files` is
    given (a machine of the user's own), against those files, refusing an unknown host unless
    `trust_new_host`; else (a rented instance at first contact) it is pinned. Once checked, the key is pinned."""

    def __init__(
        self,
        endpoint: SshEndpoint,
        key_path: Path,
        pinned_host_key: str | None,
        on_first_key: Callable[[str], None] = lambda _key: None,
        connect_timeout: float = 15,
        keepalive_seconds: int = 15,
        known_hosts_files: Sequence[Path] | None = None,
        trust_new_host: bool = False,
    ):
        self.endpoint = endpoint
        self.key_path = key_path
        self.pinned_host_key = pinned_host_key
        self._on_first_key = on_first_key
        self.connect_timeout = connect_timeout
        self.keepalive_seconds = keepalive_seconds
        self.known_hosts_files = known_hosts_files
        self.trust_new_host = trust_new_host
        self._client: paramiko.SSHClient | None = None

    def _remember_key(self, key_line: str) -> None:
        self.pinned_host_key = key_line
        self._on_first_key(key_line)

    def _host_key_policy(self, client: paramiko.SSHClient) -> paramiko.MissingHostKeyPolicy:
        if self.pinned_host_key:
            key_type, key_data = self.pinned_host_key.split()[:2]
            client.get_host_keys().add(
                self.endpoint.known_hosts_name, key_type, paramiko.PKey.from_type_string(key_type, _b64(key_data))
            )
            return paramiko.RejectPolicy()
        if self.known_hosts_files is None:
            return _PinningPolicy(self._remember_key)
        for path in self.known_hosts_files:
            if not path.is_file():
                continue
            try:
                client.load_system_host_keys(str(path))  # hashed entries included; never written back
            except (OSError, UnicodeDecodeError) as exc:
                raise HostKeyRefused(f"{path} cannot be read: {exc}") from None
        if self.trust_new_host:
            return _PinningPolicy(self._remember_key)
        return _RefuseUnknownPolicy(self.known_hosts_files)

    def connect(self) -> None:
        self.close()
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(self._host_key_policy(client))
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
            raise HostKeyMismatch(self._mismatch_message()) from exc
        except HostKeyRefused:
            client.close()
            raise
        except paramiko.SSHException as exc:
            client.close()
            if "not found in known_hosts" in str(exc):
                raise HostKeyMismatch(f"{self.endpoint.host}:{self.endpoint.port}: {exc}") from exc
            raise
        transport = client.get_transport()
        assert transport is not None
        if self.pinned_host_key is None:  # checked against the user's known_hosts: pin it for rsync and reconnects
            self._remember_key(_key_line(transport.get_remote_server_key()))
        transport.set_keepalive(self.keepalive_seconds)
        self._client = client

    def _mismatch_message(self) -> str:
        where = f"{self.endpoint.host}:{self.endpoint.port}"
        if self.pinned_host_key or self.known_hosts_files is None:
            return (
                f"{where} presented a different host key than at first contact; refusing to connect (the port may "
                "now belong to someone else's machine)"
            )
        files = ", ".join(str(f) for f in self.known_hosts_files)
        return (
            f"{where} presented a host key that differs from the one in your known_hosts ({files}); refusing to "
            "connect: someone may be in the middle. If the machine was reinstalled, remove the old entry with "
            f"ssh-keygen -R {shlex.quote(self.endpoint.known_hosts_name)} and check the new key's fingerprint"
        )

    def connect_with_retries(self, attempts: int = 5, first_delay: float = 1.0, max_delay: float = 30.0) -> None:
        delay = first_delay
        for attempt in range(1, attempts + 1):
            try:
                self.connect()
                return
            except HostKeyRefused:
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

    def run(
        self,
        command: str,
        timeout: float | None = 120,
        check: bool = True,
        retries: int = 3,
        stdin: str | None = None,
    ) -> CommandResult:
        """Run a shell command (built with shlex.quote by the caller). Retries on a dropped connection,
        so only idempotent commands belong here. `stdin` is written to the command's standard input: the way to
        hand it a secret that must not stand in the command line (nor in any log of it)."""
        for attempt in range(1, retries + 1):
            try:
                client = self._live_client()
                to_command, stdout, stderr = client.exec_command(command, timeout=timeout)
                if stdin is not None:
                    to_command.write(stdin.encode("utf-8"))
                    to_command.channel.shutdown_write()
                out = stdout.read().decode("utf-8", "replace")
                err = stderr.read().decode("utf-8", "replace")
                code = stdout.channel.recv_exit_status()
                if code == -1:  # paramiko's "no exit status came": the connection dropped under the command
                    raise EOFError("the connection ended before the command's exit status came")
                break
            except HostKeyRefused:
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
        host = re.sub(r"[^A-Za-z0-9._-]", "_", self.endpoint.host)
        path = folder / f"known_hosts-{host}-{self.endpoint.port}"
        path.write_text(f"{self.endpoint.known_hosts_name} {self.pinned_host_key}\n")
        path.chmod(0o600)
        return path

    def ssh_command(self, folder: Path) -> list[str]:
        """OpenSSH's command line for rsync's -e (joined with shlex.join: rsync honours the quotes)."""
        return [
            "ssh",
            "-o",
            f"IdentityFile={_ssh_option_path(self.key_path)}",  # not -i, which cannot name a file with a % in it
            "-p",
            str(self.endpoint.port),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={_ssh_option_path(self.known_hosts_file(folder))}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ConnectTimeout=20",
        ]

    def _use_rsync(self) -> bool:
        return shutil.which("rsync") is not None and self.has_command("rsync")

    def _rsync_target(self, remote_dir: str) -> str:
        return f"{self.endpoint.user}@{self.endpoint.host}:{remote_dir}/"

    def upload_tree(self, local_dir: Path, remote_dir: str, scratch: Path, exclude: tuple[str, ...] = ()) -> None:
        """Copy local_dir's contents into remote_dir: rsync when both ends have it, else SFTP. For our own
        files (the trainer, a staged base model, a fetched state); the dataset goes up with upload_files."""
        self.run(f"mkdir -p {shlex.quote(remote_dir)}")
        if self._use_rsync():
            # --copy-links: a symlink in a staging folder (the base model) uploads as the file it points to;
            # --protect-args: remote paths reach rsync on the far side without a shell
            command = ["rsync", "-a", "--copy-links", "--protect-args", "--partial", "--checksum", "--delete-excluded"]
            command += [f"--exclude={pattern}" for pattern in exclude]
            command += ["-e", shlex.join(self.ssh_command(scratch))]
            command += [f"{local_dir}/", self._rsync_target(remote_dir)]
            _run_rsync(command)
        else:
            self._sftp_upload(local_dir, remote_dir, exclude)

    def upload_files(self, local_root: Path, files: Sequence[str], remote_dir: str, scratch: Path) -> None:
        """Copy exactly `files` (paths relative to local_root) into remote_dir, keeping their relative layout.
        A listed link uploads as the file it points to; nothing else under local_root is read."""
        self.run(f"mkdir -p {shlex.quote(remote_dir)}")
        if not files:
            return
        if not self._use_rsync():
            self._sftp_put_files(local_root, files, remote_dir)
            return
        with tempfile.NamedTemporaryFile(dir=scratch, prefix="upload-", suffix=".list") as listing:
            listing.write(b"".join(os.fsencode(name) + b"\0" for name in files))
            listing.flush()
            # --files-from: only the listed files (and their folders) go; -a does not recurse with it.
            # --copy-links: a listed link goes as the file it points to; --from0: any byte but NUL in a name
            command = ["rsync", "-a", "--copy-links", "--protect-args", "--partial", "--checksum", "--from0"]
            command += [f"--files-from={listing.name}", "-e", shlex.join(self.ssh_command(scratch))]
            command += [f"{local_root}/", self._rsync_target(remote_dir)]
            _run_rsync(command)

    def _sftp_put_files(self, local_root: Path, files: Sequence[str], remote_dir: str) -> None:
        sftp = self.sftp()
        try:
            made: set[str] = set()
            for name in files:
                parts = Path(name).parts
                for depth in range(1, len(parts)):
                    folder = posixpath.join(remote_dir, *parts[:depth])
                    if folder not in made:
                        _sftp_mkdir(sftp, folder)
                        made.add(folder)
                target = posixpath.join(remote_dir, *parts)
                if _sftp_size(sftp, target) != (local_root / name).stat().st_size:
                    sftp.put(str(local_root / name), target)
        finally:
            sftp.close()

    def _sftp_upload(self, local_dir: Path, remote_dir: str, exclude: tuple[str, ...]) -> None:
        sftp = self.sftp()
        try:
            for path in sorted(local_dir.rglob("*")):
                relative = path.relative_to(local_dir)
                if any(relative.match(pattern) or part == pattern for pattern in exclude for part in relative.parts):
                    continue
                target = posixpath.join(remote_dir, *relative.parts)
                if path.is_dir():
                    _sftp_mkdir(sftp, target)
                    continue
                if _sftp_size(sftp, target) != path.stat().st_size:
                    sftp.put(str(path), target)
        finally:
            sftp.close()

    def download(
        self,
        remote_path: str,
        remote_root: str,
        local_path: Path,
        expected_sha256: str | None,
        limit: FileLimit,
        budget: FetchBudget | None = None,
    ) -> Path:
        """Fetch one file that the remote side named, after checking the name stays inside remote_root and
        follows `limit`. Its size is checked before (stat) and while it downloads (a file that grows).
        Written to a .part file and renamed once its sha256 matches; an existing file is never overwritten."""
        check_remote_path(remote_path, remote_root)
        _check_name(remote_path, limit)
        if local_path.exists():
            if expected_sha256 is None or file_sha256(local_path) == expected_sha256:
                return local_path  # already home (a sample grid has no hash: same job, same name)
            raise TransportError(f"{local_path} exists and differs; rentrain never overwrites a file")
        local_path.parent.mkdir(parents=True, exist_ok=True)
        partial = local_path.with_name(local_path.name + ".part")
        sftp = self.sftp()
        try:
            size = _regular_file_size(sftp, remote_path, limit.what)
            _check_size(remote_path, size, limit)
            if budget is not None:
                budget.take(size, remote_path)
            _bounded_get(sftp, remote_path, partial, limit, budget, announced=size)
        finally:
            sftp.close()
        if expected_sha256 and file_sha256(partial) != expected_sha256:
            partial.unlink()
            raise TransportError(f"{remote_path}: sha256 mismatch after download")
        partial.rename(local_path)
        return local_path

    def read_from(self, remote_path: str, offset: int, max_bytes: int = 4 << 20, size_cap: int | None = None) -> bytes:
        """Bytes of a remote file from `offset` on (b"" when it does not exist yet). With `size_cap`, a file
        larger than that is refused before anything is read."""
        sftp = self.sftp()
        try:
            with sftp.open(remote_path, "rb") as handle:
                if size_cap is not None:
                    _check_events_size(remote_path, handle.stat().st_size or 0, size_cap)
                handle.seek(offset)
                return bytes(handle.read(max_bytes))
        except FileNotFoundError:
            return b""
        finally:
            sftp.close()

    def download_tree(
        self,
        remote_dir: str,
        remote_root: str,
        local_dir: Path,
        scratch: Path,
        limit: TreeLimit,
        budget: FetchBudget | None = None,
    ) -> Path:
        """Copy a folder the remote side named (checked to lie inside remote_root) into local_dir. Its files
        are listed first: every name plain, only files and folders, their count and total within `limit`; then
        exactly those files are copied, each at most the size it was listed with."""
        check_remote_path(remote_dir, remote_root)
        sftp = self.sftp()
        try:
            listed = _list_tree(sftp, remote_dir, limit)
        finally:
            sftp.close()
        total = sum(listed.values())
        if total > limit.max_bytes:
            raise FetchRefused(
                f"{remote_dir} holds {_megabytes(total)}, more than a {limit.what} of this config can "
                f"({_megabytes(limit.max_bytes)}); the host is hostile or broken"
            )
        if budget is not None:
            budget.take(total, remote_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        if not listed:
            return local_dir
        if self._use_rsync():
            self._rsync_get_files(remote_dir, local_dir, scratch, listed)
        else:
            self._sftp_get_files(remote_dir, local_dir, listed, limit)
        _check_local_tree(local_dir, listed, remote_dir)
        return local_dir

    def _rsync_get_files(self, remote_dir: str, local_dir: Path, scratch: Path, listed: dict[str, int]) -> None:
        with tempfile.NamedTemporaryFile(dir=scratch, prefix="fetch-", suffix=".list") as listing:
            listing.write(b"".join(name.encode() + b"\0" for name in listed))
            listing.flush()
            # --no-links: a host cannot plant a symlink here that a later upload would follow;
            # --max-size: no file larger than the largest listed one is written at all
            command = ["rsync", "-a", "--no-links", "--protect-args", "--partial", "--from0"]
            command += [f"--files-from={listing.name}", f"--max-size={max([1, *listed.values()])}"]
            command += ["-e", shlex.join(self.ssh_command(scratch))]
            command += [self._rsync_target(remote_dir), f"{local_dir}/"]
            _run_rsync(command)

    def _sftp_get_files(self, remote_dir: str, local_dir: Path, listed: dict[str, int], limit: TreeLimit) -> None:
        sftp = self.sftp()
        try:
            for name, size in listed.items():
                target = local_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                each = FileLimit(what=f"file of a {limit.what}", max_bytes=size)
                _bounded_get(sftp, posixpath.join(remote_dir, name), target, each, None, announced=size)
        finally:
            sftp.close()

    def remote_size(self, remote_path: str) -> int | None:
        sftp = self.sftp()
        try:
            return _sftp_size(sftp, remote_path)
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


def _check_name(remote_path: str, limit: FileLimit) -> None:
    if limit.suffix is not None and not remote_path.endswith(limit.suffix):
        raise FetchRefused(
            f"{remote_path!r} was announced as a {limit.what}, which ends in {limit.suffix}; the host is hostile "
            "or broken"
        )


def _check_size(remote_path: str, size: int, limit: FileLimit) -> None:
    if size > limit.max_bytes:
        raise FetchRefused(
            f"{remote_path} is {_megabytes(size)}, more than a {limit.what} of this config can be "
            f"({_megabytes(limit.max_bytes)}); the host is hostile or broken. It was not downloaded"
        )


def _check_events_size(remote_path: str, size: int, size_cap: int) -> None:
    if size > size_cap:
        raise FetchRefused(
            f"{remote_path} is {_megabytes(size)}, more than the {_megabytes(size_cap)} this job can write; the "
            "host is hostile or broken"
        )


def _regular_file_size(sftp: paramiko.SFTPClient, remote_path: str, what: str) -> int:
    attributes = sftp.lstat(remote_path)
    if attributes.st_mode is None or not stat.S_ISREG(attributes.st_mode) or attributes.st_size is None:
        raise FetchRefused(f"{remote_path} is not a plain file (a link or a device) as a {what} is")
    return attributes.st_size


def _bounded_get(
    sftp: paramiko.SFTPClient,
    remote_path: str,
    local_path: Path,
    limit: FileLimit,
    budget: FetchBudget | None,
    announced: int,
    chunk: int = 1 << 20,
) -> None:
    """Download into local_path, refusing the file (and removing what arrived of it) once it passes
    limit.max_bytes: it grew after its stat. Bytes past the announced size are taken from the budget too."""
    received = 0
    taken = announced  # what the budget was charged before the download
    try:
        with sftp.open(remote_path, "rb") as source, local_path.open("wb") as target:
            source.prefetch(announced)
            while data := source.read(chunk):
                received += len(data)
                if received > limit.max_bytes:
                    raise FetchRefused(
                        f"{remote_path} grew past {_megabytes(limit.max_bytes)} while downloading, more than a "
                        f"{limit.what} of this config can be; the host is hostile or broken"
                    )
                if budget is not None and received > taken:
                    budget.take(received - taken, remote_path)
                    taken = received
                target.write(data)
    except FetchRefused:
        local_path.unlink(missing_ok=True)
        raise


def _list_tree(
    sftp: paramiko.SFTPClient, remote_dir: str, limit: TreeLimit, prefix: str = "", depth: int = 1
) -> dict[str, int]:
    """{relative name: size} of every file below remote_dir, refusing odd names, links, devices, deep folders
    and more files than the limit allows."""
    found: dict[str, int] = {}
    for entry in sftp.listdir_attr(remote_dir):
        if not SAFE_NAME.match(entry.filename):
            raise UnsafeRemotePath(f"{remote_dir}/{entry.filename!r} has an unexpected file name")
        relative = f"{prefix}{entry.filename}"
        mode = entry.st_mode or 0
        if stat.S_ISDIR(mode) and depth < limit.max_depth:
            found.update(_list_tree(sftp, posixpath.join(remote_dir, entry.filename), limit, relative + "/", depth + 1))
        elif stat.S_ISREG(mode) and entry.st_size is not None:
            found[relative] = entry.st_size
        else:
            raise FetchRefused(f"{remote_dir}/{entry.filename} is not a plain file a {limit.what} holds")
        if len(found) > limit.max_files:
            raise FetchRefused(
                f"{remote_dir} holds more than {limit.max_files} files, more than a {limit.what} has; the host is "
                "hostile or broken"
            )
    return found


def _check_local_tree(local_dir: Path, listed: dict[str, int], remote_dir: str) -> None:
    """What landed is what was listed, each file at most its listed size: rsync copies a file that grew a
    little, and leaves out (exit 0) one that grew past --max-size."""
    for name, size in listed.items():
        path = local_dir / name
        if not path.is_file() or path.stat().st_size > size:
            path.unlink(missing_ok=True)
            raise FetchRefused(f"{remote_dir}/{name} grew while downloading; the host is hostile or broken")


def _sftp_size(sftp: paramiko.SFTPClient, remote_path: str) -> int | None:
    """The size of a regular file, None when there is none."""
    try:
        attributes = sftp.stat(remote_path)
    except OSError:
        return None
    return attributes.st_size if attributes.st_mode is not None and stat.S_ISREG(attributes.st_mode) else None


def _sftp_mkdir(sftp: paramiko.SFTPClient, path: str) -> None:
    with contextlib.suppress(OSError):  # it exists
        sftp.mkdir(path)


def _ssh_option_path(path: Path) -> str:
    """A file name as an OpenSSH option value. UserKnownHostsFile takes several names split on spaces, so the
    name is double-quoted (OpenSSH reads quotes and backslash escapes in -o values); OpenSSH expands %-tokens
    in file names, so a literal % is written %%."""
    escaped = str(path).replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


def _key_line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def _run_rsync(command: list[str], attempts: int = 3) -> None:
    for attempt in range(1, attempts + 1):
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode == 0:
            return
        # 255: ssh failed; 10/12/30/35: socket or protocol trouble. --partial keeps what arrived.
        dropped = completed.returncode in (10, 12, 30, 35, 255)
        if not dropped or attempt == attempts:
            error = SshUnavailable if dropped else TransportError  # a drop is the caller's to retry or call lost
            raise error(f"rsync failed ({completed.returncode}): {completed.stderr.strip()[-2000:]}")
        time.sleep(2**attempt)
