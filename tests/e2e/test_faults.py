"""Fault tests: each ends with no simulated instance billing, no checkpoint lost, and the ledger's cost
equal to the simulator's billing within one second's price."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import time
from pathlib import Path

from tests.e2e.conftest import Client, events_of, run_until_the_watchdog_stops_it, write_job
from tests.sim.provider_sim import ProviderSimulator, wait_until


def _assert_settled(market: ProviderSimulator, client: Client, output: Path) -> None:
    assert market.live_instances() == [], [(i.id, i.state) for i in market.live_instances()]
    price = max(i.price_per_hour for i in market.instances.values())
    assert abs(client.ledger_cost() - market.total_billed()) <= price / 3600
    for event in events_of(output):
        if event["event"] in ("checkpoint", "done"):
            local = output / Path(str(event["path"])).name
            assert local.exists(), f"lost {local.name}"
            assert hashlib.sha256(local.read_bytes()).hexdigest() == event["sha256"]


def _last_step(output: Path) -> int:
    done = [e for e in events_of(output) if e["event"] == "done"]
    assert done, "the job never finished"
    return int(done[-1]["step"])  # type: ignore[arg-type]


def _job_state(client: Client) -> dict[str, object]:
    try:
        jobs = client.jobs()
    except sqlite3.OperationalError:  # the client is still creating the ledger
        return {}
    return jobs[-1] if jobs else {}


def test_kill_9_of_the_client_then_attach_finishes(tmp_path: Path, market: ProviderSimulator, client: Client) -> None:
    config = write_job(tmp_path / "job", images=8, repeats=10, epochs=2)  # 80 steps
    process = client.start("run", str(config), "--provider", "vast", "--yes")
    assert wait_until(lambda: int(_job_state(client).get("last_step") or 0) >= 2, timeout=120)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(market.live_instances()) == 1  # still training, now without a client
    warning = client.run("check", str(config))
    assert "may still be billing and no rentrain client follows it" in warning.stderr
    job_id = str(_job_state(client)["id"])
    attached = client.run("attach", job_id[:12])
    assert attached.returncode == 0, attached.stdout + attached.stderr
    output = tmp_path / "job" / "output"
    assert _last_step(output) == 80
    assert _job_state(client)["outcome"] == "succeeded"
    _assert_settled(market, client, output)


def test_ssh_drop_mid_follow_is_survived(tmp_path: Path, market: ProviderSimulator, client: Client) -> None:
    config = write_job(tmp_path / "job", images=8, repeats=10, epochs=2)
    process = client.start("run", str(config), "--provider", "vast", "--yes")
    assert wait_until(lambda: int(_job_state(client).get("last_step") or 0) >= 2, timeout=120)
    instance = market.live_instances()[0]
    instance.sshd.stop_sshd()
    time.sleep(3)
    instance.sshd.start()
    out, _ = process.communicate(timeout=240)
    assert process.returncode == 0, out
    output = tmp_path / "job" / "output"
    assert _last_step(output) == 80
    _assert_settled(market, client, output)


def test_dead_host_resumes_on_the_next_offer_with_the_same_step_count(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> None:
    config = write_job(tmp_path / "job", images=8, repeats=10, epochs=3)  # 120 steps, checkpoints after 40 and 80
    output = tmp_path / "job" / "output"
    process = client.start("run", str(config), "--provider", "vast", "--yes")
    assert wait_until(lambda: bool(_job_state(client).get("last_state_path")), timeout=180)
    first = market.live_instances()[0]
    market.kill_host(first.id)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    assert "host lost" in out
    assert _last_step(output) == 120
    instances = client.instances()
    assert len(instances) == 2 and str(instances[0]["end_reason"]).startswith("host lost")
    with sqlite3.connect(client.ledger_path) as db:
        failed = [r[0] for r in db.execute("SELECT host_id FROM failed_hosts")]
    assert failed == [first.offer.offer_id]
    starts = [e for e in events_of(output) if e["event"] == "start"]
    assert starts[-1]["resumed_from_step"] in (40, 80)
    _assert_settled(market, client, output)


def test_offer_gone_and_unreachable_host_move_to_the_next_offer(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> None:
    market.offers[("vast", "7001")].gone = True
    market.offers[("vast", "7002")].never_reachable = True
    client.env["RENTRAIN_SSH_WAIT_SECONDS"] = "3"
    config = write_job(tmp_path / "job")
    result = client.run("run", str(config), "--provider", "vast", "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    offers = [row["offer_id"] for row in client.instances()]
    assert offers == ["7001", "7002", "7003"]
    assert "is gone" in result.stdout and "not reachable within 3 s" in result.stdout
    assert [i.offer.offer_id for i in market.instances.values()] == ["7002", "7003"]
    _assert_settled(market, client, tmp_path / "job" / "output")


def test_429_and_5xx_storms_are_ridden_out(tmp_path: Path, market: ProviderSimulator, client: Client) -> None:
    market.storm = [429, 429, 429, 500]  # on the catalog search
    market.faults += [
        ("GET", r"^/runpod/v2/pods/\w+$", 500, False),  # while waiting for SSH
        ("GET", r"^/runpod/v2/pods/\w+$", 502, False),
        ("DELETE", r"^/runpod/v2/pods/\w+$", 503, False),  # the first destroy
    ]
    config = write_job(tmp_path / "job")
    result = client.run("run", str(config), "--provider", "runpod", "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert market.storm == [] and market.faults == []
    _assert_settled(market, client, tmp_path / "job" / "output")


def test_an_endless_storm_rents_nothing_and_says_why(tmp_path: Path, market: ProviderSimulator, client: Client) -> None:
    market.storm = [503] * 50
    config = write_job(tmp_path / "job")
    result = client.run("run", str(config), "--provider", "runpod", "--yes")
    assert result.returncode == 1
    assert "ProviderDown" in result.stdout and "no runpod offer" in result.stderr
    assert market.instances == {}


def test_create_that_times_out_after_creating_leaves_nothing_behind(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> None:
    market.faults.append(("PUT", r"^/vast/api/v0/asks/7001/$", 504, True))
    config = write_job(tmp_path / "job")
    result = client.run("run", str(config), "--provider", "vast", "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "that the failed create left behind" in result.stdout
    assert [i.state for i in market.instances.values()] == ["destroyed", "destroyed"]
    _assert_settled(market, client, tmp_path / "job" / "output")


def test_estimate_over_budget_rents_nothing(tmp_path: Path, market: ProviderSimulator, client: Client) -> None:
    config = write_job(tmp_path / "job")
    result = client.run("run", str(config), "--provider", "vast", "--yes", "--max-cost", "0.0001")
    assert result.returncode == 1
    assert "above the budget $0.00" in result.stderr + result.stdout
    assert market.instances == {}


def test_gpuflow_is_refused_before_anything_else(tmp_path: Path, client: Client) -> None:
    result = client.run("run", str(tmp_path / "missing.toml"), "--provider", "gpuflow")
    assert result.returncode == 2
    assert "rentrain cannot train on GPUFlow" in result.stderr and "--provider ssh" in result.stderr


def test_watchdog_deadline_ends_a_detached_job(tmp_path: Path, market: ProviderSimulator, client: Client) -> None:
    config = write_job(tmp_path / "job", images=8, repeats=40, epochs=3)  # long enough to outlive the deadline
    result = client.run("run", str(config), "--provider", "vast", "--yes", "--detach", "--max-hours", "0.003")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "detached" in result.stdout
    instance = next(iter(market.instances.values()))
    # 0.003 h = 10.8 s after create; a checkpoint may not be home, so the watchdog stops or destroys
    assert wait_until(lambda: instance.state in ("stopped", "destroyed"), timeout=90)
    log = (instance.sshd.workdir / "rentrain").glob("*/watchdog.jsonl")
    decisions = [json.loads(line) for path in log for line in path.read_text().splitlines()]
    assert any(d["action"] == "ending" and str(d["reason"]).startswith("deadline") for d in decisions), decisions
    down = client.run("down", str(_job_state(client)["id"]), "--yes")
    assert down.returncode == 0, down.stdout + down.stderr
    assert market.live_instances() == []


def test_watchdog_idle_stops_a_finished_job_whose_results_are_not_home(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> None:
    _config, instance = run_until_the_watchdog_stops_it(tmp_path, market, client)
    assert instance.billed_cost(market.storage_per_hour) > 0
    status = client.run("status")
    assert "detached" in status.stdout
    # the client comes back: the instance is started again, the result fetched, the instance destroyed
    job_id = str(_job_state(client)["id"])
    attached = client.run("attach", job_id)
    assert attached.returncode == 0, attached.stdout + attached.stderr
    assert "stopped by its watchdog to keep unfetched results; starting it" in attached.stdout
    output = tmp_path / "job" / "output"
    assert (output / "e2e.safetensors").exists()
    assert market.live_instances() == []
    assert _job_state(client)["outcome"] == "succeeded"
    # the stopped time at the storage rate, from when the watchdog's own record says it stopped the instance
    assert abs(client.ledger_cost() - market.total_billed()) <= instance.price_per_hour / 3600


def test_ctrl_c_during_setup_destroys_and_after_it_detaches(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> None:
    """Without a terminal to ask: during setup Ctrl-C destroys (the user is there); once training runs, it detaches."""
    config = write_job(tmp_path / "early", images=8, repeats=10, epochs=2)
    process = client.start("run", str(config), "--provider", "vast", "--yes")
    assert wait_until(
        lambda: _job_state(client).get("state") in ("waiting_ssh", "syncing", "bootstrapping"), timeout=60
    )
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130, out
    assert "stopped during setup: the instance is destroyed" in out
    assert market.live_instances() == []
    assert _job_state(client)["outcome"] == "cancelled"

    config = write_job(tmp_path / "late", images=8, repeats=10, epochs=2)
    process = client.start("run", str(config), "--provider", "vast", "--yes")
    assert wait_until(lambda: int(_job_state(client).get("last_step") or 0) >= 2, timeout=120)
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and "detached (Ctrl-C)" in out, out
    assert len(market.live_instances()) == 1
    assert client.run("down", str(_job_state(client)["id"]), "--yes").returncode == 0
    assert market.live_instances() == []
