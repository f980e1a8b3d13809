"""What the provider accounts hold, seen against the ledger: every `rentrain-` labelled instance, whose job
it is, whether it is stopped (its disk bills on) and what of the job is not home yet; and, loudly, every
provider that could not be checked.

A provider with an API key that did not answer a list in time (an HTTP error, a retired endpoint, a
timeout) is "could not check": instances there may still be billing, and `status` and `down` exit non-zero.
A provider without a key is "not configured", and quiet. "Nothing is running" is said only when every
provider with a key answered.

Stopped instances: the instance's watchdog STOPS an idle instance whose results were not fetched, and a
stopped disk bills with no end. Vast bills storage in every state but offline, at the host's own rate
(`storage_cost`, $/GB/month, on each offer): at $0.15/GB/month, 40 GB is 40 x 0.15 / 730 = $0.0082/h,
$1.38 a week. RunPod bills a stopped volume $0.20/GB/month: 40 GB is $0.011/h, $1.84 a week. A week of
that is about what a whole LoRA job costs, so STOPPED_LIMIT_SECONDS is 7 days without a client: past it,
the next rentrain command (the sweep in rentrain/commands/jobs.py) fetches what is on the instance and
destroys it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from providers.base import Instance, NotFound, Provider, ProviderError
from rentrain.credentials import CredentialsError, MissingApiKey, open_provider
from rentrain.ledger import InstanceRecord, JobRecord, Ledger

CHECK_SECONDS = 60.0  # `status` and `down`: a provider that has not answered its list by then is not checked
SWEEP_SECONDS = 8.0  # the start-up sweep before other commands: all providers at once, in parallel
ORPHAN_CHECK_EVERY_SECONDS = 24 * 3600.0  # the sweep lists a provider with a key at least this often
STOPPED_LIMIT_SECONDS = 7 * 24 * 3600.0  # a stopped instance without a client this long is fetched and destroyed
HOURS_PER_WEEK = 168
GONE_REASON = "gone when rentrain looked (ended by its watchdog or the provider)"

Opener = Callable[[str], Provider]


@dataclass
class AccountCheck:
    """One provider's answer: its rentrain instances, or why there is none."""

    provider: str
    api: Provider | None = None
    instances: list[Instance] | None = None  # None: not listed
    problem: str | None = None  # why it could not be checked; None with no instances: not configured

    @property
    def answered(self) -> bool:
        return self.instances is not None

    @property
    def configured(self) -> bool:
        return self.answered or self.problem is not None

    def could_not_check(self) -> str:
        return f"could not check {self.provider} ({self.problem}): instances there may still be billing"


def describe(exc: ProviderError) -> str:
    """ "HTTP 410: <the provider's words>", or the error's own sentence where it has one (a rejected key)."""
    if exc.status is None:
        return exc.message
    text = str(exc)
    plain = f"{exc.provider} (HTTP {exc.status}): "
    return f"HTTP {exc.status}: {exc.message}" if text.startswith(plain) else text


def check_accounts(names: Iterable[str], seconds: float, opener: Opener = open_provider) -> dict[str, AccountCheck]:
    """List every provider in `names` at once; one that has not answered within `seconds` is reported as not
    checked (its request goes on in a daemon thread that nobody waits for)."""
    results: dict[str, AccountCheck] = {}
    guard = threading.Lock()

    def check(name: str) -> None:
        outcome = _check_one(name, opener)
        with guard:
            results[name] = outcome

    threads = {name: threading.Thread(target=check, args=(name,), daemon=True) for name in dict.fromkeys(names)}
    for thread in threads.values():
        thread.start()
    deadline = time.monotonic() + seconds
    for thread in threads.values():
        thread.join(max(0.0, deadline - time.monotonic()))
    with guard:
        return {
            name: results.get(name) or AccountCheck(name, problem=f"no answer within {seconds:g} s") for name in threads
        }


