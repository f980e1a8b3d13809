"""`rentrain costs`: what the jobs of this machine's ledger cost, per day, per provider and per job, each job's
estimate beside what it cost, and the error. Reads the ledger only.

A job's cost is what its provider billed for its instances: the ledger's rate x the provider's own billed seconds
(rentrain.accounts); its bandwidth (measured bytes x the offer's $/GB, rentrain.job_phases.meter) is shown beside
it. A day's spend is that of the jobs created on it (local time).
"""

from __future__ import annotations

import datetime
import time
from collections import defaultdict
from typing import Any

import click
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from rich.text import Text

from rentrain.commands.offers import money
from rentrain.ledger import JobRecord, JobRun, Ledger
from rentrain.paths import state_dir
from rentrain.report_facts import estimate_check, estimate_of
from rentrain.report_html import percent, step_time


class EstimateFigures(BaseModel):
    cost_usd: float
    range_usd: tuple[float, float]  # training at the step time's fast and slow ends
    seconds_per_step: float
    parts: dict[str, Any]  # the JobEstimate as recorded when the job was planned


class ActualFigures(BaseModel):
    cost_usd: float  # billed: the provider's rate x its own billed seconds
    bandwidth_usd: float | None  # None: the job recorded no measurements (it never trained, or is still running)
    seconds_per_step: float | None  # the median after warm-up
    steps_measured: int | None
    phases: dict[str, float]  # seconds of each phase the client saw


class JobCosts(BaseModel):
    id: str
    name: str  # the job's config file
    provider: str
    gpu: str | None
    state: str
    outcome: str | None
    created_at: float
    estimate: EstimateFigures | None
    actual: ActualFigures
    error_pct: float | None  # of the actual (billed + bandwidth) against the estimate, for a job that succeeded


class CostsReport(BaseModel):
    total_usd: float  # billed, over the jobs listed: every job of the ledger without --since
    bandwidth_usd: float
    per_day: dict[str, float]
    per_provider: dict[str, float]
    jobs: list[JobCosts]


def job_costs(ledger: Ledger, job: JobRecord, run: JobRun | None, now: float) -> JobCosts:
    instances = ledger.instances(job.id)
    estimate = estimate_of(job)
    billed = ledger.job_cost(job.id, now)
    check = estimate_check(job, run, billed)
    figures = None
    if estimate is not None:
        figures = EstimateFigures(
            cost_usd=estimate.cost_usd,
            range_usd=(estimate.cost_low_usd, estimate.cost_high_usd),
            seconds_per_step=estimate.seconds_per_step,
            parts=estimate.model_dump(),
        )
    return JobCosts(
        id=job.id,
        name=job.config_path,
        provider=job.provider,
        gpu=run.gpu_model if run is not None else (instances[-1].gpu if instances else None),
        state=job.state,
        outcome=job.outcome,
        created_at=job.created_at,
        estimate=figures,
        actual=ActualFigures(
            cost_usd=billed,
            bandwidth_usd=check.bandwidth_usd,
            seconds_per_step=check.measured_seconds_per_step,
            steps_measured=run.steps_measured if run is not None else None,
            phases=run.phases if run is not None else {},
        ),
        error_pct=check.error_pct,
    )


def costs_report(ledger: Ledger, since: float | None = None, now: float | None = None) -> CostsReport:
    now = time.time() if now is None else now
    runs = {run.job_id: run for run in ledger.job_runs()}
    listed = [job for job in ledger.jobs() if since is None or job.created_at >= since]
    jobs = [job_costs(ledger, job, runs.get(job.id), now) for job in listed]
    per_day: dict[str, float] = defaultdict(float)
    per_provider: dict[str, float] = defaultdict(float)
    for job in jobs:
        per_day[_day(job.created_at)] += job.actual.cost_usd
        per_provider[job.provider] += job.actual.cost_usd
    return CostsReport(
        total_usd=sum(job.actual.cost_usd for job in jobs),
        bandwidth_usd=sum(job.actual.bandwidth_usd or 0.0 for job in jobs),
        per_day=dict(per_day),
        per_provider=dict(per_provider),
        jobs=jobs,
    )


def _day(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(at))


def print_costs(console: Console, report: CostsReport) -> None:
    """Rich tables; every text from the ledger that came from outside (config paths, GPU names) as plain text."""
    days = Table("day", "billed", title="Spend per day", caption="by the day each job started", header_style="bold")
    for day, usd in sorted(report.per_day.items()):
        days.add_row(day, money(usd))
    providers = Table("provider", "billed", title="Spend per provider", header_style="bold")
    for provider, usd in sorted(report.per_provider.items()):
        providers.add_row(Text(provider), money(usd))
    jobs = Table(title="Jobs: estimate against actual", header_style="bold")
    for column in ("job", "config", "provider", "GPU", "outcome", "estimate", "actual", "error"):
        jobs.add_column(column)
    jobs.add_column("s/step est.")
    jobs.add_column("s/step")
    for job in report.jobs:
        bandwidth = f" + {money(job.actual.bandwidth_usd, 4)} bandwidth" if job.actual.bandwidth_usd else ""
        jobs.add_row(
            job.id,
            Text(job.name),
            Text(job.provider),
            Text(job.gpu or "-"),
            Text(job.outcome or job.state),
            money(job.estimate.cost_usd) if job.estimate else "-",
            money(job.actual.cost_usd, 4) + bandwidth,
            percent(job.error_pct),
            step_time(job.estimate.seconds_per_step if job.estimate else None),
            step_time(job.actual.seconds_per_step),
        )
    for table in (days, providers, jobs):
        console.print(table)
    console.print(
        f"total billed {money(report.total_usd, 4)} over {len(report.jobs)} jobs"
        + (f", bandwidth {money(report.bandwidth_usd, 4)}" if report.bandwidth_usd else ""),
        highlight=False,
    )


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object: total_usd, per_day, per_provider, jobs.")
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="Only jobs started on or after this day (YYYY-MM-DD, local time).",
)
def costs(as_json: bool, since: datetime.datetime | None) -> None:
    """What the jobs cost: per day, per provider, per job, each against its estimate with the error in %.

    A job's cost is what the provider billed for its instances (its rate x its own billed seconds); the bandwidth
    (bytes moved x the offer's $/GB, where the provider bills it) is shown beside it and counts in the error."""
    path = state_dir() / "ledger.sqlite3"
    since_at = since.timestamp() if since is not None else None
    if path.exists():
        report = costs_report(Ledger(path), since_at)
    else:  # no job has been run on this machine: nothing to open (or to create)
        report = CostsReport(total_usd=0.0, bandwidth_usd=0.0, per_day={}, per_provider={}, jobs=[])
    if as_json:
        click.echo(report.model_dump_json(indent=2))
        return
    console = Console()
    if not report.jobs:
        console.print("no jobs" + (" since then" if since is not None else " yet"))
        return
    print_costs(console, report)
