"""The money an offer states beyond its hourly price: bandwidth per GB and storage per hour, read from the
shapes PROVIDERS.md documents (Vast offer rows; RunPod's published disk rates)."""

from __future__ import annotations

import pytest
import responses
from responses import matchers

from providers.base import HOURS_PER_MONTH
from providers.runpod import RunPodProvider
from providers.vast import VastOffer, VastProvider
from rentrain.offers import requirements_from
from tests.sim.provider_sim import ProviderSimulator, SimOffer

from .conftest import RUNPOD_URL, VAST_URL, load


def test_vast_offers_carry_uplink_bandwidth_prices_and_storage_for_the_disk_asked(mocked, vast: VastProvider):
    mocked.add(responses.POST, f"{VAST_URL}/bundles/", json=load("vast_bundles.json"))
    offers = {o.offer_id: o for o in vast.search(requirements_from(disk_gb=60))}
    rtx4090 = offers["4001"]  # inet_up 720.5, inet_down_cost 0.001, inet_up_cost 0.002, storage_cost 0.15
    assert (rtx4090.download_mbps, rtx4090.upload_mbps) == (850.2, 720.5)
    assert (rtx4090.inet_down_usd_per_gb, rtx4090.inet_up_usd_per_gb) == (0.001, 0.002)
    assert rtx4090.storage_usd_per_hour == pytest.approx(0.15 * 60 / HOURS_PER_MONTH)
    assert rtx4090.price_per_hour == 0.412  # dph_total: the running price already holds the disk


def test_a_vast_row_without_the_money_fields_leaves_them_unknown():
    row = {"id": 1, "gpu_name": "RTX 3090", "num_gpus": 1, "gpu_ram": 24576, "dph_total": 0.2}
    from providers.vast import _offer

    offer = _offer(VastOffer.model_validate(row), False, 40)
    assert (offer.upload_mbps, offer.inet_down_usd_per_gb, offer.inet_up_usd_per_gb) == (None, None, None)
    assert offer.storage_usd_per_hour is None


def test_runpod_offers_have_no_bandwidth_fees_and_a_volume_that_bills_while_stopped(mocked, runpod: RunPodProvider):
    for cloud, fixture in (("COMMUNITY", "runpod_catalog_community.json"), ("SECURE", "runpod_catalog_secure.json")):
        params = {"include": "AVAILABILITY", "product": "POD", "cloud": cloud, "count": "1", "minCudaVersion": "12.1"}
        mocked.add(
            responses.GET,
            f"{RUNPOD_URL}/v2/catalog/gpus",
            json=load(fixture),
            match=[matchers.query_param_matcher(params)],
        )
    offers = runpod.search(requirements_from(disk_gb=40))
    assert offers
    for offer in offers:
        assert (offer.inet_down_usd_per_gb, offer.inet_up_usd_per_gb) == (0.0, 0.0)
        assert offer.upload_mbps is None and offer.download_mbps is None  # RunPod publishes no link speed
        # stopped: the 40 GB volume at $0.20/GB/month; running: 40 GB container disk + 40 GB volume at $0.10
        assert offer.storage_usd_per_hour == pytest.approx(40 * 0.20 / HOURS_PER_MONTH)
        assert offer.storage_usd_per_hour == pytest.approx((40 * 0.10 + 40 * 0.10) / HOURS_PER_MONTH)


def test_the_simulators_vast_rows_carry_the_money_fields_in_vasts_shape(tmp_path):
    sim = ProviderSimulator(tmp_path, [SimOffer("vast", "7", "RTX 4090", 0.4)])
    row = VastOffer.model_validate(sim._vast_offer(sim.offers[("vast", "7")]))
    assert (row.inet_up, row.inet_down_cost, row.inet_up_cost, row.storage_cost) == (600.0, 0.002, 0.005, 0.15)
