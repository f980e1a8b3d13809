"""All providers' offers -> requirements filter -> ranked by estimated total job cost (or $/h).

The job runner calls `find_offers(...)` and rents `ranked[0]`, then the next on failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from providers import registry
from providers.base import Offer, Provider, ProviderError, ReportsSkippedRows, Requirements, Unsupported
from providers.gpu_names import normalise_gpu_name
from remote.config import JobSettings, LoadedConfig
from rentrain.costs import JobEstimate, estimate_job
from rentrain.credentials import CredentialsError, open_provider
from rentrain.dataset_check import inspect_dataset
from rentrain.history import JobHistory
from rentrain.job_profile import JobProfile, profile_from_check

if TYPE_CHECKING:
    from rentrain.job_phases.context import RunSettings

# The RunPod catalog's stock level: NONE means the scheduler has nothing to place us on.
NO_STOCK = "NONE"
VRAM_TOLERANCE_GB = 0.5  # cards report a little under nominal (a "24 GB" card: 23.99 GiB on Vast)


class ProviderNote(BaseModel):
    """A provider that gave no offers, and why: shown as a row, never a crash."""

    provider: str
    kind: Literal["unsupported", "error"]
    message: str
    summary: str = Field(description="A few words for a table cell; `message` has the whole reason.")


class SkippedRows(BaseModel):
    """Rows of a provider's answer that could not be read and were dropped; its other rows still count."""

    provider: str
    reasons: list[str] = Field(description="One line per dropped row: which row, which field, why.")


class RankedOffer(BaseModel):
    offer: Offer
    estimate: JobEstimate | None = None


class ProviderAnswers(BaseModel):
    offers: list[Offer]
    notes: list[ProviderNote]
    skipped: list[SkippedRows]


class OfferSearch(BaseModel):
    ranked: list[RankedOffer]
    notes: list[ProviderNote]
    considered: int  # offers returned before filtering
    skipped: list[SkippedRows] = Field(default_factory=list)


