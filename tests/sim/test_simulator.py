"""The simulator speaks what the real adapters send: search, create, SSH in, stop, destroy, bill."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from providers.base import LaunchSpec, NotFound, OfferGone, Requirements
from providers.runpod import RunPodProvider
from providers.vast import VastProvider
from rentrain.sshkeys import create_job_key
from rentrain.transport import Remote, SshEndpoint
from tests.sim.provider_sim import RUNPOD_KEY, VAST_KEY, ProviderSimulator, SimOffer, wait_until


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[ProviderSimulator]:
    simulator = ProviderSimulator(
        tmp_path / "sim",
        [
            SimOffer("vast", "501", "RTX 4090", 0.40),
            SimOffer("vast", "502", "RTX 3090", 0.20, gone=True),
            SimOffer("runpod", "NVIDIA GeForce RTX 4090", "RTX 4090", 0.34),
        ],
    )
    simulator.start()
    yield simulator
    simulator.shutdown()


def _launch(job: str) -> LaunchSpec:
    key = create_job_key(job)
    return LaunchSpec(job_id=job, image="img", disk_gb=20, ssh_public_key=key.public_line)


def _wait_running(provider: VastProvider | RunPodProvider, instance_id: str) -> SshEndpoint:
    assert wait_until(lambda: provider.get(instance_id).ssh is not None, timeout=10)
    ssh = provider.get(instance_id).ssh
    assert ssh is not None
    return SshEndpoint(host=ssh.host, port=ssh.port, user=ssh.user)


@pytest.mark.parametrize("kind", ["vast", "runpod"])
def test_rent_log_in_destroy_and_bill(sim: ProviderSimulator, kind: str) -> None:
    if kind == "vast":
        provider: VastProvider | RunPodProvider = VastProvider(VAST_KEY, base_url=sim.vast_url)
    else:
        provider = RunPodProvider(RUNPOD_KEY, base_url=sim.runpod_url)
    offers = [o for o in provider.search(Requirements(min_reliability=0.9)) if o.gpu_model == "RTX 4090"]
    assert offers, "the 4090 offer should pass the default filters"
    launch = _launch(f"sim-{kind}")
    instance = provider.create(offers[0], launch)
    assert instance.label == f"rentrain-sim-{kind}"
    endpoint = _wait_running(provider, instance.id)
    from rentrain.sshkeys import load_job_key

    remote = Remote(endpoint, load_job_key(f"sim-{kind}").private_path, None)
    env_names = "CONTAINER_ID" if kind == "vast" else "RUNPOD_POD_ID"
    assert remote.run(f"echo ${env_names}").stdout.strip() == instance.id
    remote.close()
    assert [i.id for i in provider.list_instances()] == [instance.id]
    time.sleep(0.2)
    provider.destroy(instance.id)
    assert sim.live_instances() == []
    billed = sim.instances[instance.id]
    assert billed.billed_cost(sim.storage_per_hour) > 0
    if kind == "vast":
        with pytest.raises(NotFound):
            provider.get(instance.id)
    if kind == "runpod":
        assert any(k.endswith("user@laptop") for k in sim.runpod_account_keys), "the user's own key was dropped"


def test_gone_offer_is_offer_gone(sim: ProviderSimulator) -> None:
    provider = VastProvider(VAST_KEY, base_url=sim.vast_url)
    gone = next(o for o in provider.search(Requirements(min_reliability=0.9)) if o.offer_id == "502")
    with pytest.raises(OfferGone):
        provider.create(gone, _launch("gone"))
    assert sim.live_instances() == []
