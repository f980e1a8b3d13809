"""Commands on jobs the ledger knows: status, attach, logs, fetch, down; and the sweep before every other
command.

The client lock (rentrain/ledger.py `ClientLock`): one rentrain client follows a job at a time. `run` holds
it from the job's creation, `attach` and `fetch` take it (refused, naming the other client's PID and host,
while that client is alive), `down` on a job another live client follows asks first (with --yes it goes
ahead: the other client finds its instance gone and stops).
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from providers import registry
from providers.base import NotFound, Offer, Provider, ProviderError
from remote.config import ConfigError
from remote.events import CheckpointEvent, DoneEvent, SampleEvent, parse_event
from rentrain.accounts import (
    CHECK_SECONDS,
    ORPHAN_CHECK_EVERY_SECONDS,
    STOPPED_LIMIT_SECONDS,
    SWEEP_SECONDS,
    AccountCheck,
    AccountsView,
    Sighting,
    check_accounts,
    past_stopped_limit,
    record_found_instance,
    record_started,
    result_home,
    stopped_line,
    storage_cost,
    survey,
    unfetched,
)
from rentrain.billing_notices import NOTICE_AFTER_SECONDS, claim_notice, unattended_since
from rentrain.cli_types import timing_overrides
from rentrain.commands.offers import money
from rentrain.commands.queues import attach_queue, cancel_waiting_jobs, print_queues
from rentrain.commands.run import _drive, detach_when_taken_over, notifier_from
from rentrain.credentials import CredentialsError, MissingApiKey, open_provider
from rentrain.job import JobFailed, JobRunner, RunSettings, Session
from rentrain.job_config import job_config
from rentrain.job_news import JobNews
from rentrain.ledger import ClientLock, IllegalTransition, JobRecord, Ledger, LockHeld, QueueRecord, client_alive
from rentrain.notify import Notification, Notifier, NotifyConfigError
from rentrain.offers import fresh_offers
from rentrain.paths import state_dir
from rentrain.progress import RunProgress, plain_printer
from rentrain.report_facts import job_check
from rentrain.report_html import percent, step_time
from rentrain.sshkeys import JobKey, forget_job_key, load_job_key
from rentrain.transport import NETWORK_ERRORS, FetchRefused, SshUnavailable, TransportError


def _ledger_if_any() -> Ledger | None:
    path = state_dir() / "ledger.sqlite3"
    return Ledger(path) if path.exists() else None


def _queue(ledger: Ledger, queue_id: str) -> QueueRecord | None:
    """The queue an id (or a unique prefix of one) names; None when it names no queue."""
    try:
        return ledger.find_queue(queue_id)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from None


def _job(ledger: Ledger, job_id: str) -> JobRecord:
    try:
        return ledger.find_job(job_id)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from None


@contextmanager
def _following(ledger: Ledger, job_id: str, also: str = "") -> Iterator[ClientLock]:
    """Hold the job's client lock; another live client holding it is a clear error (`also` added to it)."""
    try:
        lock = ClientLock(ledger, job_id).__enter__()
    except LockHeld as exc:
        raise click.ClickException(f"{exc}{also}") from None
    try:
        yield lock
    finally:
        lock.__exit__(None, None, None)


def _insist_on(checks: dict[str, AccountCheck], providers: set[str]) -> dict[str, AccountCheck]:
    """Where the ledger has an instance that may bill, a provider without an API key is not quiet: it is
    one that could not be checked."""
    for name in providers:
        if name in checks and not checks[name].configured:
            checks[name] = AccountCheck(name, problem="no API key found")
    return checks


def _ledger_live_providers(ledger: Ledger | None, job_ids: set[str] | None = None) -> set[str]:
    records = ledger.instances(live_only=True) if ledger else []
    return {r.provider for r in records if r.provider != "ssh" and (job_ids is None or r.job_id in job_ids)}


