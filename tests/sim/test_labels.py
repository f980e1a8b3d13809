"""The simulator's Vast labels answer as Vast's do: `PUT /instances/{id}/ {"label"}` changes what the instance
GET and the v1 list return, and changes nothing in the bill."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from providers.base import LaunchSpec
from providers.vast import VastProvider
from rentrain.offers import requirements_from
from tests.sim.provider_sim import VAST_KEY, ProviderSimulator, SimOffer

LAUNCH = LaunchSpec(job_id="job42", image="img", disk_gb=20, ssh_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 test")


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[ProviderSimulator]:
    simulator = ProviderSimulator(tmp_path / "sim", [SimOffer("vast", "501", "RTX 4090", 0.40, never_reachable=True)])
    # never_reachable: labels need no sshd
    simulator.start()
    yield simulator
    simulator.shutdown()


def test_a_label_put_shows_in_get_and_list_and_leaves_the_bill_alone(sim: ProviderSimulator) -> None:
    vast = VastProvider(VAST_KEY, base_url=sim.vast_url)
    made = vast.create(vast.search(requirements_from())[0], LAUNCH)
    instance = sim.instances[made.id]
    now = instance.created_at + 100
    bill = instance.billed_cost(sim.storage_per_hour, now=now)
    url = f"{sim.vast_url}/instances/{made.id}/"
    answer = requests.put(
        url,
        json={"label": "rentrain-job42|stopped@1765000000"},
        headers={"Authorization": f"Bearer {instance.instance_key}"},  # the instance's own key, as its watchdog
        timeout=10,
    )
    assert answer.json() == {"success": True}
    stopped_at = datetime.fromtimestamp(1_765_000_000, tz=UTC)
    assert (vast.get(made.id).label, vast.get(made.id).watchdog_stopped_at) == ("rentrain-job42", stopped_at)
    assert [(i.label, i.watchdog_stopped_at) for i in vast.list_instances()] == [("rentrain-job42", stopped_at)]
    assert instance.billed_cost(sim.storage_per_hour, now=now) == bill
    account = {"Authorization": f"Bearer {VAST_KEY}"}
    too_long = requests.put(url, json={"label": "x" * 1025}, headers=account, timeout=10)
    assert too_long.status_code == 400
    assert instance.label == "rentrain-job42|stopped@1765000000"
