"""`rentrain run --provider vast|runpod` end to end: real sshd, rsync, bootstrap, watchdog, trainer, fetch, destroy."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from rentrain.ledger import Ledger
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
    config = write_job(tmp_path / "job", repeats=3)  # 12 steps: 7 of them past the warm-up
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
    _assert_the_run_is_recorded(client, provider, tmp_path / "job" / "dataset", final)


def _assert_the_run_is_recorded(client: Client, provider: str, dataset: Path, final: Path) -> None:
    """The job's measurements are in the ledger, and `rentrain costs --json` totals what the ledger bills."""
    ledger = Ledger(client.ledger_path)
    [job] = ledger.jobs()
    [run] = ledger.job_runs(job.id)
    assert (run.provider, run.gpu_model, run.gpu_count, run.family) == (provider, "RTX 4090", 1, "sd15-tiny")
    assert run.steps_measured == 7 and run.seconds_per_step is not None and 0 < run.seconds_per_step < 60
    assert {"image_pull", "upload", "bootstrap", "training", "fetch", "teardown"} <= set(run.phases)
    assert all(0 <= seconds < 240 for seconds in run.phases.values()), run.phases
    assert run.bytes_up == sum(f.stat().st_size for f in dataset.rglob("*") if f.is_file())
    assert run.bytes_down > final.stat().st_size and run.model_download_bytes == 0  # builtin: made on the instance
    assert run.cost_usd == pytest.approx(ledger.job_cost(job.id)) and run.cost_usd > 0
    rates = (0.002, 0.005) if provider == "vast" else (0.0, 0.0)  # the simulator's inet_down_cost, inet_up_cost
    assert run.bandwidth_usd == pytest.approx((run.bytes_up * rates[0] + run.bytes_down * rates[1]) / 1e9)
    costs = client.run("costs", "--json")
    assert costs.returncode == 0, costs.stderr
    report = json.loads(costs.stdout)
    assert report["total_usd"] == pytest.approx(sum(ledger.job_cost(j.id) for j in ledger.jobs()))
    [entry] = report["jobs"]
    assert entry["estimate"]["cost_usd"] > 0  # `run` recorded the estimate of the offer it rented
    assert entry["error_pct"] is not None and entry["actual"]["seconds_per_step"] == run.seconds_per_step


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