def sweep(console: Console, seconds: float = SWEEP_SECONDS) -> None:
    """The sweep before every command but status, down and attach (which look for themselves).

    Cheap by rule: without a ledger it does nothing. Otherwise it lists
    - each provider where the ledger has an instance not recorded as ended, of a job no live client follows;
    - each provider with an API key that no rentrain command has listed (with nothing unknown found) for
      ORPHAN_CHECK_EVERY_SECONDS (a day): instances no ledger knows, such as a create that answered late;
    all at once, at most `seconds` (SWEEP_SECONDS) in all. With nothing to look for it makes no request.
    Then it says what may bill (running or stopped instances no client follows, with a stopped one's storage
    cost and what is not home; instances no ledger knows; providers it could not check), settles stopped
    instances past STOPPED_LIMIT_SECONDS (`_settle_stopped`), and removes SSH keys that jobs which are over
    left on an account. It only prints: the command it precedes keeps its own exit code (`status` and
    `down` are the commands whose exit code says whether everything could be checked).
    """
    ledger = _ledger_if_any()
    if ledger is None:
        return
    now = time.time()
    jobs = ledger.jobs()
    followed = {j.id for j in jobs if client_alive(j, now)}
    live = _ledger_live_providers(ledger, {j.id for j in jobs} - followed)
    due = {
        name
        for name in registry.API_KEY_ENV
        if (ledger.account_checked_at(name) or 0.0) < now - ORPHAN_CHECK_EVERY_SECONDS
    }
    if live or due:
        checks = _insist_on(check_accounts(sorted(live | due), seconds), live)
        view = survey(ledger, checks, include=lambda job: job is None or job.id not in followed)
        _remember_checks(ledger, view)
        _report_accounts(console, view, summary=False)
        for sighting in view.sightings:
            if past_stopped_limit(sighting, now):
                _settle_stopped(ledger, sighting, checks[sighting.provider], console)
        _notify_still_billing(ledger, view, console, now)
    _forget_leftover_keys(ledger, console)


def _remember_checks(ledger: Ledger, view: AccountsView) -> None:
    """A complete answer with no instance unknown to the ledger postpones the sweep's next look there."""
    unknown = {s.provider for s in view.orphans}
    for check in view.checks.values():
        if check.answered and check.provider not in unknown:
            ledger.record_account_checked(check.provider)


def _notify_still_billing(ledger: Ledger, view: AccountsView, console: Console, now: float) -> None:
    """Notify credentials.toml's notify URLs (docs/notifications.md) of each instance still on its provider's
    account NOTICE_AFTER_SECONDS after its job was closed or its client last had it, at most once a day per
    instance (rentrain/billing_notices.py). Stopped instances past the limit were just settled: not told."""
    due = [
        (sighting, since)
        for sighting in view.sightings
        if (since := unattended_since(ledger, sighting)) is not None
        and now - since >= NOTICE_AFTER_SECONDS
        and not past_stopped_limit(sighting, now)
    ]
    if not due:
        return

    def say(text: str) -> None:
        console.print(f"[yellow]{escape(text)}[/]", highlight=False)

    try:
        notifier = Notifier.from_sources([], say)
    except NotifyConfigError as exc:
        say(f"no notification sent: {exc}")
        return
    if not notifier.targets:
        return
    for sighting, since in due:
        assert sighting.job is not None and sighting.instance_id is not None
        if not claim_notice(ledger, sighting.provider, sighting.instance_id, now):
            continue
        ended = "its job ended" if sighting.job.state == "closed" else "a rentrain client last had it"
        what = stopped_line(sighting, now) if sighting.stopped else _unfollowed_text(sighting)
        title = f"rentrain: {sighting.provider} instance {sighting.instance_id} is still billing"
        body = f"{(now - since) / 60:.0f} minutes after {ended}: {what}"
        notifier.send(Notification(kind="still_billing", title=title, body=body))


def _orphan_text(sighting: Sighting) -> str:
    assert sighting.instance is not None
    instance = sighting.instance
    return (
        f"{instance.provider} instance {instance.id} ({instance.label}, {instance.provider_status or instance.status}) "
        "is in no job of this ledger and may be billing (a rentrain on another machine, or a create that answered "
        "late): `rentrain down --all` destroys every rentrain instance"
    )


def _unfollowed_text(sighting: Sighting) -> str:
    job, record = sighting.job, sighting.record
    assert job is not None
    if record is None:
        what = f"instance {sighting.instance_id} on {sighting.provider} (a create that answered late)"
    else:
        what = f"instance {record.instance_id}" if record.instance_id else "an instance that may have been created"
        what += f" on {record.provider} ({record.gpu}, ${record.usd_per_hour:.3f}/h, ${record.cost():.2f} so far)"
    return (
        f"job {job.id}: {what} may still be billing and no rentrain client follows it: "
        f"rentrain attach {job.id}  or  rentrain down {job.id}"
    )


