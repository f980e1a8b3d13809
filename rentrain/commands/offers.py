"""`rentrain offers`: which provider and card trains this LoRA for the least money."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from providers import registry
from providers.base import Offer, Requirements
from rentrain.cli_types import Number, setting_type
from rentrain.commands.check import checked_config
from rentrain.costs import JobEstimate
from rentrain.job_profile import JobProfile, profile_from_check, steps_on
from rentrain.multigpu import MAX_GPUS, MIN_GPUS, GpuCountError, check_gpu_count
from rentrain.offers import (
    OfferSearch,
    ProviderNote,
    RankedOffer,
    SkippedRows,
    find_offers,
    provider_names,
    requirements_from,
)
from rentrain.speed_model import Interconnect, interconnect_efficiency

PROVIDER_CHOICES = ["all", *registry.MARKETS]
MAX_ROWS = 10_000


def _check_gpus(_ctx: click.Context, _param: click.Parameter, value: int | None) -> int | None:
    if value is None:
        return None
    try:
        return check_gpu_count(value)
    except GpuCountError as exc:
        raise click.BadParameter(str(exc)) from None


def gpus_option(command: Any) -> Any:
    """--gpus N, shared by offers, estimate and run."""
    return click.option(
        "--gpus",
        "gpu_count",
        type=int,
        default=None,
        metavar="N",
        callback=_check_gpus,
        help=f"GPUs per instance, {MIN_GPUS} to {MAX_GPUS}: offers with N GPUs, trained data parallel "
        "(N x batch_size per step). Overrides [rentrain] gpu_count.",
    )(command)


def scaling_note(gpus: int, items: list[RankedOffer] | None = None) -> str | None:
    """Say that the several-GPU speed-up is assumed, with the efficiencies the estimates used (both
    interconnects' without estimates)."""
    if gpus == 1:
        return None
    scalings = [i.estimate.scaling for i in items or [] if i.estimate is not None and i.estimate.scaling is not None]
    if not scalings:
        scalings = [interconnect_efficiency(link, gpus) for link in get_args(Interconnect)]
    used = sorted({(s.interconnect, s.efficiency) for s in scalings})
    efficiencies = ", ".join(f"{link} {efficiency:.2f}" for link, efficiency in used)
    return (
        f"{gpus} GPUs, data parallel: steps per epoch / {gpus}, each step / the scaling efficiency ({efficiencies}), "
        f"so time ~ one GPU's / ({gpus} x efficiency). The efficiency is ASSUMED from published DDP scaling, not "
        "measured by rentrain (rentrain.speed_model.DATA_PARALLEL_EFFICIENCY); consumer cards without GPU peer-to-peer "
        "may scale worse."
    )


def load_job(config: Path | None) -> tuple[Any | None, JobProfile | None]:
    """The config's [rentrain] settings and the job profile (steps counted from the dataset), or (None, None).
    A config or dataset error is printed (to stderr) and exits 2, as in `rentrain check`."""
    if config is None:
        return None, None
    result, loaded = checked_config(config, Console(stderr=True))
    assert result.dataset is not None
    return loaded.job, profile_from_check(loaded.train, result.dataset)


def describe_requirements(req: Requirements) -> str:
    parts = [
        f"{req.gpu_count} GPU" + ("s" if req.gpu_count > 1 else ""),
        f">= {req.min_vram_gb:g} GB VRAM",
        f"reliability >= {req.min_reliability:g} where known",
    ]
    if req.min_cuda is not None:
        parts.append(f"CUDA >= {req.min_cuda:g}")
    if req.verified_only:
        parts.append("verified hosts")
    if req.max_price_per_hour is not None:
        parts.append(f"<= ${req.max_price_per_hour:g}/h")
    if req.gpu_models:
        parts.append("GPU in " + ", ".join(req.gpu_models))
    parts.append("interruptible included" if req.include_interruptible else "on-demand only")
    parts.append(f"{req.disk_gb} GB disk priced in")
    return "; ".join(parts)


def describe_profile(profile: JobProfile, gpus: int = 1) -> str:
    w, h = profile.resolution
    steps = f"{profile.steps} steps"
    if gpus > 1:
        steps = f"{steps_on(profile, gpus)} steps on {gpus} GPUs ({profile.steps} on one)"
        batch = f"batch {profile.batch_size} per GPU = {gpus * profile.batch_size} per step"
    else:
        batch = f"batch {profile.batch_size}"
    return f"{steps}, {profile.family} at {w}x{h}, {batch}, {profile.images} images"


def gpu_label(offer: Offer) -> str:
    return f"{offer.gpu_count}x {offer.gpu_model}" if offer.gpu_count > 1 else offer.gpu_model


def provider_label(offer: Offer) -> str:
    return f"{offer.provider} {offer.cloud.lower()}" if offer.cloud else offer.provider


def money(value: float | None, digits: int = 3) -> str:
    return "?" if value is None else f"${value:.{digits}f}"


def span(low: float, high: float, digits: int = 2, unit: str = "") -> str:
    """A range as "$0.31-0.42", or one figure where both ends round alike."""
    low_text, high_text = f"{low:.{digits}f}", f"{high:.{digits}f}"
    return f"{unit}{low_text}" if low_text == high_text else f"{unit}{low_text}-{high_text}"


def cost_range(estimate: JobEstimate | None) -> str:
    """The job's cost range and the kind of its speed figure, e.g. "$0.31-0.42 (modelled)"."""
    if estimate is None:
        return "?"
    return f"{span(estimate.cost_low_usd, estimate.cost_high_usd, unit='$')} ({estimate.speed_kind})"


def hours_range(estimate: JobEstimate | None) -> str:
    return "?" if estimate is None else span(estimate.total_hours_low, estimate.total_hours_high)


def offers_table(search: OfferSearch, with_estimates: bool, title: str | None = None) -> Table:
    table = Table(title=title, show_lines=False)
    table.add_column("provider", no_wrap=True)
    table.add_column("GPU")
    table.add_column("$/h", justify="right")
    table.add_column("reliability", justify="right")
    table.add_column("location", overflow="fold")
    table.add_column("download", justify="right")
    table.add_column("est. hours", justify="right")
    table.add_column("est. cost", justify="right")
    for item in search.ranked:
        offer = item.offer
        gpu = gpu_label(offer)
        if offer.interruptible:
            gpu += " (interruptible)"
        cells = (
            provider_label(offer),
            f"{gpu} {offer.vram_gb:g} GB",
            money(offer.price_per_hour),
            "unknown" if offer.reliability is None else f"{offer.reliability:.3f}",
            offer.location or "unknown",
            "unknown" if offer.download_mbps is None else f"{offer.download_mbps:.0f} Mbps",
            hours_range(item.estimate) if with_estimates else "-",
            cost_range(item.estimate) if with_estimates else "-",
        )
        table.add_row(*(Text(cell) for cell in cells))  # provider text is never markup
    for note in search.notes:
        table.add_row(*note_cells(note, 8))
    return table


def note_cells(note: ProviderNote, width: int) -> list[Any]:
    """A provider without offers, as a short table row; the full reason is printed under the table."""
    label = f"failed: {note.summary}*" if note.kind == "error" else f"no offers: {note.summary}*"
    style = "yellow" if note.kind == "error" else "dim"
    return [Text(note.provider, style=style), Text(label, style=style), *([""] * (width - 2))]


def print_notes(console: Console, notes: list[ProviderNote]) -> None:
    for note in notes:
        prefix = "failed" if note.kind == "error" else "no offers"
        console.print(Text.assemble((f"* {note.provider} ({prefix}): ", "bold"), note.message))


def print_skipped(console: Console, skipped: list[SkippedRows], verbose: bool) -> None:
    """One line per provider that dropped unreadable rows of its answer; with `verbose`, each row and why."""
    for rows in skipped:
        count = len(rows.reasons)
        head = f"{rows.provider}: {count} unreadable row{'s' if count != 1 else ''} of its answer skipped"
        if not verbose:
            console.print(f"{head} (--verbose shows which and why)", markup=False, highlight=False)
            continue
        console.print(f"{head}:", markup=False, highlight=False)
        for reason in rows.reasons:
            console.print(f"  {rows.provider}: skipped {reason}", markup=False, highlight=False)


def search_json(search: OfferSearch, req: Requirements, profile: JobProfile | None) -> dict[str, Any]:
    return {
        "requirements": req.model_dump(),
        "job": profile.model_dump() if profile else None,
        "considered": search.considered,
        "offers": [
            {**item.offer.model_dump(), "estimate": item.estimate.model_dump() if item.estimate else None}
            for item in search.ranked
        ],
        "notes": [note.model_dump() for note in search.notes],
        "skipped_rows": {rows.provider: rows.reasons for rows in search.skipped},
    }


@click.command()
@click.option(
    "--config",
    "config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Training config: rank by estimated total job cost and take GPU needs from its [rentrain] table.",
)
@click.option(
    "--provider",
    "providers",
    multiple=True,
    type=click.Choice(PROVIDER_CHOICES, case_sensitive=False),
    help="Provider to ask (repeatable). Default: all.",
)
@click.option("--gpu", "gpus", multiple=True, help='GPU model to consider, e.g. "RTX 4090" or 4090 (repeatable).')
@click.option(
    "--min-vram", type=setting_type("min_vram_gb"), default=None, help="Minimum GB of memory per GPU (default 24)."
)
@click.option(
    "--max-price", type=setting_type("max_price_per_hour"), default=None, help="Skip offers above this USD per hour."
)
@click.option("--limit", type=Number(1, MAX_ROWS, whole=True), default=20, show_default=True, help="Rows to show.")
@click.option("--include-interruptible", is_flag=True, default=None, help="Also show interruptible (bid/spot) offers.")
@gpus_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--verbose", "-v", is_flag=True, help="Show each row of a provider's answer that was skipped, and why.")
def offers(
    config: Path | None,
    providers: tuple[str, ...],
    gpus: tuple[str, ...],
    gpu_count: int | None,
    min_vram: float | None,
    max_price: float | None,
    limit: int,
    include_interruptible: bool | None,
    as_json: bool,
    verbose: bool,
) -> None:
    """Compare GPU offers across providers, cheapest first.

    With --config, offers are ranked by the estimated cost of the whole job (steps counted from the
    dataset x seconds per step on that GPU + setup overhead, x $/h); without it, by $/h. Each estimate is a
    range with the kind of its speed figure: measured (rentrain ran these settings on that GPU) or modelled
    (docs/costs.md).
    """
    job, profile = load_job(config)
    req = requirements_from(
        job,
        gpu_models=list(gpus) or None,
        min_vram_gb=min_vram,
        max_price_per_hour=max_price,
        include_interruptible=include_interruptible or None,
        gpu_count=gpu_count,
    )
    search = find_offers(provider_names(providers), req, profile)
    search = search.model_copy(update={"ranked": search.ranked[:limit]})
    if as_json:
        click.echo(json.dumps(search_json(search, req, profile), indent=2, default=str))
        return
    console = Console()
    console.print(f"Requirements: {describe_requirements(req)}", markup=False, highlight=False)
    if profile:
        console.print(f"Job: {describe_profile(profile, req.gpu_count)}", markup=False, highlight=False)
    title = f"{len(search.ranked)} offers" + (" by estimated job cost" if profile else " by $/h")
    console.print(offers_table(search, with_estimates=profile is not None, title=title))
    note = scaling_note(req.gpu_count, search.ranked) if profile else None
    if note:
        console.print(note, highlight=False)
    print_notes(console, search.notes)
    print_skipped(console, search.skipped, verbose)
    if not search.ranked and any(n.kind == "error" for n in search.notes):
        raise SystemExit(1)
