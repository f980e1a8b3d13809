"""Shared pieces for the provider tests: documented response shapes, a fake clock, adapters on fake URLs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import responses

from providers.runpod import RunPodProvider
from providers.vast import VastProvider

FIXTURES = Path(__file__).parent / "fixtures"
# Distinctive, so a leak anywhere is easy to find.
VAST_KEY = "vastkey-SECRET-0a1b2c3d4e5f"
RUNPOD_KEY = "rpa_SECRET9z8y7x6w5v4u"
VAST_URL = "https://vast.test/api/v0"
RUNPOD_URL = "https://runpod.test"
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJobKeyForTests000000000000000000000 rentrain-job42"


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


class FakeClock:
    """sleep() advances time instead of waiting; every sleep is recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def mocked() -> Any:
    with responses.RequestsMock(assert_all_requests_are_fired=True) as rsps:
        yield rsps


@pytest.fixture
def markets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both markets' keys and the recorded-response URLs, and a terminal wide enough for whole tables."""
    monkeypatch.setenv("VAST_API_KEY", VAST_KEY)
    monkeypatch.setenv("RUNPOD_API_KEY", RUNPOD_KEY)
    monkeypatch.setenv("RENTRAIN_VAST_URL", VAST_URL)
    monkeypatch.setenv("RENTRAIN_RUNPOD_URL", RUNPOD_URL)
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def vast(clock: FakeClock) -> VastProvider:
    return VastProvider(VAST_KEY, VAST_URL, sleep=clock.sleep, clock=clock)


@pytest.fixture
def runpod(clock: FakeClock) -> RunPodProvider:
    return RunPodProvider(RUNPOD_KEY, RUNPOD_URL, sleep=clock.sleep, clock=clock)


def body(call: Any) -> Any:
    return json.loads(call.request.body)
