"""Setup, the minutes between create and the trainer's start: a client killed then leaves nothing billing, a
create answered after the client's timeout leaves nothing billing, and an SSH drop does not end the job."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Client, events_of, write_job
from tests.sim.provider_sim import ProviderSimulator, SimInstance, wait_until
from tests.sim.sshd import descendants


def _job_state(client: Client) -> dict[str, object]:
    try:
        jobs = client.jobs()
    except sqlite3.OperationalError:  # the client is still creating the ledger
        return {}
    return jobs[-1] if jobs else {}


def _watchdog_decisions(market: ProviderSimulator) -> list[dict[str, object]]:
    logs = [path for i in market.instances.values() for path in (i.sshd.workdir / "rentrain").glob("*/watchdog.jsonl")]
    return [json.loads(line) for path in logs for line in path.read_text().splitlines()]


def _drop_ssh(instance: SimInstance) -> None:
    """The network drops: sshd stops listening and every SSH connection ends, while the commands they started
    run on, as on a real host (SshdInstance.stop_sshd kills those too)."""
    listener = instance.sshd.process
    assert listener is not None
    connections = [pid for pid in descendants(listener.pid) if _command_name(pid).startswith("sshd")]
    listener.kill()
    listener.wait(timeout=10)
    for pid in connections:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    instance.sshd.process = None


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.mark.parametrize(
    ("provider", "own_delete"),
    [("vast", r"^/vast/api/v0/instances/\d+/$"), ("runpod", r"^/runpod/v2/pods/\w+$")],  # RunPod: REST v2
)
def test_kill_9_during_setup_leaves_the_instance_to_its_watchdog(
    tmp_path: Path, market: ProviderSimulator, client: Client, provider: str, own_delete: str
) -> None:
    client.env["RENTRAIN_SETUP_TIMEOUT_SECONDS"] = "8"
    config = write_job(tmp_path / "job")
    process = client.start("run", str(config), "--provider", provider, "--yes")
    assert wait_until(lambda: _job_state(client).get("state") == "bootstrapping", timeout=60)
    process.send_signal(signal.SIGKILL)
    process.wait()
    [instance] = market.instances.values()
    assert instance.state == "running"  # setup goes on, no client, no trainer
    # no rentrain command is run: the instance's own watchdog ends it once setup has taken 8 s
    assert wait_until(lambda: market.live_instances() == [], timeout=40), instance.state
    assert instance.state == "destroyed"
    deletes = [path for method, path in market.requests if method == "DELETE"]
    assert len(deletes) == 1 and re.match(own_delete, deletes[0].split("?")[0]), deletes  # the watchdog's own call
    ending = [d for d in _watchdog_decisions(market) if d["action"] == "ending"]
    assert ending and str(ending[0]["reason"]).startswith("setup: the trainer has not started"), ending


def test_a_create_answered_after_the_timeout_is_destroyed_when_it_turns_up(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> None:
    # the provider makes the machine 4 s after the request and answers at 6 s; the client gives up at 2.5 s
    market.late_answers.append(("PUT", r"^/vast/api/v0/asks/7001/$", 4.0, 6.0))
    client.env["RENTRAIN_HTTP_TIMEOUT_SECONDS"] = "2.5"
    client.env["RENTRAIN_CREATE_WINDOW_SECONDS"] = "12"
    config = write_job(tmp_path / "job")
    result = client.run("run", str(config), "--provider", "vast", "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    late, used = sorted(market.instances.values(), key=lambda i: i.created_at)
    assert (late.offer.offer_id, used.offer.offer_id) == ("7001", "7002")
    assert f"destroyed instance {late.id} that the failed create left behind" in result.stdout
    assert late.ended_at is not None and late.ended_at < used.created_at  # ended before the next one was rented
    assert market.live_instances() == []
    assert _job_state(client)["outcome"] == "succeeded"
    # the late one is in the ledger, from when the provider made it
    assert abs(client.ledger_cost() - market.total_billed()) <= used.price_per_hour / 3600


def test_an_ssh_drop_during_setup_is_survived(tmp_path: Path, market: ProviderSimulator, client: Client) -> None:
    client.env["RENTRAIN_SSH_LOST_SECONDS"] = "45"
    config = write_job(tmp_path / "job")
    process = client.start("run", str(config), "--provider", "vast", "--yes")
    assert wait_until(lambda: _job_state(client).get("state") == "bootstrapping", timeout=60)
    [instance] = market.instances.values()
    _drop_ssh(instance)  # every connection ends, and none is taken for 18 s: longer than a blip
    time.sleep(18)
    instance.sshd.start()
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out
    assert "SSH dropped while" in out
    assert len(market.instances) == 1 and market.live_instances() == []
    assert [e["event"] for e in events_of(tmp_path / "job" / "output")][-1] == "done"
    assert _job_state(client)["outcome"] == "succeeded"
