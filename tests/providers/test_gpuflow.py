"""GPUFlow: no renter API, no SSH. The adapter says so instead of pretending."""

from __future__ import annotations

import pytest

from providers import registry
from providers.base import LaunchSpec, Offer, Unsupported
from providers.gpuflow import REFUSAL, GpuFlowProvider
from rentrain.offers import requirements_from

from .conftest import SSH_KEY


def test_search_says_why_there_are_no_offers():
    with pytest.raises(Unsupported) as caught:
        GpuFlowProvider().search(requirements_from())
    message = caught.value.message
    assert "no renter API" in message and "SSH" in message and "web UI" in message


def test_run_is_refused_up_front_with_the_reason_and_the_alternative():
    with pytest.raises(Unsupported) as caught:
        registry.ensure_can_run("gpuflow")
    message = caught.value.message
    assert message == REFUSAL
    assert "no SSH or shell" in message
    assert "chat model" in message
    assert "--provider ssh" in message
    assert "https://gpuflow.app/en/marketplace" in message


@pytest.mark.parametrize("name", ["vast", "runpod"])
def test_other_markets_can_run(name):
    registry.ensure_can_run(name)


def test_lifecycle_calls_refuse_too():
    provider = GpuFlowProvider()
    offer = Offer(
        provider="gpuflow",
        offer_id="x",
        gpu_model="RTX 4090",
        gpu_name_raw="RTX 4090",
        gpu_count=1,
        vram_gb=24,
        price_per_hour=0.4,
    )
    launch = LaunchSpec(job_id="j1", image="img", disk_gb=20, ssh_public_key=SSH_KEY)
    for call in (
        lambda: provider.create(offer, launch),
        lambda: provider.get("1"),
        lambda: provider.stop("1"),
        lambda: provider.destroy("1"),
        provider.self_destroy_recipe,
    ):
        with pytest.raises(Unsupported, match="--provider ssh"):
            call()
    assert provider.list_instances() == []
    assert provider.info.can_search is False and provider.info.can_provision is False


def test_registry_leaves_room_for_the_runner_providers():
    class LocalProvider:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    registry.register("local-test", LocalProvider)
    try:
        assert isinstance(registry.create_provider("local-test", workdir="/tmp"), LocalProvider)
        assert "local-test" in registry.names()
        assert not registry.needs_api_key("local-test")
    finally:
        registry._FACTORIES.pop("local-test")
    with pytest.raises(ValueError, match="unknown provider"):
        registry.create_provider("nope")


@pytest.mark.parametrize("name", ["vast", "runpod", "gpuflow"])
def test_every_market_adapter_implements_the_provider_protocol(name):
    from providers.base import Provider

    adapter = registry.create_provider(name, api_key="k")
    assert isinstance(adapter, Provider)
    assert adapter.info.name == name
