"""`rentrain run A.toml B.toml ...` (or a folder of configs, or a queue file): every config checked first, the
plan shown and agreed to once, then the queue run on shared rentals under one budget and one deadline."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from providers.base import Offer, Provider
from remote.config import LoadedConfig
from rentrain.commands.check import BAD_INPUT, CheckResult, print_check, run_check
from rentrain.commands.run_common import ask_destroy, destroy_now, refuse_to_overwrite
from rentrain.costs import JobEstimate, estimate_job
from rentrain.credentials import CredentialsError, open_provider
from rentrain.history import JobHistory
from rentrain.job import DetachRequested, RunSettings, new_job_id
from rentrain.job_news import JobNews
from rentrain.job_phases.context import clock_time
from rentrain.job_profile import JobProfile, profile_from_check
from rentrain.ledger import ClientLock, JobRecord, Ledger, LockHeld, QueueRecord, this_host
from rentrain.notify import Notifier
from rentrain.offers import find_offers, requirements_from
from rentrain.progress import plain_printer
from rentrain.queue_costs import cost_shares
from rentrain.queue_plan import (
    LanePlan,
    QueueInputError,
    expand_configs,
    finish_time,
    output_clashes,
    plan_lanes,
    rank_for_lane,
    rental_key,
    shares_on,
)
from rentrain.queue_run import Lane, QueuedJob, QueueHooks, QueueRunner


@dataclass
class QueueOptions:
    """What the command line says for the whole queue (None: not given)."""

    provider: str
    max_cost: float | None
    deadline: float | None
    parallel: int
    gpus: tuple[str, ...]
    gpu_count: int | None
    settings: Mapping[str, Any]  # RunSettings fields given on the command line or by the environment
    yes: bool
    overwrite: bool


def checked_configs(arguments: Sequence[Path], console: Console) -> list[tuple[CheckResult, LoadedConfig]]:
    """Every config and dataset checked; all problems printed at once, then exit 2 if there was any."""
    try:
        paths = expand_configs(arguments)
    except QueueInputError as exc:
        raise click.UsageError(str(exc)) from None
    checked = [run_check(path) for path in paths]
    failed = [(result, loaded) for result, loaded in checked if not result.ok or loaded is None]
    for result, loaded in failed:
        print_check(result, loaded, console)
    good = [(result, loaded) for result, loaded in checked if loaded is not None]
    clashes = output_clashes([loaded for _result, loaded in good])
    for clash in clashes:
        console.print(f"[bold red]error[/]: {escape(clash)}", highlight=False, soft_wrap=True)
    if failed or clashes:
        problems = len(failed) + len(clashes)
        console.print(f"[bold red]{problems} of the queue's {len(paths)} configs have problems; nothing was rented[/]")
        sys.exit(BAD_INPUT)
    return [(result, loaded) for result, loaded in good if loaded is not None]


def run_queue(arguments: Sequence[Path], options: QueueOptions, console: Console, notifier: Notifier) -> None:
    checked = checked_configs(arguments, console)
    if options.provider in ("local", "ssh"):
        raise click.UsageError(
            f"a queue runs on rented instances (vast, runpod); with --provider {options.provider} run its configs "
            "one at a time"
        )
    for _result, loaded in checked:
        refuse_to_overwrite(loaded, options.overwrite, console)
    try:
        provider = open_provider(options.provider)
    except CredentialsError as exc:
        raise click.ClickException(str(exc)) from None
    loaded_all = [loaded for _result, loaded in checked]
    profiles = [profile_from_check(loaded.train, result.dataset) for result, loaded in checked]  # type: ignore[arg-type]
    gpus = [options.gpu_count or loaded.job.gpu_count for loaded in loaded_all]
    lanes = _plan(loaded_all, profiles, gpus, options, provider, console)
    max_cost = _queue_budget(options.max_cost, loaded_all)
    _show_plan(lanes, loaded_all, profiles, max_cost, options, console)
    _refuse_what_cannot_fit(lanes, max_cost, options)
    if not options.yes and not click.confirm("Rent and start the queue?", default=True):
        raise click.Abort()
    ledger = Ledger()
    queue, jobs = _record_queue(ledger, lanes, loaded_all, gpus, profiles, max_cost, options)
    console.print(f"queue [bold]{queue.id}[/]: {len(jobs)} jobs on {len(lanes)} rental(s)")
    runner_lanes = [
        Lane(jobs=[jobs[i].id for i in lane.jobs], offers=_rotated([r.offer for r in lane.offers], n))
        for n, lane in enumerate(lanes)
    ]
    queued = {job.id: QueuedJob(loaded_all[i], _settings(job), lanes_estimate(lanes, i)) for i, job in enumerate(jobs)}
    news = JobNews(ledger, notifier, plain_printer(console))
    drive_queue(QueueRunner(ledger, queue, queued, runner_lanes, provider, console, queue_hooks(news, queue)), console)


def queue_hooks(news: JobNews, queue: QueueRecord) -> QueueHooks:
    """Each job's end and the queue's early stop are told (reports, notifications)."""
    return QueueHooks(job_ended=news.job_ended, stopped=lambda reason: news.queue_stopped(queue, reason))


def lanes_estimate(lanes: Sequence[LanePlan], index: int) -> JobEstimate | None:
    for lane in lanes:
        if index in lane.jobs:
            return lane.estimates[lane.jobs.index(index)]
    return None


def _rotated(offers: list[Offer], start: int) -> list[Offer]:
    """Lanes of one rental kind start at different offers, so two do not race for one machine."""
    if not offers:
        return offers
    start %= len(offers)
    return offers[start:] + offers[:start]


def _settings(job: JobRecord) -> RunSettings:
    return RunSettings.model_validate_json(job.settings_json)


def _queue_budget(cli_budget: float | None, configs: Sequence[LoadedConfig]) -> float | None:
    """--max-cost; without it, the configs' max_cost added up when every config has one."""
    if cli_budget is not None:
        return cli_budget
    budgets = [loaded.job.max_cost for loaded in configs]
    return sum(b for b in budgets if b is not None) if all(b is not None for b in budgets) else None


