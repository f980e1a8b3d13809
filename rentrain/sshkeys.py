"""A fresh ed25519 SSH key per rental (one job's, or a queue's jobs that run on it in turn), kept 0600 under
the state folder and never used for another rental, and taken off the provider's account when the job ends
(RunPod keeps SSH keys per account: a key left there reaches every future pod). The ledger records each
registration and removal, so a removal that failed, or never ran because the client died, is done by the next
rentrain command."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel

from providers.base import Provider, ProviderError
from rentrain.ledger import Ledger
from rentrain.paths import state_dir


class JobKey(BaseModel):
    private_path: Path
    public_line: str  # "ssh-ed25519 AAAA... rentrain-<job>"


def job_key_dir(job_id: str) -> Path:
    return state_dir() / "jobs" / job_id


def create_job_key(job_id: str) -> JobKey:
    folder = job_key_dir(job_id)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_path = folder / "id_ed25519"
    key = Ed25519PrivateKey.generate()
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_bytes)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public_line = f"{public.decode()} rentrain-{job_id}"
    (folder / "id_ed25519.pub").write_text(public_line + "\n")
    return JobKey(private_path=private_path, public_line=public_line)


def fresh_job_key(job_id: str) -> JobKey:
    """The key of a job about to rent: made now, or the one made for it before its client stopped (a queued job
    whose client was killed as it started)."""
    if (job_key_dir(job_id) / "id_ed25519.pub").exists():
        return load_job_key(job_id)
    return create_job_key(job_id)


def share_job_key(from_job: str, to_job: str) -> JobKey:
    """A queue's next job on the same rental uses the key the rental was created with (a copy, 0600, in its own
    folder): its instance knows no other, and `rentrain attach` finds a job's key by the job's id."""
    key = load_job_key(from_job)
    folder = job_key_dir(to_job)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_path = folder / "id_ed25519"
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key.private_path.read_bytes())
    (folder / "id_ed25519.pub").write_text(key.public_line + "\n")
    return JobKey(private_path=private_path, public_line=key.public_line)


def load_job_key(job_id: str) -> JobKey:
    folder = job_key_dir(job_id)
    return JobKey(private_path=folder / "id_ed25519", public_line=(folder / "id_ed25519.pub").read_text().strip())


def forget_job_key(ledger: Ledger, job_id: str, provider: Provider, public_line: str | None = None) -> str | None:
    """Take the job's key off the provider's account and record that in the ledger. Returns what went
    wrong (the removal stays pending for the next try), or None."""
    if public_line is None:
        try:
            public_line = load_job_key(job_id).public_line
        except OSError:
            ledger.record_key_removed(job_id)  # nothing left to identify it by: do not retry forever
            return (
                f"job {job_id}'s public key file is gone, so its key cannot be found on the {provider.info.name} "
                f"account; remove any key ending in rentrain-{job_id} there by hand"
            )
    try:
        provider.forget_ssh_key(public_line)
    except ProviderError as exc:
        return (
            f"could not remove job {job_id}'s SSH key from the {provider.info.name} account ({exc.message}); "
            "the next rentrain command tries again"
        )
    ledger.record_key_removed(job_id)
    return None
