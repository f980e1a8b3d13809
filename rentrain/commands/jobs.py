"""Commands on jobs the ledger knows: status, attach, logs, fetch, down; and the warning every start gives."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from providers import registry
from providers.base import NotFound, ProviderError
from remote.config import ConfigError, load_config
from remote.events import CheckpointEvent, DoneEvent, SampleEvent, parse_event
from rentrain.commands.run import TIMING_ENV, _drive
from rentrain.credentials import CredentialsError, open_provider
from rentrain.costs import profile_from_check
from rentrain.dataset_check import inspect_dataset
from rentrain.job import JobFailed, JobRunner, RunSettings, Session
from rentrain.ledger import InstanceRecord, JobRecord, Ledger
from rentrain.offers import find_offers, requirements_from
from rentrain.paths import state_dir
from rentrain.progress import RunProgress
from rentrain.sshkeys import JobKey, load_job_key
from rentrain.transport import SshUnavailable, TransportError


def _ledger_if_any() -> Ledger | None:
    path = state_dir() / "ledger.sqlite3"
    return Ledger(path) if path.exists() else None


def _job(ledger: Ledger, job_id: str) -> JobRecord:
    try:
        return ledger.find_job(job_id)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from None


def _client_alive(job: JobRecord) -> bool:
    if job.client_pid is None:
        return False
    try:
        os.kill(job.client_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def unfollowed_instances(ledger: Ledger) -> list[tuple[JobRecord, InstanceRecord]]:
    """Instances the ledger says may be billing while no rentrain client follows their job."""
    found = []
    for job in ledger.jobs():
        if _client_alive(job) and job.is_open:
            continue
        for instance in ledger.instances(job.id, live_only=True):
            if instance.provider != "ssh":
                found.append((job, instance))
    return found


def warn_about_unfollowed(console: Console) -> None:
    ledger = _ledger_if_any()
    if ledger is None:
        return
    for job, instance in unfollowed_instances(ledger):
        what = f"instance {instance.instance_id}" if instance.instance_id else "an instance that may have been created"
        console.print(
            f"[yellow]warning[/]: job {job.id}: {what} on {instance.provider} ({instance.gpu}, ${instance.usd_per_hour:.3f}/h, "
            f"${instance.cost():.2f} so far) may still be billing and no rentrain client follows it: "
            f"rentrain attach {job.id}  or  rentrain down {job.id}",
            highlight=False,
        )


def _settings(job: JobRecord) -> RunSettings:
    settings = RunSettings.model_validate_json(job.settings_json)
    overrides = {field: float(os.environ[name]) for field, name in TIMING_ENV.items() if name in os.environ}
    return settings.model_copy(update=overrides)


def _runner(ledger: Ledger, job: JobRecord, view: RunProgress, console: Console) -> tuple[JobRunner, JobKey]:
    try:
        loaded = load_config(job.config_path)
    except ConfigError as exc:
        raise click.ClickException(f"job {job.id}'s config can no longer be read: {exc}") from None
    settings = _settings(job)
    if job.provider == "ssh":
        key = JobKey(private_path=Path(settings.identity or ""), public_line="")
        provider = None
    else:
        key = load_job_key(job.id)
        try:
            provider = open_provider(job.provider)
        except CredentialsError as exc:
            raise click.ClickException(str(exc)) from None
    return JobRunner(ledger, job, loaded, provider, settings, key, view, console.print), key


def _reattach(runner: JobRunner, key: JobKey, start_stopped: bool = False) -> Session | None:
    try:
        return runner.reattach(key.private_path, start_stopped=start_stopped)
    except JobFailed as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Also list closed jobs beyond the last ten.")
def status(show_all: bool) -> None:
    """Jobs, their state, and what they cost so far."""
    console = Console()
    ledger = _ledger_if_any()
    jobs = ledger.jobs() if ledger else []
    if not jobs:
        console.print("no jobs yet")
        return
    closed = [j for j in jobs if not j.is_open]
    shown = [j for j in jobs if j.is_open] + (closed if show_all else closed[-10:])
    table = Table(header_style="bold")
    for column in ("job", "provider", "state", "step", "instance", "cost", "started", "result / error"):
        table.add_column(column)
    assert ledger is not None
    for job in sorted(shown, key=lambda j: j.created_at):
        instances = ledger.instances(job.id)
        live = [i for i in instances if i.ended_at is None]
        current = live[-1] if live else (instances[-1] if instances else None)
        state = job.state + (f" ({job.outcome})" if job.outcome else "")
        if job.is_open and not _client_alive(job):
            state += ", detached"
        table.add_row(
            job.id,
            job.provider,
            state,
            f"{job.last_step}/{job.total_steps or '?'}",
            escape(f"{current.gpu} {current.instance_id or ''}".strip()) if current else "-",
            f"${ledger.job_cost(job.id):.4f}",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created_at)),
            escape(job.result_path or job.error or ""),
        )
    console.print(table)


@click.command()
@click.argument("job_id")
def attach(job_id: str) -> None:
    """Follow a detached job (or one whose client died) to its end: progress, fetch, destroy."""
    console = Console()
    ledger = Ledger()
    job = _job(ledger, job_id)
    if not job.is_open:
        raise click.ClickException(f"job {job.id} is closed ({job.outcome}); its result: {job.result_path or job.error}")
    ledger.update_job(job.id, client_pid=os.getpid())
    live = [i for i in ledger.instances(job.id) if i.ended_at is None]
    price = live[-1].usd_per_hour if live else 0.0
    started = live[-1].created_at if live else None
    with RunProgress(console, usd_per_hour=price, billing_started=started) as view:
        runner, key = _runner(ledger, job, view, console)
        session = _reattach(runner, key, start_stopped=True)
        if session is None:
            if runner.provider is None:
                raise click.ClickException(f"job {job.id}'s machine is not reachable")
            console.print(f"job {job.id}'s instance is gone; resuming from {job.last_state_path or 'the start'} on a new one")
        else:
            console.print(f"attached to job {job.id} on {session.remote.endpoint.host}:{session.remote.endpoint.port}")
        if runner.provider is None:
            assert session is not None
            _drive(runner, console, lambda: runner.continue_on(session))
            return
        offers = _fresh_offers(runner)
        _drive(runner, console, lambda: runner.run(offers, session=session))


def _fresh_offers(runner: JobRunner) -> list:
    """Offers to resume on if the current host turns out dead."""
    try:
        report = inspect_dataset(runner.loaded.train)
        profile = profile_from_check(runner.loaded.train, report)
        assert runner.provider is not None
        # the GPU count the job was started with (--gpus), not whatever the config says now
        requirements = requirements_from(runner.loaded.job, gpu_count=runner.settings.gpus)
        search = find_offers([runner.settings.provider], requirements, profile, opener=lambda _n: runner.provider)
        return [r.offer for r in search.ranked]
    except (ProviderError, ValueError):
        return []


@click.command()
@click.argument("job_id")
@click.option("--lines", "-n", default=100, show_default=True, help="Lines of the trainer's log.")
def logs(job_id: str, lines: int) -> None:
    """The trainer's log and the watchdog's decisions, from the instance (or the copy kept after it ended)."""
    ledger = Ledger()
    job = _job(ledger, job_id)
    local_copy = Path(job.output_dir) / f"trainer-{job.id}.log"
    live = [i for i in ledger.instances(job.id) if i.ended_at is None and i.ssh_host]
    if not live or not job.remote_dir:
        if local_copy.exists():
            click.echo(local_copy.read_text())
            return
        raise click.ClickException(f"job {job.id} has no running instance and no saved log")
    console = Console()
    with RunProgress(console) as view:
        runner, key = _runner(ledger, job, view, console)
    session = _reattach(runner, key)
    if session is None:
        raise click.ClickException(f"job {job.id}'s instance is gone and no log was saved")
    try:
        layout = session.layout
        text = session.remote.run(f"tail -n {int(lines)} {shlex.quote(layout.trainer_log)}", check=False).stdout
        watchdog = session.remote.run(f"cat {shlex.quote(layout.watchdog_log)}", check=False).stdout
    except (SshUnavailable, TransportError) as exc:
        raise click.ClickException(f"cannot reach the instance: {exc}") from None
    finally:
        session.remote.close()
    click.echo(text)
    if watchdog.strip():
        click.echo("--- watchdog ---")
        click.echo(watchdog)


@click.command()
@click.argument("job_id")
def fetch(job_id: str) -> None:
    """Download every checkpoint, sample grid and the final LoRA that the instance has now. Destroys nothing."""
    console = Console()
    ledger = Ledger()
    job = _job(ledger, job_id)
    with RunProgress(console) as view:
        runner, key = _runner(ledger, job, view, console)
        session = _reattach(runner, key)
        if session is None:
            raise click.ClickException(f"job {job.id}'s instance is gone; what was fetched is in {job.output_dir}")
        fetched = _fetch_everything(runner, session)
    console.print(f"{fetched} file(s) in {job.output_dir}")


def _fetch_everything(runner: JobRunner, session: Session) -> int:
    data = session.remote.read_from(session.layout.events, 0, max_bytes=64 << 20)
    count = 0
    out = Path(runner.job.output_dir)
    for line in data.splitlines():
        try:
            event = parse_event(line)
        except ValueError:
            continue
        if isinstance(event, CheckpointEvent):
            session.remote.download(event.path, session.layout.output, out / Path(event.path).name, event.sha256)
            count += 1
        elif isinstance(event, SampleEvent):
            session.remote.download(event.path, session.layout.output, out / "samples" / Path(event.path).name, None)
            count += 1
        elif isinstance(event, DoneEvent):
            local = session.remote.download(event.path, session.layout.output, out / Path(event.path).name, event.sha256)
            runner.ledger.update_job(runner.job.id, result_path=str(local), result_sha256=event.sha256)
            session.remote.run(f"touch {shlex.quote(session.layout.fetched)}", check=False)
            count += 1
    return count


@click.command()
@click.argument("job_id", required=False)
@click.option("--all", "everything", is_flag=True, help="Every rentrain-labelled instance the ledger or any provider knows.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
def down(job_id: str | None, everything: bool, yes: bool) -> None:
    """Destroy a job's instances, or (--all) every rentrain instance anywhere. Results not fetched are lost."""
    if bool(job_id) == everything:
        raise click.UsageError("give a JOB id or --all")
    console = Console()
    ledger = Ledger()
    targets: list[tuple[str, str, JobRecord | None, InstanceRecord | None]] = []
    if job_id:
        job = _job(ledger, job_id)
        targets += [(i.provider, i.instance_id or "", job, i) for i in ledger.instances(job.id, live_only=True)]
    else:
        for job in ledger.jobs():
            targets += [(i.provider, i.instance_id or "", job, i) for i in ledger.instances(job.id, live_only=True)]
        known = {(p, i) for p, i, _, _ in targets}
        for name in registry.API_KEY_ENV:
            try:
                provider = open_provider(name)
                found = provider.list_instances()
            except (CredentialsError, ProviderError) as exc:
                console.print(f"[dim]{name}: not checked ({escape(str(exc))})[/]")
                continue
            targets += [(name, i.id, None, None) for i in found if (name, i.id) not in known]
    targets = [t for t in targets if t[0] != "ssh"]
    if not targets:
        console.print("nothing is running")
        _close_jobs(ledger, job_id)
        return
    for provider_name, instance_id, job, _ in targets:
        console.print(f"{provider_name} instance {instance_id or '(id unknown)'}" + (f" of job {job.id}" if job else " (rentrain label, not in this ledger)"))
    if not yes and not click.confirm(f"Destroy {len(targets)} instance(s)?", default=False):
        raise click.Abort()
    failures = 0
    for provider_name, instance_id, job, record in targets:
        try:
            provider = open_provider(provider_name)
            if instance_id:
                provider.destroy(instance_id)
            else:
                for instance in provider.list_instances(job.label if job else "rentrain-"):
                    provider.destroy(instance.id)
        except NotFound:
            pass
        except (CredentialsError, ProviderError) as exc:
            failures += 1
            console.print(f"[red]{provider_name} {instance_id}: {escape(str(exc))}[/]")
            continue
        if record is not None:
            ledger.update_instance(record.job_id, record.offer_id, record.created_at, ended_at=time.time(), end_reason="rentrain down")
        console.print(f"destroyed {provider_name} instance {instance_id}")
    _close_jobs(ledger, job_id)
    if failures:
        sys.exit(1)


def _close_jobs(ledger: Ledger, job_id: str | None) -> None:
    for job in ledger.jobs(open_only=True):
        if (job_id is None or job.id.startswith(job_id)) and not ledger.instances(job.id, live_only=True):
            ledger.transition(job.id, "closed", "rentrain down", outcome="cancelled")