def _plan(
    configs: Sequence[LoadedConfig],
    profiles: Sequence[JobProfile],
    gpus: Sequence[int],
    options: QueueOptions,
    provider: Provider,
    console: Console,
) -> list[LanePlan]:
    keys = [rental_key(loaded, count) for loaded, count in zip(configs, gpus, strict=True)]
    history = JobHistory.of()
    searches = {}
    for key in dict.fromkeys(keys):
        members = [i for i, k in enumerate(keys) if k == key]
        first = configs[members[0]]
        disk = max(configs[i].job.disk_gb for i in members)
        requirements = requirements_from(
            first.job, gpu_models=list(options.gpus) or None, gpu_count=gpus[members[0]], disk_gb=disk
        )
        longest = max(members, key=lambda i: profiles[i].steps)
        search = find_offers(
            [options.provider], requirements, profiles[longest], opener=lambda _name: provider, history=history
        )
        for note in search.notes:
            console.print(f"[yellow]{options.provider}[/]: {escape(note.message)}")
        if not search.ranked:
            raise click.ClickException(
                f"no {options.provider} offer meets the requirements of {first.path} "
                f"({search.considered} offers seen); `rentrain offers --config {first.path}` shows what is out there"
            )
        searches[key] = search.ranked
    hours = []
    for i, profile in enumerate(profiles):
        alone = estimate_job(profile, searches[keys[i]][0].offer, history)
        hours.append(alone.total_hours if alone is not None else 0.0)
    lanes = []
    for jobs in plan_lanes(keys, hours, options.parallel):
        lane_profiles = [profiles[i] for i in jobs]
        ranked = rank_for_lane(lane_profiles, searches[keys[jobs[0]]], history)
        shares = shares_on(lane_profiles, ranked[0], history)
        lanes.append(LanePlan(jobs=jobs, offers=ranked, estimates=list(shares) if shares else [None] * len(jobs)))
    return lanes


