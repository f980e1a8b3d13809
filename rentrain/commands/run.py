"""`rentrain run CONFIG`: check, price, rent, train, fetch, destroy (or train here with --provider local)."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import NamedTuple

import click
from rich.console import Console
from rich.markup import escape

from providers import registry
from providers.base import Unsupported
from remote.config import KNOWN_PROVIDERS, LoadedConfig
from rentrain.cli_types import ClockTime, Number, setting_type, timing_overrides
from rentrain.commands.check import checked_config
from rentrain.commands.offers import gpus_option, scaling_note
from rentrain.commands.run_common import ask_destroy, destroy_now, refuse_to_overwrite
from rentrain.commands.run_queue import QueueOptions, run_queue
from rentrain.costs import JobEstimate
from rentrain.credentials import CredentialsError, open_provider
from rentrain.job import DetachRequested, HostLost, JobFailed, JobRunner, RunSettings, new_job_id
from rentrain.job_news import JobNews
from rentrain.job_profile import profile_from_check, steps_on
from rentrain.ledger import ClientLock, JobRecord, Ledger, this_host
from rentrain.local_run import LocalTrainingUnavailable, ensure_training_stack, run_trainer
from rentrain.multigpu import GpuCountError, describe_data_parallel, local_cuda_devices, local_gpus_note, plan_with_gpus
from rentrain.notify import Notifier, NotifyConfigError
from rentrain.offers import RankedOffer, find_offers, requirements_from
from rentrain.progress import RunProgress, plain_printer
from rentrain.queue_plan import QUEUE_FILE_SUFFIXES
from rentrain.sshkeys import JobKey, create_job_key
from rentrain.transport import SshEndpoint, TransportError
from rentrain.upload_list import plan_upload

# Tuning knobs for slow networks (and fast tests); the defaults suit real providers.


notify_option = click.option(
    "--notify",
    "notify_urls",
    multiple=True,
    metavar="URL",
    help="Tell this apprise URL (ntfy, Discord, Slack, email...) when a job ends; repeatable (docs/notifications.md).",
)


@click.command()
@click.argument("configs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--provider", type=click.Choice(KNOWN_PROVIDERS, case_sensitive=False), help="Default: [rentrain] provider."
)
@click.option("--host", help="With --provider ssh: user@host[:port] of a machine you rented by hand.")
@click.option(
    "--identity",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="With --provider ssh: your SSH key.",
)
@click.option(
    "--trust-new-host",
    is_flag=True,
    help="With --provider ssh: accept a host that is not in your known_hosts yet, trusting its key on first use.",
)
@click.option(
    "--max-cost",
    type=setting_type("max_cost"),
    help="USD budget for the job; checked before renting, enforced on the instance.",
)
@click.option("--max-hours", type=setting_type("max_hours"), help="Hard deadline, enforced on the instance.")
@click.option(
    "--deadline",
    type=ClockTime(),
    help='Be done by this time: "07:00" (the next one) or "2026-12-06 07:00"; for a queue, all its jobs.',
)
@click.option(
    "--parallel",
    type=Number(1, 16, whole=True),
    default=1,
    show_default=True,
    help="A queue: rent up to this many hosts at once and spread the jobs over them.",
)
@click.option(
    "--idle-timeout",
    type=setting_type("idle_timeout_minutes"),
    help="Minutes without this client after training ends before the instance ends itself.",
)
@click.option("--gpu", "gpus", multiple=True, help="Only these GPU models (repeatable).")
@gpus_option
@click.option("--max-offers", type=setting_type("max_offers"), help="Offers to try when hosts fail.")
@click.option(
    "--max-retries", type=setting_type("max_retries"), help="Times to resume on a new instance after a host dies."
)
@click.option(
    "--detach", is_flag=True, help="Return once training has started; `rentrain attach JOB` follows it later."
)
@click.option("--yes", "-y", is_flag=True, help="Rent without asking.")
@click.option(
    "--resume",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="--provider local: continue from a checkpoint's state folder.",
)
@click.option("--overwrite", is_flag=True, help="Replace an earlier run's LoRA, checkpoints and samples in output_dir.")
@notify_option
def run(
    configs: tuple[Path, ...],
    provider: str | None,
    host: str | None,
    identity: Path | None,
    trust_new_host: bool,
    max_cost: float | None,
    max_hours: float | None,
    deadline: float | None,
    parallel: int,
    idle_timeout: float | None,
    gpus: tuple[str, ...],
    gpu_count: int | None,
    max_offers: int | None,
    max_retries: int | None,
    detach: bool,
    yes: bool,
    resume: Path | None,
    overwrite: bool,
    notify_urls: tuple[str, ...],
) -> None:
    """Check CONFIG and its dataset, rent the offer with the lowest estimated total cost, train the LoRA,
    bring checkpoints and the result home, and destroy the instance.

    Several CONFIGS (or a folder of configs, or a queue file listing them, one per line) make a queue: all are
    checked first, jobs with the same base model run in turn on one rental, under one --max-cost and one
    --deadline; the plan is shown and asked for once.

    Nothing is rented when the check finds an error. Ctrl-C asks whether to destroy the instance or to
    detach; SIGTERM and SIGHUP detach (the instance's watchdog keeps guarding it).
    """
    console = Console()
    if provider:
        _refuse_if_impossible(provider.lower())
    if len(configs) > 1 or configs[0].is_dir() or configs[0].suffix in QUEUE_FILE_SUFFIXES:
        chosen_provider = (provider or "").lower()
        if not chosen_provider:
            raise click.UsageError("a queue needs --provider vast|runpod")
        overrides = {
            name: value
            for name, value in (
                ("idle_timeout_minutes", idle_timeout),
                ("max_offers", max_offers),
                ("max_retries", max_retries),
            )
            if value is not None
        }
        options = QueueOptions(
            chosen_provider,
            max_cost,
            deadline,
            int(parallel),
            gpus,
            gpu_count,
            overrides | timing_overrides(),
            yes,
            overwrite,
        )
        run_queue(configs, options, console, notifier_from(notify_urls, console))
        return
    if parallel != 1:
        raise click.UsageError("--parallel spreads a queue: give several configs, a folder or a queue file")
    config = configs[0]
    result, loaded = checked_config(config, console)
    chosen = (provider or loaded.job.provider or "").lower()
    if not chosen:
        raise click.UsageError("say where to train: --provider local|vast|runpod|ssh, or provider in [rentrain]")
    _refuse_if_impossible(chosen)
    gpu_total = gpu_count or loaded.job.gpu_count
    plan = result.dataset.step_plan if result.dataset else None
    if plan is not None:
        plan = plan_with_gpus(plan, loaded.train, gpu_total)
        steps = f"{plan.total_steps} steps ({plan.epochs} epochs of {plan.steps_per_epoch})"
        console.print(f"{escape(str(loaded.path))}: {steps}")
    if gpu_total > 1:
        console.print(describe_data_parallel(gpu_total, loaded.train.batch_size) + " (README: Several GPUs)")
    if chosen == "local":
        _run_local(loaded, console, resume, gpu_total, overwrite)
        return
    settings = RunSettings(
        provider=chosen,
        max_cost=max_cost if max_cost is not None else loaded.job.max_cost,
        max_hours=max_hours if max_hours is not None else loaded.job.max_hours,
        idle_timeout_minutes=idle_timeout if idle_timeout is not None else loaded.job.idle_timeout_minutes,
        max_offers=max_offers if max_offers is not None else loaded.job.max_offers,
        max_retries=max_retries if max_retries is not None else loaded.job.max_retries,
        image=loaded.job.image,
        disk_gb=loaded.job.disk_gb,
        gpus=gpu_total,
        deadline=deadline,
        **timing_overrides(),
    )
    refuse_to_overwrite(loaded, overwrite, console)
    notifier = notifier_from(notify_urls, console)
    if chosen == "ssh":
        planned = plan.total_steps if plan is not None else None
        news = JobNews(Ledger(), notifier, plain_printer(console))
        target = host or loaded.job.host
        _run_on_host(loaded, settings, target, identity, detach, console, trust_new_host, planned, news)
        return
    news = JobNews(Ledger(), notifier, plain_printer(console))
    _run_rented(loaded, settings, result.dataset, gpus, detach, yes, console, news)


def _refuse_if_impossible(name: str) -> None:
    try:
        registry.ensure_can_run(name)
    except Unsupported as exc:
        click.echo(exc.message, err=True)
        sys.exit(2)


def _run_local(loaded: LoadedConfig, console: Console, resume: Path | None, gpus: int, overwrite: bool) -> None:
    try:
        ensure_training_stack(gpus)
    except LocalTrainingUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    if gpus > 1:
        try:
            note = local_gpus_note(gpus, local_cuda_devices())
        except GpuCountError as exc:
            raise click.ClickException(str(exc)) from None
        if note:
            console.print(f"[yellow]{escape(note)}[/]")
    train = loaded.train
    if resume is None:
        refuse_to_overwrite(loaded, overwrite, console)
    with RunProgress(console) as view:
        try:
            exit_code = run_trainer(loaded.path, train.output_dir, view, resume, gpus)
        except KeyboardInterrupt:
            console.print("interrupted: the trainer stopped; its last checkpoint's state folder resumes it (--resume)")
            sys.exit(130)
    if view.done is None:
        if view.error is None:
            log = escape(str(train.output_dir / "trainer.log"))
            console.print(f"[red]the trainer exited with code {exit_code}[/]; see {escape(str(log))}")
        sys.exit(1)
    console.print(f"LoRA: {escape(str(view.done.path))}")


class ResumeFrom(NamedTuple):
    """Where a job that goes on from another job's training state starts (`rentrain continue`)."""

    job_id: str
    state_path: str
    steps_done: int  # by that state: the job's total counts them too (the trainer numbers its steps on)


def _new_job(
    ledger: Ledger,
    loaded: LoadedConfig,
    provider: str,
    settings: RunSettings,
    total_steps: int | None,
    resume: ResumeFrom | None = None,
    estimate: JobEstimate | None = None,
) -> JobRecord:
    """The job, recorded planned and locked by this client, with the estimate of the offer it was planned on."""
    job_id = new_job_id()
    job = JobRecord(
        id=job_id,
        created_at=time.time(),
        config_path=str(loaded.path),
        provider=provider,
        label=f"rentrain-{job_id}",
        state="planned",
        output_dir=str(loaded.train.output_dir),
        total_steps=total_steps if resume is None or total_steps is None else resume.steps_done + total_steps,
        last_state_path=resume.state_path if resume else None,
        client_pid=os.getpid(),  # born locked by this client (ClientLock)
        client_host=this_host(),
        client_beat_at=time.time(),
        settings_json=settings.model_dump_json(),
        estimate_json=estimate.model_dump_json() if estimate is not None else "{}",
    )
    if resume is None:
        ledger.create_job(job)
    else:
        ledger.create_job(job, f"continues job {resume.job_id} from {resume.state_path}")
    return job


def _run_rented(
    loaded: LoadedConfig,
    settings: RunSettings,
    report: object,
    gpus: tuple[str, ...],
    detach: bool,
    yes: bool,
    console: Console,
    news: JobNews,
    resume: ResumeFrom | None = None,
) -> None:
    try:
        provider = open_provider(settings.provider)
    except CredentialsError as exc:
        raise click.ClickException(str(exc)) from None
    profile = profile_from_check(loaded.train, report)  # type: ignore[arg-type]
    requirements = requirements_from(loaded.job, gpu_models=list(gpus) or None, gpu_count=settings.gpus)
    search = find_offers([settings.provider], requirements, profile, opener=lambda _name: provider)
    for note in search.notes:
        console.print(f"[yellow]{settings.provider}[/]: {escape(note.message)}")
    if not search.ranked:
        raise click.ClickException(
            f"no {settings.provider} offer meets the requirements ({search.considered} offers seen); "
            "`rentrain offers --config CONFIG` shows what is out there"
        )
    best = search.ranked[0]
    _show_choice(best, console)
    console.print(plan_upload(loaded.train).summary(), markup=False, highlight=False)
    if settings.max_cost is not None and best.estimate is not None and best.estimate.cost_usd > settings.max_cost:
        raise click.ClickException(
            f"the estimate ${best.estimate.cost_usd:.2f} is above the budget ${settings.max_cost:.2f}; "
            "nothing was rented"
        )
    if not yes and not click.confirm("Rent it and start?", default=True):
        raise click.Abort()
    ledger = Ledger()
    steps = steps_on(profile, best.offer.gpu_count)
    job = _new_job(ledger, loaded, settings.provider, settings, steps, resume, best.estimate)
    console.print(f"job [bold]{job.id}[/] (instance label {job.label})")
    key = create_job_key(job.id)
    with ClientLock(ledger, job.id) as lock, RunProgress(console, usd_per_hour=best.offer.price_per_hour) as view:
        runner = JobRunner(ledger, job, loaded, provider, settings, key, view, plain_printer(console))
        lock.on_lost = detach_when_taken_over(runner)
        _drive(runner, console, lambda: runner.run([r.offer for r in search.ranked], detach_after_start=detach), news)


def _run_on_host(
    loaded: LoadedConfig,
    settings: RunSettings,
    host: str | None,
    identity: Path | None,
    detach: bool,
    console: Console,
    trust_new_host: bool,
    total_steps: int | None,
    news: JobNews,
) -> None:
    if not host:
        raise click.UsageError("--provider ssh needs --host user@host[:port] (or host in [rentrain])")
    endpoint = parse_host(host)
    key_path = identity or _default_identity()
    settings = settings.model_copy(update={"identity": str(key_path)})
    console.print(plan_upload(loaded.train).summary(), markup=False, highlight=False)
    ledger = Ledger()
    job = _new_job(ledger, loaded, "ssh", settings, total_steps)
    console.print(f"job [bold]{job.id}[/] on {escape(f'{endpoint.user}@{endpoint.host}:{endpoint.port}')}")
    key = JobKey(private_path=key_path, public_line="")
    with ClientLock(ledger, job.id) as lock, RunProgress(console) as view:
        runner = JobRunner(ledger, job, loaded, None, settings, key, view, plain_printer(console))
        lock.on_lost = detach_when_taken_over(runner)
        _drive(runner, console, lambda: runner.run_on_host(endpoint, key_path, detach, trust_new_host), news)


def parse_host(text: str) -> SshEndpoint:
    user, _, rest = text.rpartition("@")
    host, _, port = rest.partition(":")
    if not host or (port and not port.isdigit()):
        raise click.BadParameter(f"expected user@host[:port], got {text!r}", param_hint="--host")
    return SshEndpoint(host=host, port=int(port or 22), user=user or "root")


def _default_identity() -> Path:
    for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
        candidate = Path.home() / ".ssh" / name
        if candidate.exists():
            return candidate
    raise click.UsageError("no SSH key in ~/.ssh: give one with --identity")


def _show_choice(best: RankedOffer, console: Console) -> None:
    offer = best.offer
    where = f", {offer.location}" if offer.location else ""
    line = (
        f"best offer: {offer.gpu_count}x {offer.gpu_model} on {offer.provider}{where} at ${offer.price_per_hour:.3f}/h"
    )
    if best.estimate is not None:
        e = best.estimate
        line += (
            f"; estimated {e.total_hours:.2f} h ({e.train_hours:.2f} training + {e.overhead_hours:.2f} setup), "
            f"about ${e.cost_usd:.2f}"
        )
    console.print(escape(line))
    note = scaling_note(offer.gpu_count, [best])
    if note:
        console.print(escape(note), highlight=False)


def detach_when_taken_over(runner: JobRunner) -> Callable[[JobRecord], None]:
    """For ClientLock.on_lost: another client took the job over (this one looked dead), so this one detaches."""

    def detach(winner: JobRecord) -> None:
        runner.detach_requested = f"{winner.client} took the job over"

    return detach


def _drive(runner: JobRunner, console: Console, body: object, news: JobNews | None = None) -> None:
    """Run the job. SIGTERM/SIGHUP detach once the instance's watchdog runs (the runner checks at safe
    points); Ctrl-C asks, or destroys during setup (the watchdog guards a client killed then)."""

    def detach_on_signal(signum: int, _frame: FrameType | None) -> None:
        runner.detach_requested = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, detach_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            outcome = body()  # type: ignore[operator]
        except KeyboardInterrupt:
            if not runner.guarded:
                console.print("\nstopped during setup: the instance is destroyed")
                destroy_now(runner, console)
                sys.exit(130)
            if ask_destroy(console):
                destroy_now(runner, console)
                sys.exit(130)
            raise DetachRequested("Ctrl-C") from None
    except DetachRequested as exc:
        console.print(
            f"detached ({exc}): job {runner.job.id} goes on under its watchdog. "
            f"Follow it with: rentrain attach {runner.job.id}"
        )
        return
    except (JobFailed, TransportError, HostLost) as exc:
        console.print(f"[bold red]job {runner.job.id} failed[/]: {escape(str(exc))}")
        sys.exit(1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        closed = runner.ledger.job(runner.job.id)
        if closed.state == "closed":
            # every end (done, failed, Ctrl-C, no offer left); a detached job keeps its key
            runner.teardown.forget_key()
            report = news.job_ended(closed) if news is not None else None
            if report is not None:
                console.print(f"report: {report}", markup=False, highlight=False)
    if outcome != "succeeded":
        console.print(f"[bold red]job {runner.job.id} {outcome}[/]: {escape(runner.job.error or '')}")
        sys.exit(1)
    cost = runner.ledger.job_cost(runner.job.id)
    console.print(f"[bold green]LoRA[/]: {escape(str(runner.job.result_path))}  (cost ${cost:.4f})")


def notifier_from(urls: Sequence[str], console: Console) -> Notifier:
    """The --notify URLs and credentials.toml's, checked before anything is rented (a bad one: exit 2)."""
    try:
        return Notifier.from_sources(urls, plain_printer(console))
    except NotifyConfigError as exc:
        raise click.UsageError(str(exc)) from None
