"""The morning report: one self-contained report.html per job (in its output folder) and per queue, readable
offline in any browser, with no server and no script. Rebuilt from what is on disk (`rentrain report ID`).

A job's report: its outcome, the sample grid at each checkpoint, the loss and learning-rate curves, the
dataset, the final file with its sha256 and size, and the time and money of each phase beside the estimate.
A queue's report: one row per job, each job's last grid, and the totals against the budget and the deadline.
Images are embedded (data: URIs), so a report stays whole when moved; each also links to its full-size file.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from rentrain.commands.offers import money
from rentrain.costs import JobEstimate
from rentrain.job_phases.context import clock_time
from rentrain.ledger import JobRecord, Ledger, QueueRecord
from rentrain.queue_costs import cost_shares
from rentrain.report_facts import (
    DatasetNow,
    EstimateCheck,
    FinalFile,
    PhaseCost,
    RunEvents,
    dataset_now,
    estimate_of,
    final_file,
    job_check,
    local_sample,
    phase_costs,
    read_run_events,
)
from rentrain.report_html import (
    check_rows,
    duration,
    embedded_image,
    esc,
    hours,
    note,
    page,
    size,
    table,
    write_page,
)
from rentrain.report_svg import line_chart

REPORT_FILE = "report.html"


def job_report_path(job: JobRecord) -> Path:
    return Path(job.output_dir) / REPORT_FILE


def write_job_report(ledger: Ledger, job_id: str) -> Path:
    """Write <output_dir>/report.html for the job, from the ledger and the job's output folder."""
    job = ledger.job(job_id)
    path = job_report_path(job)
    run = read_run_events(Path(job.output_dir))
    phases = phase_costs(ledger.transitions(job.id), ledger.instances(job.id))
    body = "".join(
        [
            _job_title(job, run),
            _samples_section(job, run, path.parent),
            _curves_section(run),
            _dataset_section(run, dataset_now(job.config_path)),
            _final_section(final_file(job, run.done)),
            _money_section(phases, ledger.job_cost(job.id), estimate_of(job), job_check(ledger, job)),
        ]
    )
    return write_page(path, page(f"rentrain job {job.id}", body))


def outcome_of(job: JobRecord) -> str:
    if job.outcome is not None:
        return job.outcome
    return "closed" if job.state == "closed" else f"running ({job.state})"


def _job_title(job: JobRecord, run: RunEvents) -> str:
    errors = [job.error] if job.error else []
    errors += [f"{e.kind}: {e.message}" for e in run.errors if e.message not in (job.error or "")]
    lines = "".join(f'<p class="error">{esc(text)}</p>\n' for text in errors)
    return (
        f"<h1>Job {esc(job.id)}: {esc(outcome_of(job))}</h1>\n"
        f'<p class="meta">config <code>{esc(job.config_path)}</code> · provider {esc(job.provider)} · '
        f"created {esc(clock_time(job.created_at))} · output <code>{esc(job.output_dir)}</code></p>\n{lines}"
    )


def _sample_caption(epoch: int, step: int, final: bool) -> str:
    return f"epoch {epoch}, step {step}" + (" (final)" if final else "")


def _samples_section(job: JobRecord, run: RunEvents, report_dir: Path) -> str:
    heading = "<h2>Samples</h2>\n"
    if not run.samples:
        return heading + note("No sample grid was written (no sample prompts configured, or no checkpoint yet).")
    explained = note("Rows: each prompt at each seed; columns: the LoRA applied at the weights labelled on top.")
    figures = "".join(
        embedded_image(local_sample(job, s), _sample_caption(s.epoch, s.step, s.final), report_dir) for s in run.samples
    )
    return heading + explained + figures