def _show_plan(
    lanes: Sequence[LanePlan],
    configs: Sequence[LoadedConfig],
    profiles: Sequence[JobProfile],
    max_cost: float | None,
    options: QueueOptions,
    console: Console,
) -> None:
    for number, lane in enumerate(lanes, 1):
        offer = lane.offers[0].offer
        where = f", {offer.location}" if offer.location else ""
        console.print(
            f"rental {number}: {offer.gpu_count}x {offer.gpu_model} on {offer.provider}{where} at "
            f"${offer.price_per_hour:.3f}/h, {len(lane.jobs)} job(s) in turn",
            markup=False,
            highlight=False,
        )
        table = Table(header_style="bold", box=None, padding=(0, 2))
        for column in ("config", "steps", "time", "cost"):
            table.add_column(column, justify="left" if column == "config" else "right")
        for index, estimate in zip(lane.jobs, lane.estimates, strict=True):
            time_text = f"{estimate.total_hours:.2f} h" if estimate else "?"
            cost_text = f"${estimate.cost_usd:.2f}" if estimate else "?"
            table.add_row(escape(str(configs[index].path)), str(profiles[index].steps), time_text, cost_text)
        console.print(table)
    total = sum(lane.cost for lane in lanes)
    end = finish_time(lanes, options.parallel, time.time())
    history = JobHistory.of()
    alone = [estimate_job(profiles[i], lane.offers[0].offer, history) for lane in lanes for i in lane.jobs]
    separate = sum(e.cost_usd for e in alone if e is not None)
    unknown = sorted({lane.offers[0].offer.gpu_model for lane in lanes if None in lane.estimates})
    if unknown:
        line = f"total: unknown (no speed figure for {', '.join(unknown)}); the budget is enforced while jobs run"
    else:
        line = f"total: about ${total:.2f}, done by about {clock_time(end)}"
        if len(configs) > len(lanes):
            line += f" (as {len(configs)} separate runs: about ${separate:.2f})"
    if max_cost is not None:
        line += f"; budget ${max_cost:.2f}"
    if options.deadline is not None:
        line += f"; deadline {clock_time(options.deadline)}"
    console.print(line, markup=False, highlight=False)


def _refuse_what_cannot_fit(lanes: Sequence[LanePlan], max_cost: float | None, options: QueueOptions) -> None:
    total = sum(lane.cost for lane in lanes)
    if max_cost is not None and total > max_cost:
        raise click.ClickException(
            f"the queue's estimate ${total:.2f} is above the budget ${max_cost:.2f}; nothing was rented. "
            "Raise --max-cost, or leave jobs out"
        )
    if options.deadline is not None:
        end = finish_time(lanes, options.parallel, time.time())
        if end > options.deadline:
            more = "" if options.parallel >= len(lanes) else ", or rent more hosts at once (--parallel)"
            raise click.ClickException(
                f"the queue would end about {clock_time(end)}, after the deadline {clock_time(options.deadline)}; "
                f"nothing was rented. Move the deadline or leave jobs out{more}"
            )


def _record_queue(
    ledger: Ledger,
    lanes: Sequence[LanePlan],
    configs: Sequence[LoadedConfig],
    gpus: Sequence[int],
    profiles: Sequence[JobProfile],
    max_cost: float | None,
    options: QueueOptions,
) -> tuple[QueueRecord, list[JobRecord]]:
    queue_id = "q-" + new_job_id()
    outputs = [loaded.train.output_dir.resolve() for loaded in configs]
    common = Path(os.path.commonpath([str(p.parent) for p in outputs]))
    report_folder = (common if common != common.parent else outputs[0].parent) / queue_id  # never right under /
    jobs = []
    for index, loaded in enumerate(configs):
        job_id = new_job_id() + f"-{index + 1}"
        settings = RunSettings(
            provider=options.provider,
            max_cost=max_cost,
            max_hours=loaded.job.max_hours,
            idle_timeout_minutes=loaded.job.idle_timeout_minutes,
            max_offers=loaded.job.max_offers,
            max_retries=loaded.job.max_retries,
            image=loaded.job.image,
            disk_gb=max(configs[i].job.disk_gb for lane in lanes if index in lane.jobs for i in lane.jobs),
            gpus=gpus[index],
            deadline=options.deadline,
            **options.settings,
        )
        estimate = lanes_estimate(lanes, index)
        jobs.append(
            JobRecord(
                id=job_id,
                created_at=time.time(),
                config_path=str(loaded.path),
                provider=options.provider,
                label=f"rentrain-{job_id}",
                state="planned",
                output_dir=str(loaded.train.output_dir),
                total_steps=profiles[index].steps,
                client_pid=os.getpid(),  # born locked by this client (ClientLock)
                client_host=this_host(),
                client_beat_at=time.time(),
                settings_json=settings.model_dump_json(),
                estimate_json=estimate.model_dump_json() if estimate is not None else "{}",
            )
        )
    queue = QueueRecord(
        id=queue_id,
        created_at=time.time(),
        provider=options.provider,
        max_cost=max_cost,
        deadline=options.deadline,
        parallel=options.parallel,
        report_path=str(report_folder / "report.html"),
        lanes_json=_lanes_json(lanes, jobs),
    )
    ledger.create_queue(queue, jobs)
    return queue, ledger.queue_jobs(queue.id)


