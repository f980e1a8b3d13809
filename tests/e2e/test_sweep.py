"""What the commands say and do about instances: orphans no ledger knows, providers that cannot be checked,
attach on a finished job, the RunPod key after a client died, a stopped instance left too long."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import pytest
import requests

from rentrain.job import RunSettings
from rentrain.ledger import InstanceRecord, JobRecord, Ledger
from rentrain.sshkeys import create_job_key
from tests.e2e.conftest import Client, run_until_the_watchdog_stops_it, write_job
from tests.sim.provider_sim import ProviderSimulator, wait_until

USERS_OWN_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIUsersOwnKey user@laptop"


def _job_state(client: Client) -> dict[str, object]:
    try:
        jobs = client.jobs()
    except sqlite3.OperationalError:  # the client is still creating the ledger
        return {}
    return jobs[-1] if jobs else {}


def test_down_all_finds_orphans_across_vast_v1_pages_with_a_fresh_home(
    market: ProviderSimulator, client: Client
) -> None:
    orphans = [market.create_orphan("vast", f"rentrain-elsewhere-{n:02d}") for n in range(30)]
    orphans.append(market.create_orphan("runpod", "rentrain-elsewhere-pod"))
    someone_elses = market.create_orphan("vast", "my-own-notebook")
    result = client.run("down", "--all", "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(o.state == "destroyed" for o in orphans), [o.id for o in orphans if o.state != "destroyed"]
    # each Vast orphan was found on the Vast account (all v1 pages) and destroyed through Vast's API
    deleted = {path for method, path in market.requests if method == "DELETE"}
    assert all(f"/vast/api/v0/instances/{o.id}/" in deleted for o in orphans[:30])
    assert someone_elses.state != "destroyed"  # not a rentrain label: not ours to end
    assert "nothing is running" not in result.stdout
    assert "rentrain label, not in this ledger" in result.stdout


def test_down_all_says_when_a_provider_could_not_be_checked(market: ProviderSimulator, client: Client) -> None:
    orphan = market.create_orphan("runpod", "rentrain-elsewhere-pod")
    market.faults += [("GET", r"^/vast/api/v1/instances/$", 500, False)] * 8  # every retry of the list
    result = client.run("down", "--all", "--yes")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "could not check vast (HTTP 500" in result.stdout
    assert "instances there may still be billing" in result.stdout
    assert "nothing is running" not in result.stdout
    assert orphan.state == "destroyed"  # what could be checked is still ended


def test_down_all_with_nothing_anywhere_says_so(market: ProviderSimulator, client: Client) -> None:
    result = client.run("down", "--all", "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nothing is running" in result.stdout and "could not check" not in result.stdout


def _finished_job_whose_client_died_before_closing(
    tmp_path: Path, client: Client, monkeypatch: pytest.MonkeyPatch, state: str
) -> str:
    """The ledger as a kill -9 leaves it right after the result came home: the job not closed yet, its
    instance not recorded as ended, though the watchdog has destroyed it since."""
    monkeypatch.setenv("XDG_STATE_HOME", str(client.home / ".local" / "state"))
    config = write_job(tmp_path / "job")
    output = tmp_path / "job" / "output"
    output.mkdir()
    (output / "e2e.safetensors").write_bytes(b"the LoRA that came home")
    ledger = Ledger(client.ledger_path)
    job_id = f"20260101-000000-{state[:6]}"
    created = time.time() - 600
    ledger.create_job(
        JobRecord(
            id=job_id,
            created_at=created,
            config_path=str(config),
            provider="vast",
            label=f"rentrain-{job_id}",
            state=state,
            output_dir=str(output),
            remote_dir="/root/rentrain/" + job_id,
            result_path=str(output / "e2e.safetensors"),
            settings_json=RunSettings(provider="vast").model_dump_json(),
        )
    )
    ledger.add_instance(
        InstanceRecord(
            job_id=job_id,
            provider="vast",
            instance_id="424242",
            offer_id="7001",
            gpu="1x RTX 4090",
            usd_per_hour=0.40,
            ssh_host="127.0.0.1",
            ssh_port=2,
            ssh_user="root",
            created_at=created,
            running_at=created,
        )
    )
    create_job_key(job_id)
    return job_id


def test_attach_never_trains_a_finished_job_again(
    tmp_path: Path, market: ProviderSimulator, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = _finished_job_whose_client_died_before_closing(tmp_path, client, monkeypatch, "fetching")
    attached = client.run("attach", job_id, timeout=120)
    assert attached.returncode == 0, attached.stdout + attached.stderr
    assert "nothing rented" in attached.stdout
    assert market.instances == {}  # no second instance, no second training
    job = client.jobs()[-1]
    assert job["state"] == "closed" and job["outcome"] == "succeeded"
    again = client.run("attach", job_id)
    assert again.returncode == 1 and "never reopens it, and nothing was rented" in again.stderr
    assert market.instances == {}


def test_runpod_key_left_by_a_killed_client_is_removed_by_the_next_start(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> None:
    config = write_job(tmp_path / "job", images=8, repeats=10, epochs=2)
    process = client.start("run", str(config), "--provider", "runpod", "--yes")
    assert wait_until(lambda: int(_job_state(client).get("last_step") or 0) >= 2, timeout=180)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(market.runpod_account_keys) == 2  # the user's own, and the job's
    pod = market.live_instances()[0]
    # what its watchdog does once idle: end the pod with the pod's own key
    pod_key = {"Authorization": f"Bearer {pod.instance_key}"}
    ended = requests.delete(f"{market.runpod_url}/v2/pods/{pod.id}", headers=pod_key, timeout=30)
    assert ended.status_code == 204
    result = client.run("check", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert market.runpod_account_keys == [USERS_OWN_KEY]
    assert _job_state(client)["key_removed_at"] is not None
    assert "may still be billing" not in result.stderr  # the ledger learned that the pod is gone


def test_stopped_instance_is_listed_with_its_storage_cost_and_past_the_limit_fetched_and_destroyed(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> None:
    config, instance = run_until_the_watchdog_stops_it(tmp_path, market, client)
    status = client.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"STOPPED: vast instance {instance.id}" in status.stdout
    assert f"${market.storage_per_hour:.4f}/h" in status.stdout and "not fetched: the final LoRA" in status.stdout

    eight_days_ago = time.time() - 8 * 86400
    with sqlite3.connect(client.ledger_path) as db:
        db.execute("UPDATE jobs SET created_at = ?, client_seen_at = ?", (eight_days_ago, eight_days_ago))
        db.execute("UPDATE instances SET created_at = ?, running_at = ?", (eight_days_ago, eight_days_ago))
    result = client.run("check", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "starting it, fetching them, then destroying it" in result.stderr
    assert (tmp_path / "job" / "output" / "e2e.safetensors").exists()
    assert market.live_instances() == []
    assert _job_state(client)["outcome"] == "succeeded"
