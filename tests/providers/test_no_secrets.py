"""No API key in any output, log or exception text, whatever the provider answers."""

from __future__ import annotations

import logging
import traceback

import pytest
import requests
import responses

from providers.base import LaunchSpec, Offer, ProviderError
from rentrain.offers import requirements_from

from .conftest import RUNPOD_KEY, RUNPOD_URL, SSH_KEY, VAST_KEY, VAST_URL

VAST_HOST = VAST_URL.removesuffix("/api/v0")
LAUNCH = LaunchSpec(job_id="job42", image="img", disk_gb=40, ssh_public_key=SSH_KEY)
VAST_OFFER = Offer(
    provider="vast",
    offer_id="4001",
    gpu_model="RTX 4090",
    gpu_name_raw="RTX 4090",
    gpu_count=1,
    vram_gb=24,
    price_per_hour=0.4,
)
RUNPOD_OFFER = Offer(
    provider="runpod",
    offer_id="COMMUNITY/x",
    gpu_model="RTX 4090",
    gpu_name_raw="NVIDIA GeForce RTX 4090",
    gpu_count=1,
    vram_gb=24,
    price_per_hour=0.31,
    cloud="COMMUNITY",
)


def echo(key: str) -> dict:
    """A hostile error body that repeats the key back, in every way a server might."""
    return {"msg": f"bad key {key}", "detail": f"GET /x?api_key={key}", "title": f"Authorization: Bearer {key}"}


def _calls(provider, offer):
    return {
        "search": lambda: provider.search(requirements_from()),
        "create": lambda: provider.create(offer, LAUNCH),
        "get": lambda: provider.get("1"),
        "list": lambda: provider.list_instances(),
        "stop": lambda: provider.stop("1"),
        "destroy": lambda: provider.destroy("1"),
    }


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 409, 410, 422, 429, 500, 503])
@pytest.mark.parametrize("operation", ["search", "create", "get", "list", "stop", "destroy"])
def test_vast_errors_never_contain_the_key(vast, status, operation, caplog):
    caplog.set_level(logging.DEBUG)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mocked:
        for method in (responses.GET, responses.POST, responses.PUT, responses.DELETE):
            mocked.add(method, _any(VAST_HOST), status=status, json=echo(VAST_KEY))  # /api/v0 and /api/v1
        _assert_clean(_calls(vast, VAST_OFFER)[operation], VAST_KEY, caplog)


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 409, 422, 429, 500, 503])
@pytest.mark.parametrize("operation", ["search", "create", "get", "list", "stop", "destroy"])
def test_runpod_errors_never_contain_the_key(runpod, status, operation, caplog):
    caplog.set_level(logging.DEBUG)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mocked:
        for method in (responses.GET, responses.POST, responses.PUT, responses.DELETE):
            mocked.add(method, _any(RUNPOD_URL), status=status, json=echo(RUNPOD_KEY))
        _assert_clean(_calls(runpod, RUNPOD_OFFER)[operation], RUNPOD_KEY, caplog)


@pytest.mark.parametrize("which", ["vast", "runpod"])
def test_network_failures_never_contain_the_key(which, request, caplog):
    provider = request.getfixturevalue(which)
    key, url = (VAST_KEY, VAST_URL) if which == "vast" else (RUNPOD_KEY, RUNPOD_URL)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mocked:
        for method in (responses.GET, responses.POST, responses.PUT, responses.DELETE):
            mocked.add(
                method, _any(url), body=requests.ConnectionError(f"Max retries exceeded with url: /x?api_key={key}")
            )
        _assert_clean(lambda: provider.get("1"), key, caplog)


def _any(base: str):
    import re

    return re.compile(re.escape(base) + ".*")


def _assert_clean(call, key: str, caplog) -> None:
    with pytest.raises(ProviderError) as caught:
        call()
    exc = caught.value
    rendered = "".join(traceback.format_exception(exc)) + repr(exc) + str(exc.args) + exc.message
    assert key not in rendered
    assert key not in caplog.text
