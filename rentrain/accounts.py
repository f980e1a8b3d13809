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

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from providers.base import Instance, NotFound, Provider, ProviderError
from rentrain.credentials import CredentialsError, MissingApiKey, open_provider
from rentrain.ledger import BillingPeriod, BillingState, InstanceRecord, JobRecord, Ledger, client_alive

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
    ledger) `include` accepts; each live record's billing is brought up to what its provider says (`reconcile`).
    A ledger instance that a provider which answered did not list is asked for once more and, when that confirms
    it is gone (its watchdog or the provider ended it), recorded as ended (`reconcile` says when), and nobody is
    warned about it again."""
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
            if ledger is not None and record is not None:
                record = reconcile(ledger, record, instance, following=_followed(job))
            view.sightings.append(Sighting(check.provider, instance.id, job, record, instance))
    for record in records:
        if record.ended_at is not None or (record.provider, record.instance_id) in listed:
            continue
        sighting = Sighting(record.provider, record.instance_id, jobs.get(record.job_id), record)
        account = checks.get(record.provider)
        if account is not None and account.answered and record.instance_id and account.api is not None:
            assert ledger is not None
            gone, sighting.instance = _look_again(account.api, record.instance_id)
            if gone or sighting.instance is not None:
                sighting.record = reconcile(ledger, record, sighting.instance, following=_followed(sighting.job))
            if gone:
                view.gone.append(sighting)
                continue
        view.sightings.append(sighting)
    return view


def _followed(job: JobRecord | None) -> bool:
    """A live client follows the job: it would find a change within seconds, so one found now is placed now."""
    return job is not None and client_alive(job)


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


# ---------------------------------------------------------------------------------------------- billing
#
# What the ledger counts (docs/costs.md, "What the ledger counts"): per instance, from when the provider made it
# (its own start time, else when the create answered; never before the create was sent) until it was destroyed
# or vanished; at its price, and at its storage rate while stopped. A change nobody saw happen (a stop, a destroy,
# a start by someone else) is placed when the client following the job found it, or, found by a later command,
# at the last time rentrain saw the instance as it was; the watchdog's own record of a stop replaces that guess
# once rentrain can read it: the stop mark it put on the instance's label (Vast), seen on any later look at the
# stopped instance, or its log on the instance, read once the instance runs again.


def record_created(ledger: Ledger, record: InstanceRecord, instance: Instance, answered_at: float) -> InstanceRecord:
    """The create answered with `instance`: the record gets its id, and billing starts at the provider's own start
    time where the answer has one, else when the answer came (a later answer with that time moves it back)."""
    ledger.update_instance(record.job_id, record.offer_id, record.created_at, instance_id=instance.id)
    record = record.model_copy(update={"instance_id": instance.id})
    ledger.start_billing(record, answered_at, "the create's answer")
    if instance.billed_since is not None:
        ledger.start_billing(record, instance.billed_since.timestamp(), f"{record.provider}'s start time")
    return _reread(ledger, record)


def reconcile(
    ledger: Ledger,
    record: InstanceRecord,
    instance: Instance | None,
    now: float | None = None,
    following: bool = False,
) -> InstanceRecord:
    """Bring a live record's billing up to what the provider says of its instance (None: it no longer exists);
    returns the record as the ledger has it now. Running, provisioning and exited bill the full price, stopped
    its storage; gone ends the record. A change found is placed at the last time rentrain saw the instance as it
    was; `following`: the client that follows the job found it, and places it now (it looks every few seconds,
    and its budget guard must never count less than the instance's watchdog, which may have made the change).
    A stopped instance whose label carries its watchdog's stop mark is stopped from the mark's time."""
    record = _reread(ledger, record)
    if record.instance_id is None or record.ended_at is not None:
        return record
    now = time.time() if now is None else now
    if instance is not None and instance.billed_since is not None:
        ledger.start_billing(record, instance.billed_since.timestamp(), f"{record.provider}'s start time")
    elif not record.periods:  # written by an older rentrain: billed from the create, as it counted then
        ledger.start_billing(record, record.created_at, "the create")
    current = _current_period(ledger, record)
    if current is None:
        return record
    changed_at = now if following else current.seen_at
    if instance is None or instance.status == "gone":
        ended = {"ended_at": changed_at, "end_reason": GONE_REASON}
        ledger.update_instance(record.job_id, record.offer_id, record.created_at, **ended)
    else:
        state: BillingState = "stopped" if instance.status == "stopped" else "running"
        rate = _storage_rate(record, instance) if state == "stopped" else record.usd_per_hour
        seen = "when its client looked" if following else f"after rentrain last saw it {current.state}"
        source = f"{instance.provider_status or instance.status} {seen}"
        ledger.bill_state(record, state, changed_at, rate, source, now)
        ledger.saw_instance(record, state, now)
        stopped_at = _watchdog_stop_time(instance, record, now) if state == "stopped" else None
        if stopped_at is not None:
            ledger.place_change(record, "stopped", stopped_at, f"the stop mark on {record.provider}'s label")
    return _reread(ledger, record)


def _watchdog_stop_time(instance: Instance, record: InstanceRecord, now: float) -> float | None:
    """When the instance's watchdog stopped it, by the stop mark on its label: provider text, so only a time
    between when the instance was made (by the provider's answer, never before the create was sent) and now."""
    if instance.watchdog_stopped_at is None:
        return None
    at = instance.watchdog_stopped_at.timestamp()
    made = max(record.created_at, instance.billed_since.timestamp() if instance.billed_since else record.created_at)
    return at if made <= at <= now else None


def record_started(ledger: Ledger, record: InstanceRecord, at: float) -> None:
    """rentrain asked the provider at `at` to start the stopped instance again: full price from then."""
    ledger.bill_state(record, "running", at, record.usd_per_hour, "started again by rentrain", at)


def record_found_instance(
    ledger: Ledger, job_id: str, instance: Instance, destroyed_at: float, reason: str, record: InstanceRecord | None
) -> bool:
    """An instance with the job's label that no record of it knew (a create that failed on the wire, or answered
    after its window), destroyed at `destroyed_at`: billed on `record` (the create that made it), else on the
    job's latest record of a create that never answered with an id. False when the job has no such record."""
    if record is None:
        unanswered = [r for r in ledger.instances(job_id) if r.instance_id is None and r.provider == instance.provider]
        if not unanswered:
            return False
        record = unanswered[-1]
    ledger.update_instance(record.job_id, record.offer_id, record.created_at, instance_id=instance.id)
    record = record.model_copy(update={"instance_id": instance.id})
    made = instance.billed_since.timestamp() if instance.billed_since is not None else record.created_at
    ledger.start_billing(record, made, f"{record.provider}'s start time" if instance.billed_since else "the create")
    ledger.update_instance(record.job_id, record.offer_id, record.created_at, ended_at=destroyed_at, end_reason=reason)
    return True


def watchdog_stops(log: str) -> list[float]:
    """When the instance's watchdog stopped it, from its decisions (remote/watchdog.py appends them to
    JOB_DIR/watchdog.jsonl): each round that began with `ending` intent `stop` at that time (it is written just
    before the provider is called, and a stop may end the watchdog before it writes more), unless the round's last
    resort failed or the same watchdog tried again later (the instance was still up)."""
    entries = []
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("time"), (int, float)):
            entries.append(entry)
    stops: list[float] = []
    for index, entry in enumerate(entries):
        if entry.get("action") != "ending" or entry.get("intent") != "stop":
            continue
        rest = entries[index + 1 :]
        end = next((i for i, later in enumerate(rest) if later.get("action") in ("ending", "started")), len(rest))
        tried_again = end < len(rest) and rest[end].get("action") == "ending"
        failed = any(later.get("method") == "cli" and later.get("ok") is False for later in rest[:end])
        if not (tried_again or failed):
            stops.append(float(entry["time"]))
    return stops


def _current_period(ledger: Ledger, record: InstanceRecord) -> BillingPeriod | None:
    periods = _reread(ledger, record).periods
    return periods[-1] if periods and periods[-1].ended_at is None else None


def _reread(ledger: Ledger, record: InstanceRecord) -> InstanceRecord:
    key = (record.offer_id, record.created_at)
    return next((r for r in ledger.instances(record.job_id) if (r.offer_id, r.created_at) == key), record)


def _storage_rate(record: InstanceRecord, instance: Instance) -> float:
    """What the stopped instance bills per hour; the full price where the provider does not say (an upper bound)."""
    rate = instance.storage_usd_per_hour
    return record.usd_per_hour if rate is None else rate


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
