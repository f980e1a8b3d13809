"""The ledger's cost of a job against what the simulator billed for the job's instances (per second, storage
while stopped): equal within 1% on a clean run, after a host died, after the watchdog stopped the instance
while no client watched (then attached, or destroyed by `down` without a start: the stop mark on its label),
and after creates that failed or answered late."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from providers.base import split_stop_mark
from rentrain.ledger import Ledger
from tests.e2e.conftest import Client, started_market, write_job
from tests.sim.provider_sim import ProviderSimulator, SimInstance, SimOffer, wait_until

TOLERANCE = 0.01
STOPPED_SECONDS = 5.0  # counted at the full price, this alone would put the ledger several % above the bill


def _only_job(client: Client) -> dict[str, object]:
    jobs = client.jobs()
    assert len(jobs) == 1, jobs
    return jobs[0]


def _costs(client: Client, market: ProviderSimulator) -> tuple[float, float]:
    """(the ledger's cost of the job, what the simulator billed for the instances with the job's label)."""
    job = _only_job(client)
    ledger = Ledger(client.ledger_path).job_cost(str(job["id"]))
    ours = [i for i in market.instances.values() if split_stop_mark(i.label)[0] == job["label"]]
    billed = sum(i.billed_cost(market.storage_per_hour) for i in ours)
    print(f"ledger ${ledger:.6f}, simulator ${billed:.6f}, {100 * (ledger / billed - 1):+.2f}%")
    return ledger, billed


def _assert_ledger_is_the_bill(client: Client, market: ProviderSimulator) -> None:
    assert market.live_instances() == [], [(i.id, i.state) for i in market.live_instances()]
    ledger, billed = _costs(client, market)
    assert billed > 0
    assert ledger == pytest.approx(billed, rel=TOLERANCE)


def _job_field(client: Client, name: str) -> object:
    try:
        jobs = client.jobs()
    except sqlite3.OperationalError:  # the client is still creating the ledger
        return None
    return jobs[-1].get(name) if jobs else None


@pytest.mark.parametrize("provider", ["vast", "runpod"])
def test_a_clean_run_costs_what_was_billed(
    tmp_path: Path, market: ProviderSimulator, client: Client, provider: str
) -> None:
    config = write_job(tmp_path / "job")
    result = client.run("run", str(config), "--provider", provider, "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_ledger_is_the_bill(client, market)


def test_a_host_that_died_and_the_resume_elsewhere_cost_what_was_billed(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> None:
    config = write_job(tmp_path / "job", images=4, repeats=10, epochs=3)  # 20 steps an epoch
    process = client.start("run", str(config), "--provider", "vast", "--yes")
    assert wait_until(lambda: bool(_job_field(client, "last_state_path")), timeout=180)
    market.kill_host(market.live_instances()[0].id)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    assert "host lost" in out
    assert len(market.instances) == 2
    _assert_ledger_is_the_bill(client, market)


def _detach_until_the_watchdog_stops_it(tmp_path: Path, market: ProviderSimulator, client: Client) -> SimInstance:
    """As conftest's run_until_the_watchdog_stops_it, with an idle timeout long enough (24 s, billed in full) that
    the tenth of a second between the watchdog's decision and the provider acting on it stays well under 1% of the
    bill; then the instance stays stopped a while, billing its storage only."""
    config = write_job(tmp_path / "job")
    result = client.run("run", str(config), "--provider", "vast", "--yes", "--detach", "--idle-timeout", "0.4")
    assert result.returncode == 0, result.stdout + result.stderr
    instance = next(iter(market.instances.values()))
    assert wait_until(lambda: instance.state == "stopped", timeout=180), instance.state
    time.sleep(STOPPED_SECONDS)
    return instance


def test_an_instance_the_watchdog_stopped_costs_what_was_billed_once_attach_reads_its_record(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> None:
    instance = _detach_until_the_watchdog_stops_it(tmp_path, market, client)
    status = client.run("status")  # sees it stopped before the watchdog's record can be read
    assert status.returncode == 0, status.stdout + status.stderr
    attached = client.run("attach", str(_only_job(client)["id"]))
    assert attached.returncode == 0, attached.stdout + attached.stderr
    assert instance.stopped and instance.stopped[0][1] is not None  # it was started again
    _assert_ledger_is_the_bill(client, market)


def test_an_instance_the_watchdog_stopped_and_down_destroyed_costs_what_was_billed(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> None:
    """`down` cannot read the watchdog's log on the stopped disk: the stop counts from the mark the watchdog put
    on the instance's label just before it stopped it."""
    instance = _detach_until_the_watchdog_stops_it(tmp_path, market, client)
    _label, marked_at = split_stop_mark(instance.label)
    assert marked_at is not None, instance.label
    down = client.run("down", str(_only_job(client)["id"]), "--yes")
    assert down.returncode == 0, down.stdout + down.stderr
    assert instance.stopped and instance.stopped[0][1] is None  # never started again
    _assert_ledger_is_the_bill(client, market)


def test_creates_that_failed_or_answered_late_cost_what_was_billed(tmp_path: Path, client: Client) -> None:
    market = started_market(
        tmp_path / "market",
        [
            SimOffer("vast", "7000", "RTX 4090", 0.35, gone=True),
            SimOffer("vast", "7001", "RTX 4090", 0.40),
            SimOffer("vast", "7002", "RTX 4090", 0.45, never_reachable=True),
            SimOffer("vast", "7003", "RTX 4090", 0.50),
        ],
    )
    try:
        # 7001 is made 4 s after the request and answered at 6 s, after the client gave up at 2.5 s
        market.late_answers.append(("PUT", r"^/vast/api/v0/asks/7001/$", 4.0, 6.0))
        client.env.update(
            RENTRAIN_VAST_URL=market.vast_url,
            RENTRAIN_HTTP_TIMEOUT_SECONDS="2.5",
            RENTRAIN_CREATE_WINDOW_SECONDS="12",
            RENTRAIN_SSH_WAIT_SECONDS="3",
        )
        config = write_job(tmp_path / "job")
        result = client.run("run", str(config), "--provider", "vast", "--yes")
        assert result.returncode == 0, result.stdout + result.stderr
        assert [i.offer.offer_id for i in market.instances.values()] == ["7001", "7002", "7003"]
        _assert_ledger_is_the_bill(client, market)
    finally:
        market.shutdown()