def _settle_stopped(ledger: Ledger, sighting: Sighting, check: AccountCheck, console: Console) -> None:
    """A stopped instance past the limit. Its job's result home: destroyed at once. Otherwise started again,
    given a fresh watchdog, everything on it fetched, then destroyed; one that does not come back within the
    job's SSH wait is stopped again (the next command tries again), and one whose fetch fails is left to
    that watchdog, which stops it once idle. Results not home are never destroyed unfetched here."""
    job = sighting.job
    assert job is not None and sighting.instance_id is not None and check.api is not None
    days = STOPPED_LIMIT_SECONDS / 86400
    if result_home(job):
        console.print(f"job {job.id}: its instance is stopped over {days:.0f} days, its result is home: destroying it")
        _destroy_sighting(ledger, check.api, sighting, f"stopped over {days:.0f} days, result home", console)
        _finish_jobs(ledger, [job.id], console, "its stopped instance destroyed, result home")
        return
    console.print(
        f"job {job.id}: its instance has been stopped over {days:.0f} days with results not home; starting it, "
        "fetching them, then destroying it (a few minutes; Ctrl-C leaves it to its watchdog)",
        highlight=False,
    )
    try:
        with _following(ledger, job.id), RunProgress(console) as view:
            runner, key = _runner(ledger, job, view, console)
            asked_at = time.time()
            if not _started_again(check.api, sighting.instance_id, runner.settings):
                console.print(
                    f"[yellow]job {job.id}: its instance did not come back within "
                    f"{runner.settings.ssh_wait_seconds:.0f} s and was stopped again; the next rentrain command "
                    f"tries again (`rentrain down {job.id}` gives its results up)[/]"
                )
                return
            if sighting.record is not None:
                record_started(ledger, sighting.record, asked_at)
            session = _reattach(runner, key)
            if session is None:
                console.print(f"job {job.id}: its instance is gone")
                return
            runner.context.read_watchdog_record(session)
            runner.preparer.guard_restarted(session)  # its old watchdog ended with the stop
            fetched = _fetch_everything(runner, session)
            runner.teardown.destroy(session, f"stopped over {days:.0f} days; {fetched} file(s) fetched first")
            _finish_jobs(ledger, [job.id], console, f"its stopped instance fetched ({fetched} file(s)) and destroyed")
    except (click.ClickException, JobFailed, ProviderError) as exc:
        console.print(f"[yellow]job {job.id}: {escape(str(exc))}[/]", highlight=False)
    except FetchRefused as exc:
        console.print(
            f"[red]job {job.id}: the instance offered a file no honest run writes ({escape(str(exc))}); nothing "
            f"more is fetched from it. It runs under its watchdog; end it with: rentrain down {job.id}[/]",
            highlight=False,
        )
    except (*NETWORK_ERRORS, TransportError) as exc:
        console.print(
            f"[yellow]job {job.id}: fetching failed ({escape(str(exc))}); the instance runs under its watchdog, "
            f"which stops it again once idle. Try: rentrain attach {job.id}[/]",
            highlight=False,
        )


def _started_again(api: Provider, instance_id: str, settings: RunSettings) -> bool:
    """Start a stopped instance and wait until it answers with SSH; if it does not in time, stop it again
    (on Vast a stopped instance whose GPU was rented by someone else cannot start until it is free)."""
    api.start(instance_id)
    deadline = time.monotonic() + settings.ssh_wait_seconds
    while time.monotonic() < deadline:
        instance = api.get(instance_id)
        if instance.status == "running" and instance.ssh is not None:
            return True
        if instance.status in ("exited", "gone"):
            return False
        time.sleep(settings.poll_seconds)
    with suppress(ProviderError):
        api.stop(instance_id)
    return False


def _forget_leftover_keys(ledger: Ledger, console: Console) -> None:
    """SSH keys that jobs which are over (closed, or no instance left) and that no client follows left on an
    account: their client died before it could remove them."""
    now = time.time()
    live_jobs = {r.job_id for r in ledger.instances(live_only=True)}
    for job in ledger.jobs():
        if job.key_may_be_on_account and job.id not in live_jobs and not client_alive(job, now):
            problem = _forget_key_of(ledger, job, quiet_without_key=True)
            if problem:
                console.print(f"[yellow]{escape(problem)}[/]")