def _check_one(name: str, opener: Opener) -> AccountCheck:
    try:
        api = opener(name)
    except MissingApiKey:
        return AccountCheck(name)
    except CredentialsError as exc:
        return AccountCheck(name, problem=str(exc))
    try:
        return AccountCheck(name, api=api, instances=api.list_instances())
    except ProviderError as exc:
        return AccountCheck(name, api=api, problem=describe(exc))
    except Exception as exc:
        return AccountCheck(name, api=api, problem=f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------- sightings


@dataclass
class Sighting:
    """A rentrain instance that may bill: seen on its provider's account, or only known to the ledger."""

    provider: str
    instance_id: str | None
    job: JobRecord | None = None
    record: InstanceRecord | None = None
    instance: Instance | None = None  # None: the provider was not asked, or did not answer

    @property
    def stopped(self) -> bool:
        return self.instance is not None and self.instance.status == "stopped"


@dataclass
class AccountsView:
    checks: dict[str, AccountCheck]
    sightings: list[Sighting] = field(default_factory=list)
    gone: list[Sighting] = field(default_factory=list)  # live in the ledger, confirmed gone: now recorded ended

    @property
    def not_checked(self) -> list[AccountCheck]:
        return [c for c in self.checks.values() if c.configured and not c.answered]

    @property
    def orphans(self) -> list[Sighting]:
        return [s for s in self.sightings if s.job is None]


def survey(
    ledger: Ledger | None,
    checks: dict[str, AccountCheck],
    include: Callable[[JobRecord | None], bool] = lambda _job: True,
) -> AccountsView:
    """Match what the providers listed with the ledger, keeping the instances whose job (None: no job of this
    ledger) `include` accepts. A ledger instance that a provider which answered did not list is asked for once
    more and, when that confirms it is gone (its watchdog or the provider ended it), recorded as ended now:
    the ledger's cost stays an upper bound, and nobody is warned about it again."""
    view = AccountsView(checks)
    jobs = {j.id: j for j in (ledger.jobs() if ledger else [])}
    records = [r for r in (ledger.instances() if ledger else []) if r.provider != "ssh" and include(jobs.get(r.job_id))]
    by_id = {(r.provider, r.instance_id): r for r in records if r.instance_id}
    by_label = {j.label: j for j in jobs.values()}
    listed: set[tuple[str, str]] = set()
    for check in checks.values():
        for instance in check.instances or []:
            record = by_id.get((check.provider, instance.id))
            job = jobs.get(record.job_id) if record else by_label.get(instance.label or "")
            if not include(job):
                continue
            listed.add((check.provider, instance.id))
            view.sightings.append(Sighting(check.provider, instance.id, job, record, instance))
    for record in records:
        if record.ended_at is not None or (record.provider, record.instance_id) in listed:
            continue
        sighting = Sighting(record.provider, record.instance_id, jobs.get(record.job_id), record)
        account = checks.get(record.provider)
        if account is not None and account.answered and record.instance_id and account.api is not None:
            gone, sighting.instance = _look_again(account.api, record.instance_id)
            if gone:
                assert ledger is not None
                ledger.update_instance(
                    record.job_id, record.offer_id, record.created_at, ended_at=time.time(), end_reason=GONE_REASON
                )
                view.gone.append(sighting)
                continue
        view.sightings.append(sighting)
    return view


def _look_again(api: Provider, instance_id: str) -> tuple[bool, Instance | None]:
    """(True, None) when the provider confirms the instance no longer exists; else (False, what it said,
    None if it could not say). A provider error is no confirmation."""
    try:
        instance = api.get(instance_id)
    except NotFound:
        return True, None
    except ProviderError:
        return False, None
    return instance.status == "gone", instance


# ---------------------------------------------------------------------------------------------- stopped


def result_home(job: JobRecord) -> bool:
    return bool(job.result_path) and Path(job.result_path or "").exists()


def unfetched(job: JobRecord | None) -> str:
    """What of the job is not home, as far as the ledger knows."""
    if job is None:
        return "unknown (not a job of this ledger)"
    if result_home(job):
        return f"nothing: the result is home ({job.result_path})"
    step = f"training had reached step {job.last_step} of {job.total_steps or '?'}"
    return f"the final LoRA ({step}); the checkpoints fetched so far are in {job.output_dir}"


def last_contact(job: JobRecord, record: InstanceRecord | None) -> float:
    """When a rentrain client last had the instance running: it cannot have been stopped before that."""
    times = [job.client_seen_at, job.created_at]
    if record is not None:
        times += [record.running_at, record.created_at]
    return max(t for t in times if t is not None)


def past_stopped_limit(sighting: Sighting, now: float | None = None) -> bool:
    if not sighting.stopped or sighting.job is None:
        return False
    return (time.time() if now is None else now) - last_contact(sighting.job, sighting.record) > STOPPED_LIMIT_SECONDS


def storage_cost(instance: Instance) -> str:
    rate = instance.storage_usd_per_hour
    if rate is None:
        return f"its storage bills at a rate {instance.provider} does not report"
    return f"its storage bills ${rate:.4f}/h (${rate * HOURS_PER_WEEK:.2f} a week)"


def stopped_line(sighting: Sighting, now: float | None = None) -> str:
    """The loud line for one stopped instance: what it costs, what is on it, what to do."""
    assert sighting.instance is not None
    instance = sighting.instance
    job = sighting.job
    whose = f"job {job.id}" if job else f"{instance.label}, not in this ledger"
    line = (
        f"STOPPED: {instance.provider} instance {instance.id} ({whose}): {storage_cost(instance)}; "
        f"not fetched: {unfetched(job)}."
    )
    if job is None:
        return line + " `rentrain down --all` destroys it."
    idle_days = ((time.time() if now is None else now) - last_contact(job, sighting.record)) / 86400
    limit_days = STOPPED_LIMIT_SECONDS / 86400
    if result_home(job):
        action = f"`rentrain down {job.id}` destroys it"
    else:
        action = f"`rentrain attach {job.id}` starts it, fetches and destroys it"
    return (
        line + f" No client for {idle_days:.1f} days; {action}, and past {limit_days:.0f} days the next rentrain "
        "command (other than status, down and attach) does that itself."
    )