def _curves_section(run: RunEvents) -> str:
    heading = "<h2>Training curves</h2>\n"
    if not run.steps:
        return heading + note(run.problem or "No training step was recorded.")
    finite = [(s.step, s.loss) for s in run.steps if math.isfinite(s.loss)]
    loss = line_chart(finite, "loss (light: each step; dark: moving average)", trend=True)
    lr = line_chart([(s.step, s.lr) for s in run.steps], "learning rate")
    last = run.steps[-1]
    summary = f"{last.step} of {last.total_steps} steps; last loss {last.loss:.4g}, learning rate {last.lr:.3g}."
    not_numbers = [s.step for s in run.steps if not math.isfinite(s.loss)]
    if not_numbers:
        summary += (
            f" {len(not_numbers)} steps had a loss that is not a finite number (first at step {not_numbers[0]}); "
            "the loss chart leaves them out."
        )
    return heading + f'<div class="charts">{loss}{lr}</div>\n' + note(summary)


def _dataset_section(run: RunEvents, dataset: DatasetNow) -> str:
    heading = "<h2>Dataset</h2>\n"
    if run.start is None:
        trained = note("The trainer never reported its start: no training settings to show.")
    else:
        start = run.start
        rows = [
            ["samples per epoch (images x repeats)", str(start.samples_per_epoch)],
            ["batch size", str(start.batch_size)],
            ["epochs", str(start.epochs)],
            ["steps", str(start.total_steps)],
            ["model family", esc(start.model_family)],
            ["model", f"<code>{esc(start.model)}</code>"],
            ["device", esc(start.device)],
        ]
        trained = table(["setting", "as trained"], rows)
    if dataset.report is None:
        return heading + trained + note(f"The dataset cannot be inspected now: {dataset.problem}")
    subsets = [
        [
            f"<code>{esc(s.folder)}</code>",
            str(s.repeats),
            "regularisation" if s.is_reg else "training",
            str(s.images),
            str(s.captions),
        ]
        for s in dataset.report.subsets
    ]
    now = table(["folder (as on disk now)", "repeats", "kind", "images", "captions"], subsets, frozenset({1, 3, 4}))
    return heading + trained + now


def _final_section(final: FinalFile | None) -> str:
    heading = "<h2>Final file</h2>\n"
    if final is None:
        return heading + note("No final LoRA file: the job did not finish training.")
    if final.size is None:
        return heading + note(f"{final.path} is not on disk (the trainer reported sha256 {final.expected_sha256}).")
    if final.expected_sha256 is None:
        check = '<span class="meta">the trainer reported no sha256 to compare</span>'
    elif final.expected_sha256 == final.sha256:
        check = '<span class="good">matches the sha256 the trainer reported</span>'
    else:
        check = f'<span class="bad">differs from the sha256 the trainer reported: {esc(final.expected_sha256)}</span>'
    rows = [
        ["path", f"<code>{esc(final.path)}</code>"],
        ["size", esc(size(final.size))],
        ["sha256", f"<code>{esc(final.sha256)}</code><br>{check}"],
    ]
    return heading + table([], rows)


def _money_section(phases: list[PhaseCost], billed: float, estimate: JobEstimate | None, check: EstimateCheck) -> str:
    heading = "<h2>Time and money</h2>\n"
    rows = [[esc(p.name), duration(p.seconds), money(p.usd)] for p in phases]
    rows.append(["<b>total</b>", duration(sum(p.seconds for p in phases)), f"<b>{money(billed)}</b>"])
    explained = note("Each phase runs until the next starts; money: its seconds x the $/h of the instance live then.")
    billed_table = table(["phase", "time", "billed"], rows, frozenset({1, 2}))
    if estimate is None:
        return heading + explained + billed_table + note("No estimate was recorded for this job.")
    training = next(p.seconds for p in phases if p.name == "training")
    overhead = sum(p.seconds for p in phases) - training
    compared = [
        ["training", hours(estimate.train_hours), duration(training)],
        ["everything else (provision, setup, fetch, teardown)", hours(estimate.overhead_hours), duration(overhead)],
        ["total time", hours(estimate.total_hours), duration(training + overhead)],
        ["money", money(estimate.cost_usd), money(billed)],
        *check_rows(check),
    ]
    return heading + explained + billed_table + table(["", "estimate", "actual"], compared, frozenset({1, 2}))


# ---------------------------------------------------------------------------------------------- the queue