def _settings(job: JobRecord) -> RunSettings:
    settings = RunSettings.model_validate_json(job.settings_json)
    overrides = timing_overrides()
    return settings.model_copy(update=overrides)


def _runner(ledger: Ledger, job: JobRecord, view: RunProgress, console: Console) -> tuple[JobRunner, JobKey]:
    try:
        loaded = job_config(job)
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
    return JobRunner(ledger, job, loaded, provider, settings, key, view, plain_printer(console)), key


def _reattach(runner: JobRunner, key: JobKey, start_stopped: bool = False) -> Session | None:
    try:
        return runner.provisioner.reattach(key.private_path, start_stopped=start_stopped)
    except JobFailed as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@click.argument("job_id", metavar="[JOB]", required=False)
@click.option("--all", "show_all", is_flag=True, help="Also list closed jobs beyond the last ten.")
def status(job_id: str | None, show_all: bool) -> None:
    """Jobs, their state, and what they cost so far; then every rentrain instance on the provider accounts.
    With JOB (its id or a unique start of it): that job, and its estimate against what it cost and measured.

    Stopped instances are listed with their storage cost and what is not home; instances no job of this
    ledger knows are named. Exit 1 when a provider with an API key could not be checked: instances there
    may still be billing. Looks only: starts, fetches and destroys nothing.
    """
    console = Console()
    ledger = _ledger_if_any()
    if job_id is not None and ledger is None:
        raise click.ClickException(f"no job {job_id!r}: no job has been run on this machine")
    job = _job(ledger, job_id) if ledger is not None and job_id is not None else None
    checks = _insist_on(check_accounts(registry.API_KEY_ENV, CHECK_SECONDS), _ledger_live_providers(ledger))
    view = survey(ledger, checks)
    if ledger is not None:
        _remember_checks(ledger, view)
    jobs = ledger.jobs() if ledger else []
    if job is not None:
        assert ledger is not None
        _print_jobs(console, ledger, [job], show_all=True)
        _print_estimate_check(console, ledger, job)
    elif jobs:
        assert ledger is not None
        _print_jobs(console, ledger, jobs, show_all)
        print_queues(console, ledger)
    else:
        console.print("no jobs yet")
    _report_accounts(console, view, summary=True)
    if view.not_checked:
        sys.exit(1)


def _print_jobs(console: Console, ledger: Ledger, jobs: list[JobRecord], show_all: bool) -> None:
    closed = [j for j in jobs if not j.is_open]
    shown = [j for j in jobs if j.is_open] + (closed if show_all else closed[-10:])
    table = Table(header_style="bold")
    for column in ("job", "provider", "state", "step", "instance", "cost", "started", "result / error"):
        table.add_column(column)
    now = time.time()
    for job in sorted(shown, key=lambda j: j.created_at):
        instances = ledger.instances(job.id)
        live = [i for i in instances if i.ended_at is None]
        current = live[-1] if live else (instances[-1] if instances else None)
        state = job.state + (f" ({job.outcome})" if job.outcome else "")
        if job.is_open:
            state += f", followed by {job.client}" if client_alive(job, now) else ", detached"
        table.add_row(
            job.id,
            job.provider,
            escape(state),
            f"{job.last_step}/{job.total_steps or '?'}",
            escape(f"{current.gpu} {current.instance_id or ''}".strip()) if current else "-",
            f"${ledger.job_cost(job.id):.4f}",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created_at)),
            escape(job.result_path or job.error or ""),
        )
    console.print(table)


def _print_estimate_check(console: Console, ledger: Ledger, job: JobRecord) -> None:
    """The job's estimate against what it cost and, once it trained, measured (rentrain.job_phases.meter)."""
    check = job_check(ledger, job)
    runs = ledger.job_runs(job.id)
    title = f"job {job.id}: estimate against actual"
    table = Table("", "estimate", "actual", "error", title=title, header_style="bold")
    actual = money(check.actual_usd, 4)
    if check.bandwidth_usd:
        actual += f" (bandwidth {money(check.bandwidth_usd, 4)})"
    table.add_row("cost", money(check.estimated_usd), actual, percent(check.error_pct))
    measured, estimated = step_time(check.measured_seconds_per_step), step_time(check.estimated_seconds_per_step)
    table.add_row("time per step", estimated, measured, percent(check.speed_error_pct))
    console.print(table)
    if not runs:
        console.print("no measurements recorded: the job has not trained, or has not closed", highlight=False)
    else:
        run = runs[0]
        phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in sorted(run.phases.items()))
        console.print(
            Text(f"measured: {run.steps_measured} steps after warm-up on {run.gpu_count}x {run.gpu_model}; {phases}")
        )


