"""`rentrain estimate`: what this job costs on the best offer of each provider and of each GPU model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from rentrain.cli_types import setting_type
from rentrain.commands.offers import (
    PROVIDER_CHOICES,
    cost_range,
    describe_profile,
    describe_requirements,
    gpu_label,
    gpus_option,
    hours_range,
    load_job,
    money,
    note_cells,
    print_notes,
    provider_label,
    scaling_note,
    span,
)
from rentrain.costs import JobEstimate, seconds_per_image
from rentrain.gpu_specs import GPU_SPECS, specs_of
from rentrain.job_profile import JobProfile, steps_on
from rentrain.offers import RankedOffer, find_offers, provider_names, requirements_from
from rentrain.setup_time import OUTBOUND, PHASES, setup_seconds
from rentrain.speed_model import scaling_efficiency, seconds_per_step


def best_per(ranked: list[RankedOffer], key: str) -> list[RankedOffer]:
    """The first (cheapest) offer for each provider, or each GPU model, keeping the ranking order."""
    seen: dict[str, RankedOffer] = {}
    for item in ranked:
        group = item.offer.provider if key == "provider" else item.offer.gpu_model
        seen.setdefault(group, item)
    return list(seen.values())


def offline_rows(profile: JobProfile, gpus: int = 1) -> list[dict[str, Any]]:
    """Training time per known GPU model and memory size (with `gpus` of it) when no provider answered: step
    time and hours with their ranges (setup at the default link speeds), no price."""
    steps = steps_on(profile, gpus)
    rows = []
    for spec in GPU_SPECS:
        speed = seconds_per_step(spec.model, profile, spec.vram_gb)
        if speed is None:
            continue
        setup = setup_seconds(profile, None, seconds_per_image(profile, speed.seconds_per_step))
        overhead_h = sum(setup.values()) / 3600
        efficiency = scaling_efficiency(spec.model, gpus).efficiency
        name = spec.model if len(specs_of(spec.model)) == 1 else f"{spec.model} {spec.vram_gb:g} GB"
        rows.append(
            {
                "gpu": name if gpus == 1 else f"{gpus}x {name}",
                "seconds_per_step": speed.seconds_per_step / efficiency,
                "seconds_per_step_low": speed.low / efficiency,
                "seconds_per_step_high": speed.high / efficiency,
                "speed_kind": speed.kind,
                "hours": steps * speed.seconds_per_step / efficiency / 3600 + overhead_h,
                "hours_low": steps * speed.low / efficiency / 3600 + overhead_h,
                "hours_high": steps * speed.high / efficiency / 3600 + overhead_h,
            }
        )
    return sorted(rows, key=lambda r: r["hours"])


@click.command()
@click.option(
    "--config",
    "config",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Training config.",
)
@click.option(
    "--provider",
    "providers",
    multiple=True,
    type=click.Choice(PROVIDER_CHOICES, case_sensitive=False),
    help="Provider to ask (repeatable). Default: all.",
)
@click.option("--gpu", "gpus", multiple=True, help="GPU model to consider (repeatable).")
@click.option(
    "--max-price", type=setting_type("max_price_per_hour"), default=None, help="Skip offers above this USD per hour."
)
@click.option("--include-interruptible", is_flag=True, default=None, help="Also consider interruptible offers.")
@gpus_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def estimate(
    config: Path,
    providers: tuple[str, ...],
    gpus: tuple[str, ...],
    gpu_count: int | None,
    max_price: float | None,
    include_interruptible: bool | None,
    as_json: bool,
) -> None:
    """Estimate steps, hours and cost of the job on the best offer of each provider and each GPU model.

    Step times, hours and costs are ranges, with the kind of the speed figure: measured (rentrain ran these
    settings on that GPU) or modelled from the step's counted work and the GPU's datasheet (docs/costs.md).

    With several GPUs (--gpus N), the speed-up is an assumed data-parallel scaling, and the output says so.
    """
    job, profile = load_job(config)
    assert profile is not None
    req = requirements_from(
        job,
        gpu_models=list(gpus) or None,
        max_price_per_hour=max_price,
        include_interruptible=include_interruptible or None,
        gpu_count=gpu_count,
    )
    search = find_offers(provider_names(providers), req, profile)
    by_provider = best_per(search.ranked, "provider")
    by_gpu = best_per(search.ranked, "gpu")
    overhead = setup_seconds(profile, None)
    if as_json:
        payload = {
            "job": profile.model_dump(),
            "requirements": req.model_dump(),
            "overhead_seconds_default": overhead,
            "best_per_provider": [_row(i) for i in by_provider],
            "best_per_gpu": [_row(i) for i in by_gpu],
            "notes": [n.model_dump() for n in search.notes],
            "without_prices": offline_rows(profile, req.gpu_count) if not search.ranked else [],
            "scaling_note": scaling_note(req.gpu_count, search.ranked),
        }
        click.echo(json.dumps(payload, indent=2, default=str))
        return

    console = Console()
    console.print(f"Job: {describe_profile(profile, req.gpu_count)}", markup=False, highlight=False)
    console.print(f"Requirements: {describe_requirements(req)}", markup=False, highlight=False)
    console.print(f"Setup (billed) at the default link speeds: {_phases(overhead)}", highlight=False)
    console.print(_table("Best offer per provider", by_provider, search.notes))
    for item in by_provider:
        if item.estimate is not None:
            console.print(Text("\n".join(cost_parts(item))))  # provider text is never markup
    console.print(_table("Best offer per GPU model", by_gpu, []))
    print_notes(console, search.notes)
    if not search.ranked:
        table = Table(title="No live prices: training time per GPU model")
        for column in ("GPU", "s/step", "basis", "est. hours"):
            table.add_column(column, justify="right" if column != "GPU" else "left")
        for row in offline_rows(profile, req.gpu_count):
            step = span(row["seconds_per_step_low"], row["seconds_per_step_high"], 3)
            hours = span(row["hours_low"], row["hours_high"])
            table.add_row(row["gpu"], f"{row['seconds_per_step']:.3f} ({step})", row["speed_kind"], hours)
        console.print(table)
    note = scaling_note(req.gpu_count, search.ranked)
    if note:
        console.print(note, highlight=False)


def _row(item: RankedOffer) -> dict[str, Any]:
    return {**item.offer.model_dump(), "estimate": item.estimate.model_dump() if item.estimate else None}


def _table(title: str, items: list[RankedOffer], notes: list[Any]) -> Table:
    table = Table(title=title)
    for column in ("provider", "GPU", "$/h", "steps", "s/step", "est. hours", "est. cost"):
        table.add_column(column, justify="left" if column in ("provider", "GPU") else "right", overflow="fold")
    for item in items:
        est = item.estimate
        cells = (
            provider_label(item.offer),
            gpu_label(item.offer),
            money(item.offer.price_per_hour),
            str(est.steps) if est else "?",
            _step(est) if est else "no speed figure",
            hours_range(est),
            cost_range(est),
        )
        table.add_row(*(Text(cell) for cell in cells))  # provider text is never markup
    for note in notes:
        table.add_row(*note_cells(note, 7))
    return table


def _step(estimate: JobEstimate) -> str:
    low = estimate.seconds_per_step_low or estimate.seconds_per_step
    high = estimate.seconds_per_step_high or estimate.seconds_per_step
    return f"{estimate.seconds_per_step:.3f} ({span(low, high, 3)})"


def _phases(seconds: Mapping[str, float]) -> str:
    return ", ".join(f"{phase.replace('_', ' ')} {_duration(value)}" for phase, value in seconds.items() if value)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def cost_parts(item: RankedOffer) -> list[str]:
    """What the estimate on one offer is made of: the time at the hourly price (training and each setup
    phase), the bandwidth and the storage beyond the hourly price, e.g. for `rentrain estimate`."""
    est = item.estimate
    assert est is not None
    offer = item.offer
    lines = [f"{offer.provider} {gpu_label(offer)}: {span(est.cost_low_usd, est.cost_high_usd, unit='$')} ="]
    if est.gpu_usd is None:  # recorded before the parts
        return lines
    bounds = (est.total_hours_low, est.total_hours_high)
    time_low, time_high = (est.gpu_usd * hours / est.total_hours for hours in bounds)
    train_low, train_high = (hours - est.overhead_hours for hours in bounds)
    lines.append(
        f"  time {span(time_low, time_high, 3, unit='$')}: training {span(train_low, train_high)} h"
        f" + setup {est.overhead_hours:.2f} h at {money(est.price_per_hour)}/h (GPUs and disk while running)"
    )
    known = [phase for phase in PHASES if phase in est.setup_seconds]
    ordered = {phase: est.setup_seconds[phase] for phase in known + sorted(set(est.setup_seconds) - set(known))}
    lines.append(f"    setup, {est.setup_source}: {_phases(ordered)}")
    gb_out = sum(gb for phase, gb in est.transfer_gb.items() if phase in OUTBOUND)
    gb_in = sum(est.transfer_gb.values()) - gb_out
    lines.append(
        f"  + bandwidth {money(est.bandwidth_usd)}: {gb_in:.1f} GB in at {_per_gb(offer.inet_down_usd_per_gb)}, "
        f"{gb_out:.2f} GB out at {_per_gb(offer.inet_up_usd_per_gb)}"
    )
    stopped = "" if est.storage_usd_per_hour is None else f"; {money(est.storage_usd_per_hour, 4)}/h if stopped"
    lines.append(f"  + storage {money(est.storage_usd)} beyond the hourly price (destroyed at the end{stopped})")
    return lines


def _per_gb(usd: float | None) -> str:
    return "an unpublished rate (counted as $0)" if usd is None else f"${usd:g}/GB"