def write_queue_report(ledger: Ledger, queue_id: str) -> Path:
    """Rewrite each of the queue's job reports, then the queue's own at QueueRecord.report_path."""
    queue = ledger.queue(queue_id)
    jobs = ledger.queue_jobs(queue.id)
    for job in jobs:
        write_job_report(ledger, job.id)
    path = Path(queue.report_path)
    body = _queue_title(queue) + _queue_table(ledger, jobs, path.parent) + _queue_totals(ledger, queue, jobs)
    body += _queue_grids(jobs, path.parent)
    return write_page(path, page(f"rentrain queue {queue.id}", body))


def _queue_title(queue: QueueRecord) -> str:
    return (
        f"<h1>Queue {esc(queue.id)}</h1>\n"
        f'<p class="meta">provider {esc(queue.provider)} · up to {queue.parallel} rental(s) at a time · '
        f"created {esc(clock_time(queue.created_at))}</p>\n"
    )


def _wall_seconds(ledger: Ledger, job: JobRecord) -> float | None:
    """From the first rental asked for until closed (or now); None for a job that never rented."""
    moves = ledger.transitions(job.id)
    rented = [t.at for t in moves if t.to_state == "intent_recorded"]
    if not rented:
        return None
    end = moves[-1].at if job.state == "closed" else time.time()
    return end - rented[0]


def _queue_table(ledger: Ledger, jobs: list[JobRecord], report_dir: Path) -> str:
    rows = []
    shares = cost_shares(ledger, jobs[0].queue_id) if jobs and jobs[0].queue_id else {}
    for position, job in enumerate(jobs, start=1):
        estimate = estimate_of(job)
        planned = "-" if estimate is None else f"{money(estimate.cost_usd)}, {hours(estimate.total_hours)}"
        link = esc(Path(os.path.relpath(job_report_path(job), report_dir)).as_posix())
        rows.append(
            [
                str(position),
                f"<code>{esc(job.config_path)}</code>",
                f"<b>{esc(outcome_of(job))}</b>" + (f"<br>{esc(job.error)}" if job.error else ""),
                money(ledger.job_cost(job.id)),
                money(shares.get(job.id, ledger.job_cost(job.id))),
                planned,
                duration(_wall_seconds(ledger, job)),
                f'<a href="{link}">{esc(job.id)}</a>',
            ]
        )
    headers = ["#", "config", "outcome", "billed", "share", "estimate", "wall time", "report"]
    note_text = note("share: the rental's setup split equally between its jobs (docs/overnight.md)")
    return "<h2>Jobs</h2>\n" + table(headers, rows, frozenset({0, 3, 4, 6})) + note_text


def _queue_totals(ledger: Ledger, queue: QueueRecord, jobs: list[JobRecord]) -> str:
    billed = sum(ledger.job_cost(job.id) for job in jobs)
    estimated = sum(e.cost_usd for e in map(estimate_of, jobs) if e is not None)
    budget = "no budget set" if queue.max_cost is None else f"budget {money(queue.max_cost)}"
    ends = [ledger.transitions(job.id)[-1].at for job in jobs if job.state == "closed"]
    ended = "still running" if len(ends) < len(jobs) else f"ended {clock_time(max(ends, default=queue.created_at))}"
    deadline = "no deadline set" if queue.deadline is None else f"deadline {clock_time(queue.deadline)}"
    rows = [
        ["money", f"billed {money(billed)} (estimated {money(estimated)})", esc(budget)],
        ["time", esc(ended), esc(deadline)],
    ]
    return "<h2>Totals</h2>\n" + table(["", "used", "allowed"], rows)


def _queue_grids(jobs: list[JobRecord], report_dir: Path) -> str:
    figures = []
    for job in jobs:
        samples = read_run_events(Path(job.output_dir)).samples
        if samples:
            last = samples[-1]
            caption = f"{job.id} ({job.config_path}): {_sample_caption(last.epoch, last.step, last.final)}"
            figures.append(embedded_image(local_sample(job, last), caption, report_dir))
    if not figures:
        return "<h2>Last samples</h2>\n" + note("No job wrote a sample grid.")
    return "<h2>Last samples</h2>\n" + "".join(figures)