def _report_accounts(console: Console, view: AccountsView, summary: bool) -> None:
    """What may bill: stopped instances, instances no client follows, instances no job of this ledger knows,
    and, last and loudest, providers that could not be checked. With `summary` also what answered with
    nothing and which providers have no API key."""
    now = time.time()
    for sighting in view.sightings:
        if sighting.stopped:
            console.print(f"[bold yellow]{escape(stopped_line(sighting, now))}[/]", highlight=False)
        elif sighting.job is None:
            console.print(f"[bold yellow]warning[/]: {escape(_orphan_text(sighting))}", highlight=False)
        elif not client_alive(sighting.job, now):
            console.print(f"[yellow]warning[/]: {escape(_unfollowed_text(sighting))}", highlight=False)
    for sighting in view.gone:
        job_id = sighting.record.job_id if sighting.record else "?"
        gone = f"job {job_id}: {sighting.provider} instance {sighting.instance_id} is gone, recorded as ended"
        console.print(f"[dim]{escape(gone)}[/]", highlight=False)
    if summary:
        unconfigured = [c.provider for c in view.checks.values() if not c.configured]
        if unconfigured:
            console.print(f"[dim]not configured (no API key): {', '.join(unconfigured)}[/]")
        answered = [c.provider for c in view.checks.values() if c.answered]
        if not view.sightings and not view.not_checked and answered:
            console.print(f"nothing is running on {', '.join(answered)}")
    for check in view.not_checked:
        console.print(f"[bold red]{escape(check.could_not_check())}[/]", highlight=False)


@click.command()
@click.argument("job_id")
def attach(job_id: str) -> None:
    """Follow a detached job (or one whose client died) to its end: progress, fetch, destroy.

    A closed job is never reopened, and a job whose result is already home never rents again. Refused
    while another live rentrain client follows the job."""
    console = Console()
    ledger = Ledger()
    queue = _queue(ledger, job_id)
    if queue is not None:
        attach_queue(ledger, queue, console)
        return
    job = _job(ledger, job_id)
    _refuse_closed(ledger, job)
    with _following(ledger, job.id) as lock:
        job = ledger.job(job.id)
        _refuse_closed(ledger, job)  # closed between the first look and the lock
        live = [i for i in ledger.instances(job.id) if i.ended_at is None]
        price = live[-1].usd_per_hour if live else 0.0
        started = live[-1].created_at if live else None
        with RunProgress(console, usd_per_hour=price, billing_started=started) as view:
            runner, key = _runner(ledger, job, view, console)
            lock.on_lost = detach_when_taken_over(runner)
            session = _reattach(runner, key, start_stopped=True)
            if session is None:
                if runner.provider is None:
                    raise click.ClickException(f"job {job.id}'s machine is not reachable")
                if result_home(job):
                    _close_job(ledger, job.id, "its result was home; only the teardown was left")
                    console.print(
                        f"job {job.id}'s result is home ({escape(str(job.result_path))}) "
                        "and its instance is gone: closed, nothing rented"
                    )
                    return
                resume = job.last_state_path or "the start"
                console.print(f"job {job.id}'s instance is gone; resuming from {escape(resume)} on a new one")
            else:
                endpoint = session.remote.endpoint
                console.print(f"attached to job {job.id} on {escape(endpoint.host)}:{endpoint.port}")
            news = JobNews(ledger, notifier_from((), console), plain_printer(console))
            if runner.provider is None:
                assert session is not None
                _drive(runner, console, lambda: runner.continue_on(session), news)
                return
            offers = _fresh_offers(runner)
            _drive(runner, console, lambda: runner.run(offers, session=session), news)


def _refuse_closed(ledger: Ledger, job: JobRecord) -> None:
    if job.is_open:
        return
    message = (
        f"job {job.id} is {job.state}"
        + (f" ({job.outcome})" if job.outcome else "")
        + f": attach never reopens it, and nothing was rented. Its result: {job.result_path or job.error or 'none'}"
    )
    live = ledger.instances(job.id, live_only=True)
    leftovers = [i.instance_id or "(id unknown)" for i in live if i.provider != "ssh"]
    if leftovers:
        message += f". The ledger still has instance {', '.join(leftovers)} for it: rentrain down {job.id}"
    raise click.ClickException(message)