def requirements_from(job: JobSettings | None = None, **overrides: Any) -> Requirements:
    """Requirements from a config's [rentrain] table (JobSettings; its defaults without a config), then CLI
    overrides (None = not given)."""
    job = job if job is not None else JobSettings()
    values: dict[str, Any] = {
        "gpu_count": job.gpu_count,
        "min_vram_gb": job.min_vram_gb,
        "min_reliability": job.min_reliability,
        "min_cuda": job.min_cuda,
        "verified_only": job.verified_only,
        "include_interruptible": job.include_interruptible,
        "max_price_per_hour": job.max_price_per_hour,
        "gpu_models": list(job.gpu),
        "disk_gb": job.disk_gb,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Requirements(**values)


def query_providers(
    names: Iterable[str],
    requirements: Requirements,
    opener: Callable[[str], Provider] = open_provider,
) -> ProviderAnswers:
    """Ask every provider at once. A provider that fails becomes a note; the others still answer. Rows a
    provider dropped as unreadable are collected per provider."""
    names = list(names)

    def ask(name: str) -> tuple[list[Offer], SkippedRows | None] | ProviderNote:
        provider: Provider | None = None
        try:
            provider = opener(name)
            if not provider.info.can_search:
                raise Unsupported(name, provider.info.unavailable_reason or "cannot list offers")
            found = provider.search(requirements)
            skipped = provider.last_search_skipped if isinstance(provider, ReportsSkippedRows) else []
            return found, SkippedRows(provider=name, reasons=list(skipped)) if skipped else None
        except Unsupported as exc:
            summary = (provider.info.unavailable_summary if provider else None) or "not supported"
            return ProviderNote(provider=name, kind="unsupported", message=exc.message, summary=summary)
        except ProviderError as exc:
            kind = type(exc).__name__
            return ProviderNote(provider=name, kind="error", message=f"{kind}: {exc.message}", summary=kind)
        except CredentialsError as exc:
            return ProviderNote(provider=name, kind="error", message=str(exc), summary="no API key")

    answers = ProviderAnswers(offers=[], notes=[], skipped=[])
    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        for result in pool.map(ask, names):
            if isinstance(result, ProviderNote):
                answers.notes.append(result)
                continue
            found, skipped = result
            answers.offers.extend(found)
            if skipped is not None:
                answers.skipped.append(skipped)
    return answers


def meets(offer: Offer, req: Requirements) -> bool:
    """The requirements, checked on our side for every provider. An unknown value passes its check."""
    if offer.gpu_count != req.gpu_count:
        return False
    if offer.vram_gb < req.min_vram_gb - VRAM_TOLERANCE_GB:
        return False
    if offer.reliability is not None and offer.reliability < req.min_reliability:
        return False
    if req.min_cuda is not None and offer.max_cuda is not None and offer.max_cuda < req.min_cuda:
        return False
    if req.verified_only and offer.verified is False:
        return False
    if offer.interruptible and not req.include_interruptible:
        return False
    if req.max_price_per_hour is not None and offer.price_per_hour > req.max_price_per_hour:
        return False
    if req.gpu_models and offer.gpu_model not in req.gpu_models:
        return False
    if (
        req.min_download_mbps is not None
        and offer.download_mbps is not None
        and offer.download_mbps < req.min_download_mbps
    ):
        return False
    return offer.availability != NO_STOCK


def rank(
    offers: Iterable[Offer], profile: JobProfile | None = None, history: JobHistory | None = None
) -> list[RankedOffer]:
    """Cheapest first: by estimated job cost with a profile (offers without an estimate last), else by $/h.
    Estimates use the user's own job `history` where it measured the offer's GPU."""
    ranked = [RankedOffer(offer=o, estimate=estimate_job(profile, o, history) if profile else None) for o in offers]

    def key(item: RankedOffer) -> tuple[Any, ...]:
        reliability = item.offer.reliability if item.offer.reliability is not None else 0.0
        if profile is not None:
            cost = item.estimate.cost_usd if item.estimate else float("inf")
            return (cost, item.offer.price_per_hour, -reliability, item.offer.provider, item.offer.offer_id)
        return (item.offer.price_per_hour, -reliability, item.offer.provider, item.offer.offer_id)

    return sorted(ranked, key=key)


def find_offers(
    names: Iterable[str],
    requirements: Requirements,
    profile: JobProfile | None = None,
    opener: Callable[[str], Provider] = open_provider,
    history: JobHistory | None = None,
) -> OfferSearch:
    """The offers that meet the requirements, cheapest job first; estimated with `history` (default: the
    ledger's)."""
    if profile is not None and history is None:
        history = JobHistory.of()
    requirements = requirements.model_copy(
        update={"gpu_models": [normalise_gpu_name(g) for g in requirements.gpu_models]}
    )
    answers = query_providers(names, requirements, opener)
    suitable = [o for o in answers.offers if meets(o, requirements)]
    return OfferSearch(
        ranked=rank(suitable, profile, history),
        notes=answers.notes,
        considered=len(answers.offers),
        skipped=answers.skipped,
    )


def provider_names(choice: Iterable[str] | None) -> list[str]:
    """--provider values -> adapter names; empty or 'all' means every market."""
    chosen = [c.lower() for c in (choice or [])]
    if not chosen or "all" in chosen:
        return list(registry.MARKETS)
    return list(dict.fromkeys(chosen))


def fresh_offers(loaded: LoadedConfig, settings: RunSettings, provider: Provider) -> list[Offer]:
    """The offers a job can run on now, best first; none when the provider or the dataset cannot say."""
    try:
        report = inspect_dataset(loaded.train)
        profile = profile_from_check(loaded.train, report)
        # the GPU count the job was started with (--gpus), not whatever the config says now
        requirements = requirements_from(loaded.job, gpu_count=settings.gpus)
        search = find_offers([settings.provider], requirements, profile, opener=lambda _n: provider)
        return [r.offer for r in search.ranked]
    except (ProviderError, ValueError):
        return []
