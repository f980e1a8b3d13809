"""Every job teaches the estimator: after one run of the bundled example on the simulator, the estimate for the same
job on the same offer comes from that run's measurements, and it is within ±15% of what the second identical run
is billed (the simulator bills per second)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from rentrain.ledger import Ledger
from tests.e2e.conftest import Client, started_market
from tests.sim.provider_sim import ProviderSimulator, SimOffer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny"
TOLERANCE = 0.15
BOOT_SECONDS = 20.0


@pytest.fixture
def one_offer(tmp_path: Path) -> Iterator[ProviderSimulator]:
    # the simulator bills time and storage but meters no bytes: its one offer's host bills no bandwidth either
    host = SimOffer("vast", "7101", "RTX 4090", 0.40, inet_down_cost=0.0, inet_up_cost=0.0)
    # a host that boots in 20 s (real ones take one to five minutes): the estimator must learn that too
    simulator = started_market(tmp_path / "market", [host], boot_seconds=BOOT_SECONDS)
    yield simulator
    simulator.shutdown()


def _example(folder: Path) -> Path:
    shutil.copytree(EXAMPLE, folder)
    return folder / "config.toml"


def _estimate(client: Client, config: Path) -> dict[str, object]:
    result = client.run("estimate", "--config", str(config), "--provider", "vast", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    best = json.loads(result.stdout)["best_per_provider"]
    assert len(best) == 1 and best[0]["offer_id"] == "7101"
    estimate: dict[str, object] = best[0]["estimate"]
    return estimate


def _billed(market: ProviderSimulator, label: str) -> float:
    return sum(i.billed_cost(market.storage_per_hour) for i in market.instances.values() if i.label == label)


def test_after_one_run_the_estimate_of_the_same_job_is_within_15_percent_of_the_next_runs_bill(
    tmp_path: Path, one_offer: ProviderSimulator
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    client = Client(home, one_offer)
    client.env["RENTRAIN_SSH_WAIT_SECONDS"] = str(3 * BOOT_SECONDS)
    first, second = _example(tmp_path / "first"), _example(tmp_path / "second")

    before = _estimate(client, first)
    assert before["speed_kind"] == "assumed" and "modelled" in str(before["setup_source"])

    result = client.run("run", str(first), "--provider", "vast", "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    calibrated = _estimate(client, second)
    assert calibrated["speed_kind"] == "measured" and "your 1 job" in str(calibrated["speed_source"])
    assert "your 1 job" in str(calibrated["setup_source"])

    result = client.run("run", str(second), "--provider", "vast", "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert one_offer.live_instances() == []
    job = client.jobs()[-1]
    billed = _billed(one_offer, str(job["label"]))
    assert Ledger(client.ledger_path).job_cost(str(job["id"])) == pytest.approx(billed, rel=0.01)
    estimate = float(str(calibrated["cost_usd"]))
    print(
        f"before ${before['cost_usd']}, calibrated ${estimate:.6f}, billed ${billed:.6f}, "
        f"{100 * (estimate / billed - 1):+.1f}%"
    )
    assert estimate == pytest.approx(billed, rel=TOLERANCE)
