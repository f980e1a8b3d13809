"""Queues in the job commands: `status` lists them, `attach QUEUE` goes on with one, `down QUEUE` ends one."""

from __future__ import annotations

import time
from collections import Counter

import click
from rich.console import Console

from remote.config import ConfigError
from rentrain.cli_types import timing_overrides
from rentrain.commands.run import notifier_from
from rentrain.commands.run_queue import drive_queue, queue_hooks
from rentrain.costs import JobEstimate
from rentrain.credentials import CredentialsError, open_provider
from rentrain.job import RunSettings
from rentrain.job_config import job_config
from rentrain.job_news import JobNews
from rentrain.job_phases.context import clock_time
from rentrain.ledger import IllegalTransition, JobRecord, Ledger, QueueRecord
from rentrain.offers import fresh_offers
from rentrain.progress import plain_printer
from rentrain.queue_run import Lane, QueuedJob, QueueRunner

SHOWN_CLOSED_QUEUES = 3


def print_queues(console: Console, ledger: Ledger) -> None:
    """One line per queue with a job not closed, and the last few finished ones."""
    queues = ledger.queues()
    running = [q for q in queues if any(j.state != "closed" for j in ledger.queue_jobs(q.id))]
    finished = [q for q in queues if q not in running][-SHOWN_CLOSED_QUEUES:]
    for queue in finished + running:
        console.print(queue_line(ledger, queue), markup=False, highlight=False)


def queue_line(ledger: Ledger, queue: QueueRecord) -> str:
    jobs = ledger.queue_jobs(queue.id)
    counts = Counter(job.outcome or job.state for job in jobs)
    parts = ", ".join(f"{n} {what}" for what, n in counts.items())
    line = f"queue {queue.id}: {len(jobs)} jobs ({parts}); ${ledger.queue_cost(queue.id):.4f}"
    if queue.max_cost is not None:
        line += f" of ${queue.max_cost:.2f}"
    if queue.deadline is not None:
        line += f"; deadline {clock_time(queue.deadline)}"
    return line + f"; report {queue.report_path}"


def attach_queue(ledger: Ledger, queue: QueueRecord, console: Console) -> None:
    """Go on with a queue whose client went away: the jobs under way are followed (or resumed on a new rental
    when their instance is gone), then each lane works through the jobs not started."""
    jobs = ledger.queue_jobs(queue.id)
    if all(job.state == "closed" for job in jobs):
        raise click.ClickException(f"queue {queue.id} is over: nothing was rented. Its report: {queue.report_path}")
    try:
        provider = open_provider(queue.provider)
    except CredentialsError as exc:
        raise click.ClickException(str(exc)) from None
    queued = {job.id: _queued(job) for job in jobs if job.state != "closed"}
    lanes = []
    for job_ids in queue.lanes:
        waiting = [job_id for job_id in job_ids if job_id in queued]
        offers = fresh_offers(queued[waiting[0]].loaded, queued[waiting[0]].settings, provider) if waiting else []
        lanes.append(Lane(jobs=job_ids, offers=offers))
    console.print(f"attached to queue {queue.id}: {len(queued)} of its {len(jobs)} jobs to go", highlight=False)
    news = JobNews(ledger, notifier_from((), console), plain_printer(console))
    runner = QueueRunner(ledger, queue, queued, lanes, provider, console, queue_hooks(news, queue))
    drive_queue(runner, console, attach=True)


def _queued(job: JobRecord) -> QueuedJob:
    try:
        loaded = job_config(job)
    except ConfigError as exc:
        raise click.ClickException(f"job {job.id}'s config can no longer be read: {exc}") from None
    settings = RunSettings.model_validate_json(job.settings_json).model_copy(update=timing_overrides())
    estimate = JobEstimate.model_validate_json(job.estimate_json) if job.estimate_json != "{}" else None
    return QueuedJob(loaded, settings, estimate)


def cancel_waiting_jobs(ledger: Ledger, queue: QueueRecord, console: Console) -> None:
    """`down QUEUE`: the jobs that had not started are closed too; nothing of the queue runs any more."""
    cancelled = 0
    for job in ledger.queue_jobs(queue.id):
        if job.state != "planned":
            continue
        try:
            ledger.transition(job.id, "closed", "rentrain down (the queue ended)", outcome="cancelled")
            cancelled += 1
        except IllegalTransition:
            continue  # its client started it meanwhile; `down` destroyed what it had
    if cancelled:
        console.print(f"queue {queue.id}: {cancelled} job(s) not started were cancelled", highlight=False)
    console.print(f"queue {queue.id} ended at {clock_time(time.time())}", highlight=False)