def _fresh_offers(runner: JobRunner) -> list[Offer]:
    """Offers to resume on if the current host turns out dead."""
    assert runner.provider is not None
    return fresh_offers(runner.loaded, runner.settings, runner.provider)


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
    also = "; that client fetches every checkpoint as it lands"
    with _following(ledger, job.id, also=also), RunProgress(console) as view:
        runner, key = _runner(ledger, job, view, console)
        session = _reattach(runner, key)
        if session is None:
            raise click.ClickException(f"job {job.id}'s instance is gone; what was fetched is in {job.output_dir}")
        fetched = _fetch_everything(runner, session)
    console.print(f"{fetched} file(s) in {escape(job.output_dir)}")


def _fetch_everything(runner: JobRunner, session: Session) -> int:
    """Every file the events name, each within the job's fetch limits (FetchRefused past one)."""
    limits, budget, root = runner.fetcher.fetch_limits, runner.fetcher.fetch_budget, session.layout.output
    events = limits.events_bytes
    data = session.remote.read_from(session.layout.events, 0, max_bytes=events, size_cap=events)
    count = 0
    out = Path(runner.job.output_dir)
    for line in data.splitlines():
        try:
            event = parse_event(line)
        except ValueError:
            continue
        if isinstance(event, CheckpointEvent):
            local_path = out / Path(event.path).name
            session.remote.download(event.path, root, local_path, event.sha256, limits.lora, budget)
            count += 1
        elif isinstance(event, SampleEvent):
            local_path = out / "samples" / Path(event.path).name
            session.remote.download(event.path, root, local_path, None, limits.sample, budget)
            count += 1
        elif isinstance(event, DoneEvent):
            local_path = out / Path(event.path).name
            local = session.remote.download(event.path, root, local_path, event.sha256, limits.lora, budget)
            runner.ledger.update_job(runner.job.id, result_path=str(local), result_sha256=event.sha256)
            session.remote.run(f"touch {shlex.quote(session.layout.fetched)}", check=False)
            count += 1
    return count