def _lanes_json(lanes: Sequence[LanePlan], jobs: Sequence[JobRecord]) -> str:
    return json.dumps([[jobs[i].id for i in lane.jobs] for lane in lanes])


def drive_queue(runner: QueueRunner, console: Console, attach: bool = False) -> None:
    """Run the queue under its jobs' client locks. SIGTERM/SIGHUP detach (each instance's watchdog guards it;
    `rentrain attach QUEUE` goes on later); Ctrl-C asks whether to end everything or detach."""
    ledger, queue = runner.ledger, runner.queue
    unfinished = [j.id for j in ledger.queue_jobs(queue.id) if j.state != "closed"]

    def detach_on_signal(signum: int, _frame: FrameType | None) -> None:
        runner.request_detach(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, detach_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with ClientLock(ledger, unfinished) as lock:
            lock.on_lost = lambda winner: runner.request_detach(f"{winner.client} took the queue over")
            try:
                runner.run(attach=attach)
            except KeyboardInterrupt:
                _interrupted(runner, console)
    except LockHeld as exc:
        raise click.ClickException(str(exc)) from None
    except DetachRequested as exc:
        console.print(
            f"detached ({exc}): queue {queue.id} goes on under its instances' watchdogs; jobs not started wait. "
            f"Go on with: rentrain attach {queue.id}",
            markup=False,
            highlight=False,
        )
        return
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        report = JobNews(ledger, None, plain_printer(console)).queue_ended(queue)
        if report is not None:
            console.print(f"queue report: {report}", markup=False, highlight=False)
    _print_summary(ledger, queue, console)


def _interrupted(runner: QueueRunner, console: Console) -> None:
    if all(not r.guarded for r in runner.active.values()) or ask_destroy(console):
        runner.cancelled.set()
        for active in list(runner.active.values()):
            destroy_now(active, console)
        for job in runner.ledger.queue_jobs(runner.queue.id):
            if job.state == "planned":
                runner.ledger.transition(job.id, "closed", "the queue was stopped", outcome="cancelled")
        console.print(f"queue {runner.queue.id} stopped; results fetched so far are in the output folders")
        sys.exit(130)
    raise DetachRequested("Ctrl-C")


def _print_summary(ledger: Ledger, queue: QueueRecord, console: Console) -> None:
    jobs = ledger.queue_jobs(queue.id)
    table = Table(header_style="bold")
    for column in ("job", "config", "outcome", "billed", "share", "result / reason"):
        table.add_column(column)
    shares = cost_shares(ledger, queue.id)
    for job in jobs:
        table.add_row(
            job.id,
            escape(job.config_path),
            job.outcome or job.state,
            f"${ledger.job_cost(job.id):.4f}",
            f"${shares[job.id]:.4f}",
            escape(job.result_path or job.error or ""),
        )
    console.print(table)
    console.print(f"queue {queue.id}: ${ledger.queue_cost(queue.id):.4f} in all", highlight=False)
    if any(job.outcome != "succeeded" for job in jobs):
        sys.exit(1)
