"""`rentrain run --provider vast|runpod` end to end: real sshd, rsync, bootstrap, watchdog, trainer, fetch, destroy."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.e2e.conftest import Client, events_of, write_job
from tests.sim.provider_sim import ProviderSimulator


def _assert_nothing_billing(market: ProviderSimulator, client: Client) -> None:
    assert market.live_instances() == [], [i.id for i in market.live_instances()]
    price = max(i.price_per_hour for i in market.instances.values())
    assert abs(client.ledger_cost() - market.total_billed()) <= price / 3600


@pytest.mark.parametrize("provider", ["vast", "runpod"])
def test_run_trains_fetches_and_destroys(tmp_path: Path, market: ProviderSimulator, client: Client, provider: str) -> None:
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
    assert [Path(str(e["path"])).name for e in checkpoints] == ["e2e-000001.safetensors"]  # the last epoch is the final file
    for event in checkpoints:
        assert hashlib.sha256((output / Path(str(event["path"])).name).read_bytes()).hexdigest() == event["sha256"]
    assert list((output / "samples").glob("*.png")), "no sample grid came home"
    job = client.jobs()[-1]
    assert job["state"] == "closed" and job["outcome"] == "succeeded"
    assert job["result_sha256"] == hashlib.sha256(final.read_bytes()).hexdigest()
    assert "setup gpu: ok" in result.stdout
    _assert_nothing_billing(market, client)
