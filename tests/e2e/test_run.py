"""`rentrain run --provider vast|runpod` end to end: real sshd, rsync, bootstrap, watchdog, trainer, fetch, destroy."""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.e2e.conftest import Client, events_of, write_job
from tests.sim.provider_sim import ProviderSimulator, wait_until
from tests.sim.sshd import SshdInstance


def _assert_nothing_billing(market: ProviderSimulator, client: Client) -> None:
    assert market.live_instances() == [], [i.id for i in market.live_instances()]
    price = max(i.price_per_hour for i in market.instances.values())
    assert abs(client.ledger_cost() - market.total_billed()) <= price / 3600


@pytest.mark.parametrize("provider", ["vast", "runpod"])
def test_run_trains_fetches_and_destroys(
    tmp_path: Path, market: ProviderSimulator, client: Client, provider: str
) -> None:
    config = write_job(tmp_path / "job")
    result = client.run("run", str(config), "--provider", provider, "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    output = tmp_path / "job" / "output"
    final = output / "e2e.safetensors"
    assert final.exists()
    with safe_open(str(final), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    checkpoints = [e for e in events_of(output) if e["event"] == "checkpoint"]
    assert [Path(str(e["path"])).name for e in checkpoints] == [
        "e2e-000001.safetensors"
    ]  # the last epoch is the final file
    for event in checkpoints:
        assert hashlib.sha256((output / Path(str(event["path"])).name).read_bytes()).hexdigest() == event["sha256"]
    assert list((output / "samples").glob("*.png")), "no sample grid came home"
    job = client.jobs()[-1]
    assert job["state"] == "closed" and job["outcome"] == "succeeded"
    assert job["result_sha256"] == hashlib.sha256(final.read_bytes()).hexdigest()
    assert "setup gpu: ok" in result.stdout
    _assert_nothing_billing(market, client)


def test_ssh_provider_runs_on_a_machine_rented_by_hand(tmp_path: Path, client: Client) -> None:
    identity = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(identity)], check=True)
    machine = SshdInstance(
        tmp_path / "my-box",
        identity.with_suffix(".pub").read_text().strip(),
        env={"RENTRAIN_PYTHON": sys.executable, "RENTRAIN_ALLOW_CPU": "1", "HF_HUB_OFFLINE": "1"},
    )
    machine.start()
    known_hosts = client.home / ".ssh" / "known_hosts"  # the user's own machine: its key is known, as for ssh
    known_hosts.parent.mkdir()
    known_hosts.write_text(f"[127.0.0.1]:{machine.port} {machine.host_key_line()}\n")
    try:
        config = write_job(tmp_path / "job")
        host = f"{machine.user}@127.0.0.1:{machine.port}"
        result = client.run("run", str(config), "--provider", "ssh", "--host", host, "--identity", str(identity))
        assert result.returncode == 0, result.stdout + result.stderr
        assert (tmp_path / "job" / "output" / "e2e.safetensors").exists()
        job = client.jobs()[-1]
        assert job["outcome"] == "succeeded"
        assert client.instances()[-1]["host_key"] == machine.host_key_line()
        # nothing of ours keeps running on the user's machine: trainer done, watchdog ended
        time.sleep(0.5)
        assert machine.processes() == []
    finally:
        machine.kill()


def test_sigterm_detaches_and_attach_finishes(tmp_path: Path, market: ProviderSimulator, client: Client) -> None:
    config = write_job(tmp_path / "job", images=8, repeats=10, epochs=2)
    process = client.start("run", str(config), "--provider", "runpod", "--yes")
    assert wait_until(lambda: _last_step(client) >= 2, timeout=120)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, out
    assert "detached (SIGTERM)" in out
    assert len(market.live_instances()) == 1
    job_id = str(client.jobs()[-1]["id"])
    attached = client.run("attach", job_id)
    assert attached.returncode == 0, attached.stdout + attached.stderr
    assert market.live_instances() == []
    assert client.jobs()[-1]["outcome"] == "succeeded"


def _last_step(client: Client) -> int:
    try:
        jobs = client.jobs()
    except sqlite3.OperationalError:
        return 0
    return int(jobs[-1]["last_step"] or 0) if jobs else 0  # type: ignore[arg-type]
