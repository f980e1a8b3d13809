"""Provider name -> adapter. The job runner registers the providers it owns (`local`, `ssh`) here too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from providers.base import Provider, Unsupported
from providers.gpuflow import NAME as GPUFLOW
from providers.gpuflow import REFUSAL as GPUFLOW_REFUSAL
from providers.gpuflow import GpuFlowProvider
from providers.runpod import RunPodProvider
from providers.vast import VastProvider

ProviderFactory = Callable[..., Provider]

# The markets `rentrain offers` compares, in display order.
MARKETS: tuple[str, ...] = ("vast", "runpod", "gpuflow")

# Markets whose adapter needs an API key, and the environment variable that holds it.
API_KEY_ENV: dict[str, str] = {"vast": "VAST_API_KEY", "runpod": "RUNPOD_API_KEY"}

_FACTORIES: dict[str, ProviderFactory] = {
    "vast": VastProvider,
    "runpod": RunPodProvider,
    "gpuflow": GpuFlowProvider,
}

# Why a provider cannot run a training job at all; checked before anything else happens.
_CANNOT_RUN: dict[str, str] = {GPUFLOW: GPUFLOW_REFUSAL}


def register(name: str, factory: ProviderFactory) -> None:
    _FACTORIES[name] = factory


def names() -> list[str]:
    return list(_FACTORIES)


def needs_api_key(name: str) -> bool:
    return name in API_KEY_ENV


def create_provider(name: str, **kwargs: Any) -> Provider:
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(_FACTORIES)}") from None
    return factory(**kwargs)


def ensure_can_run(name: str) -> None:
    """Raise Unsupported, with the reason and the alternative, when `name` can never run a job."""
    if name in _CANNOT_RUN:
        raise Unsupported(name, _CANNOT_RUN[name])
