"""The simulator speaks what the real adapters send: search, create, SSH in, stop, destroy, bill."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from providers.base import AuthError, LaunchSpec, NotFound, OfferGone
from providers.runpod import RunPodProvider
from providers.vast import VastProvider
from rentrain.offers import requirements_from
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
    offers = [o for o in provider.search(requirements_from(min_reliability=0.9)) if o.gpu_model == "RTX 4090"]
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
    gone = next(o for o in provider.search(requirements_from(min_reliability=0.9)) if o.offer_id == "502")
    with pytest.raises(OfferGone):
        provider.create(gone, _launch("gone"))
    assert sim.live_instances() == []


def test_the_vast_v0_list_is_gone_and_v1_pages_25_rows(sim: ProviderSimulator) -> None:
    """As migrated accounts see it: v0 answers 410 deprecated_endpoint; v1 pages with next_token/after_token."""
    orphans = [sim.create_orphan("vast", f"rentrain-orphan-{n}") for n in range(30)]
    auth = {"Authorization": f"Bearer {VAST_KEY}"}
    v0 = requests.get(f"{sim.vast_url}/instances/", headers=auth, timeout=5)
    assert v0.status_code == 410 and v0.json()["error"] == "deprecated_endpoint"
    v1 = f"{sim.base_url}/vast/api/v1/instances/"
    first = requests.get(v1, params={"limit": 25}, headers=auth, timeout=5).json()
    assert (first["success"], first["instances_found"], first["total_instances"]) == (True, 25, 30)
    second = requests.get(v1, params={"limit": 25, "after_token": first["next_token"]}, headers=auth, timeout=5).json()
    assert second["instances_found"] == 5 and second["next_token"] is None
    asked_before = len(sim.requests)
    listed = VastProvider(VAST_KEY, base_url=sim.vast_url).list_instances()
    assert sorted(i.id for i in listed) == sorted(o.id for o in orphans)
    adapter_paths = [path.split("?")[0] for _, path in sim.requests[asked_before:]]
    assert adapter_paths == ["/vast/api/v1/instances/", "/vast/api/v1/instances/"]


def test_an_account_not_yet_migrated_still_gets_the_v0_list(tmp_path: Path) -> None:
    simulator = ProviderSimulator(
        tmp_path / "sim", [SimOffer("vast", "501", "RTX 4090", 0.40)], vast_v0_instance_list=True
    )
    simulator.start()
    try:
        simulator.create_orphan("vast", "rentrain-old")
        answer = requests.get(
            f"{simulator.vast_url}/instances/", headers={"Authorization": f"Bearer {VAST_KEY}"}, timeout=5
        )
        assert answer.status_code == 200 and [i["label"] for i in answer.json()["instances"]] == ["rentrain-old"]
    finally:
        simulator.shutdown()


def test_a_wrong_vast_key_is_a_404_auth_error_that_the_adapter_reports_as_such(sim: ProviderSimulator) -> None:
    provider = VastProvider("not-the-key", base_url=sim.vast_url, key_source="the environment variable VAST_API_KEY")
    with pytest.raises(AuthError) as caught:
        provider.list_instances()
    assert "rejected the API key from the environment variable VAST_API_KEY (HTTP 404)" in str(caught.value)
    with pytest.raises(AuthError, match="HTTP 401"):
        provider.destroy("1")


def test_the_runpod_catalog_lists_cuda_versions_as_objects(sim: ProviderSimulator) -> None:
    answer = requests.get(
        f"{sim.runpod_url}/v2/catalog/gpus", headers={"Authorization": f"Bearer {RUNPOD_KEY}"}, timeout=5
    ).json()
    assert answer["gpus"][0]["cudaVersions"][0] == {"version": "12.4", "available": True}
    provider = RunPodProvider(RUNPOD_KEY, base_url=sim.runpod_url)
    [offer] = [o for o in provider.search(requirements_from()) if o.gpu_model == "RTX 4090"]
    assert offer.max_cuda == 12.4 and provider.last_search_skipped == []  # 12.8 is listed but full


@pytest.mark.parametrize("kind", ["vast", "runpod"])
def test_an_orphan_is_listed_by_label_and_bills_its_storage_while_stopped(sim: ProviderSimulator, kind: str) -> None:
    orphan = sim.create_orphan(kind, "rentrain-nobody-knows")
    provider: VastProvider | RunPodProvider = (
        VastProvider(VAST_KEY, base_url=sim.vast_url)
        if kind == "vast"
        else RunPodProvider(RUNPOD_KEY, base_url=sim.runpod_url)
    )
    assert [(i.id, i.label) for i in provider.list_instances()] == [(orphan.id, "rentrain-nobody-knows")]
    provider.stop(orphan.id)
    stopped = provider.get(orphan.id)
    assert stopped.status == "stopped"
    assert stopped.storage_usd_per_hour == pytest.approx(sim.storage_per_hour, rel=0.02)
    provider.destroy(orphan.id)
    assert sim.live_instances() == []


def test_each_market_lists_and_reaches_only_its_own_instances(sim: ProviderSimulator) -> None:
    on_vast = sim.create_orphan("vast", "rentrain-on-vast")
    on_runpod = sim.create_orphan("runpod", "rentrain-on-runpod")
    vast = VastProvider(VAST_KEY, base_url=sim.vast_url)
    runpod = RunPodProvider(RUNPOD_KEY, base_url=sim.runpod_url)
    assert [i.id for i in vast.list_instances()] == [on_vast.id]
    assert [i.id for i in runpod.list_instances()] == [on_runpod.id]
    with pytest.raises(NotFound):
        vast.get(on_runpod.id)
    with pytest.raises(NotFound):
        runpod.get(on_vast.id)