@click.command()
@click.argument("job_id", required=False)
@click.option(
    "--all", "everything", is_flag=True, help="Every rentrain-labelled instance the ledger or any provider knows."
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
def down(job_id: str | None, everything: bool, yes: bool) -> None:
    """Destroy a job's instances, or (--all) every rentrain instance the ledger or any provider knows.

    Results not fetched are lost: the list says what of each job is not home before asking. Every provider
    with an API key is listed (for JOB: the job's provider, by its label); one that could not be checked is
    named ("could not check vast (...): instances there may still be billing") and makes the exit code 1,
    as does an instance that could not be destroyed. "nothing is running" is said only when every provider
    with a key answered. An instance another live rentrain client follows is named with that client; --yes
    destroys it all the same (that client then finds it gone and stops).
    """
    if bool(job_id) == everything:
        raise click.UsageError("give a JOB id or --all")
    console = Console()
    ledger = Ledger()
    queue = _queue(ledger, job_id) if job_id else None
    if job_id:
        targets = [j.id for j in ledger.queue_jobs(queue.id)] if queue else [_job(ledger, job_id).id]
        provider = queue.provider if queue else ledger.job(targets[0]).provider
        names = [provider] if registry.needs_api_key(provider) else []
        checks = _insist_on(check_accounts(names, CHECK_SECONDS), _ledger_live_providers(ledger, set(targets)))
        if queue is not None:  # first, so that its client starts nothing new while the rest is destroyed
            cancel_waiting_jobs(ledger, queue, console)
        view = survey(ledger, checks, include=lambda j: j is not None and j.id in targets)
        touched = targets
    else:
        checks = _insist_on(check_accounts(registry.API_KEY_ENV, CHECK_SECONDS), _ledger_live_providers(ledger))
        view = survey(ledger, checks)
        _remember_checks(ledger, view)
        touched = [j.id for j in ledger.jobs()]
    failures = _destroy_all(ledger, view, yes, console) if view.sightings else 0
    if not view.sightings and not view.not_checked:
        console.print("nothing is running")
    _finish_jobs(ledger, touched, console, "rentrain down")
    for check in view.not_checked:
        console.print(f"[bold red]{escape(check.could_not_check())}[/]", highlight=False)
    if failures or view.not_checked:
        sys.exit(1)


def _destroy_all(ledger: Ledger, view: AccountsView, yes: bool, console: Console) -> int:
    """List, ask, destroy; returns how many could not be destroyed."""
    now = time.time()
    for sighting in view.sightings:
        console.print(escape(_target_line(sighting, now)), highlight=False)
    question = f"Destroy {len(view.sightings)} instance(s)?"
    losing = [s for s in view.sightings if s.job is not None and not result_home(s.job)]
    if losing:
        question += f" What is not home of {len(losing)} job(s) is lost."
    if not yes and not click.confirm(question, default=False):
        raise click.Abort()
    failures = 0
    for sighting in view.sightings:
        check = view.checks.get(sighting.provider)
        api = check.api if check is not None else None
        if not _destroy_sighting(ledger, api, sighting, "rentrain down", console):
            failures += 1
    return failures


def _target_line(sighting: Sighting, now: float) -> str:
    line = f"{sighting.provider} instance {sighting.instance_id or '(id unknown)'}"
    job = sighting.job
    if job is None:
        return line + " (rentrain label, not in this ledger)"
    line += f" of job {job.id}"
    if sighting.stopped:
        assert sighting.instance is not None
        line += f", STOPPED: {storage_cost(sighting.instance)}"
    if not result_home(job):
        line += f"; not fetched: {unfetched(job)}"
    if client_alive(job, now):
        line += f"; followed by the rentrain client {job.client}, which will find it gone"
    return line


def _destroy_sighting(ledger: Ledger, api: Provider | None, sighting: Sighting, reason: str, console: Console) -> bool:
    """Destroy one instance (by its id, or by its job's label when the create never answered with one) and
    record it ended. False, with the reason printed, when that failed."""
    try:
        api = api or open_provider(sighting.provider)
        if sighting.instance_id:
            with suppress(NotFound):
                api.destroy(sighting.instance_id)
        else:
            assert sighting.job is not None
            for instance in api.list_instances(sighting.job.label):
                api.destroy(instance.id)
    except (CredentialsError, ProviderError) as exc:
        failed = f"{sighting.provider} {sighting.instance_id or ''}: {exc}"
        console.print(f"[red]{escape(failed)}[/]", highlight=False)
        return False
    record = sighting.record
    if record is not None:
        ended = {"ended_at": time.time(), "end_reason": reason}
        ledger.update_instance(record.job_id, record.offer_id, record.created_at, **ended)
    elif sighting.job is not None and sighting.instance is not None:  # a create of the job that answered late
        record_found_instance(ledger, sighting.job.id, sighting.instance, time.time(), reason, None)
    console.print(f"destroyed {sighting.provider} instance {escape(sighting.instance_id or '(found by its label)')}")
    return True


def _finish_jobs(ledger: Ledger, job_ids: list[str], console: Console, detail: str) -> None:
    """Each job left with no instance: its SSH key off the provider's account, and closed if it was open."""
    for job_id in job_ids:
        if ledger.instances(job_id, live_only=True):
            continue
        job = ledger.job(job_id)
        if job.key_may_be_on_account:
            problem = _forget_key_of(ledger, job)
            if problem:
                console.print(f"[yellow]{escape(problem)}[/]")
        if job.is_open:
            _close_job(ledger, job_id, detail)


def _forget_key_of(ledger: Ledger, job: JobRecord, quiet_without_key: bool = False) -> str | None:
    """Take the job's SSH key off its provider's account; what went wrong, if anything. Without an API key
    the removal stays pending (and, with `quiet_without_key`, unsaid)."""
    try:
        api = open_provider(job.provider)
    except CredentialsError as exc:
        if quiet_without_key and isinstance(exc, MissingApiKey):
            return None
        return f"job {job.id}'s SSH key may still be on the {job.provider} account: {exc}"
    return forget_job_key(ledger, job.id, api)


def _close_job(ledger: Ledger, job_id: str, detail: str) -> None:
    outcome = "succeeded" if result_home(ledger.job(job_id)) else "cancelled"
    try:
        ledger.transition(job_id, "closed", detail, outcome=outcome)
    except IllegalTransition:
        if ledger.job(job_id).is_open:
            raise
        # its own client closed it between our look and this move: closed is what we wanted
