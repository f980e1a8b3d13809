"""The ledger counts what the provider bills: per instance, from the provider's own start time (never before the
create was sent) until it was destroyed, at its storage rate while stopped; every later look at the provider
brings the record up to date, and a change nobody saw is placed at the last time rentrain saw the instance."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from providers.base import Instance, InstanceStatus, NotFound
from rentrain.accounts import AccountCheck, reconcile, record_created, record_started, survey, watchdog_stops
from rentrain.ledger import InstanceRecord, JobRecord, Ledger

T0 = 1_800_000_000.0
PRICE = 3.6  # USD/h: $0.001 a second
STORAGE = 0.36  # USD/h while stopped: $0.0001 a second


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    for job_id in ("j1", "j2"):
        ledger.create_job(
            JobRecord(
                id=job_id,
                created_at=T0,
                config_path="/c.toml",
                provider="vast",
                label=f"rentrain-{job_id}",
                state="planned",
                output_dir="/out",
            )
        )
    return ledger


def _asked(ledger: Ledger, job_id: str = "j1", sent_at: float = T0) -> InstanceRecord:
    """A record written just before the create was sent at `sent_at`."""
    record = InstanceRecord(
        job_id=job_id, provider="vast", offer_id="o1", gpu="1x RTX 4090", usd_per_hour=PRICE, created_at=sent_at
    )
    ledger.add_instance(record)
    return record


def _instance(
    status: InstanceStatus = "running",
    made_at: float | None = None,
    storage: float | None = STORAGE,
    stop_mark: float | None = None,
):
    return Instance(
        provider="vast",
        id="i1",
        label="rentrain-j1",
        status=status,
        billed_since=None if made_at is None else datetime.fromtimestamp(made_at, tz=UTC),
        storage_usd_per_hour=storage,
        watchdog_stopped_at=None if stop_mark is None else datetime.fromtimestamp(stop_mark, tz=UTC),
    )


def _current(ledger: Ledger, job_id: str = "j1") -> InstanceRecord:
    return ledger.instances(job_id)[-1]


def _rented(ledger: Ledger, made_at: float = T0 + 2, answered_at: float = T0 + 5) -> InstanceRecord:
    return record_created(ledger, _asked(ledger), _instance(made_at=made_at), answered_at)


def _end(ledger: Ledger, record: InstanceRecord, at: float) -> None:
    ledger.update_instance(record.job_id, record.offer_id, record.created_at, ended_at=at, end_reason="destroyed")


# ---------------------------------------------------------------------------------------------- arithmetic


def test_billing_starts_at_the_providers_time_and_ends_when_the_destroy_was_answered(ledger: Ledger) -> None:
    record = _rented(ledger, made_at=T0 + 2, answered_at=T0 + 5)
    _end(ledger, record, T0 + 1002)
    assert _current(ledger).cost(now=T0 + 99_999) == pytest.approx(1000 * 0.001)


def test_without_the_providers_time_billing_starts_when_the_create_answered(ledger: Ledger) -> None:
    record = record_created(ledger, _asked(ledger), _instance(made_at=None), answered_at=T0 + 5)
    _end(ledger, record, T0 + 1005)
    assert _current(ledger).cost() == pytest.approx(1000 * 0.001)


def test_billing_never_starts_before_the_create_was_sent(ledger: Ledger) -> None:
    """A provider's clock ahead of ours must not bill time before we asked."""
    record = _rented(ledger, made_at=T0 - 30, answered_at=T0 + 5)
    assert _current(ledger).periods[0].started_at == T0
    _end(ledger, record, T0 + 1000)
    assert _current(ledger).cost() == pytest.approx(1000 * 0.001)


def test_a_later_provider_time_does_not_move_the_start(ledger: Ledger) -> None:
    record = _rented(ledger, made_at=T0 + 2, answered_at=T0 + 5)
    reconcile(ledger, record, _instance(made_at=T0 + 60), now=T0 + 100)  # a restart reset its start date
    assert _current(ledger).periods[0].started_at == T0 + 2


def test_an_open_record_counts_until_now(ledger: Ledger) -> None:
    _rented(ledger, made_at=T0, answered_at=T0 + 1)
    assert _current(ledger).cost(now=T0 + 3600) == pytest.approx(PRICE)


def test_a_stopped_instance_bills_its_storage_until_destroyed(ledger: Ledger) -> None:
    record = _rented(ledger, made_at=T0, answered_at=T0 + 1)
    ledger.bill_state(record, "stopped", T0 + 1800, STORAGE, "the watchdog's record", T0 + 1800)
    _end(ledger, record, T0 + 1800 + 7200)
    assert _current(ledger).cost() == pytest.approx(0.5 * PRICE + 2 * STORAGE)


def test_a_restarted_instance_bills_the_full_price_again_from_the_start_call(ledger: Ledger) -> None:
    record = _rented(ledger, made_at=T0, answered_at=T0 + 1)
    ledger.bill_state(record, "stopped", T0 + 1000, STORAGE, "seen stopped", T0 + 1000)
    record_started(ledger, record, T0 + 4600)
    _end(ledger, record, T0 + 5600)
    assert [p.state for p in _current(ledger).periods] == ["running", "stopped", "running"]
    assert _current(ledger).cost() == pytest.approx(1000 * 0.001 + 3600 * 0.0001 + 1000 * 0.001)


def test_a_create_that_made_no_instance_costs_nothing(ledger: Ledger) -> None:
    record = _asked(ledger)
    _end(ledger, record, T0 + 30)
    assert _current(ledger).cost(now=T0 + 86400) == 0.0


def test_a_record_from_before_billing_periods_counts_its_whole_span(ledger: Ledger) -> None:
    """An older ledger: no periods; from the create to the end, at the full price, as it was counted then."""
    old = InstanceRecord(
        job_id="j1", provider="vast", instance_id="i1", offer_id="o1", gpu="A", usd_per_hour=PRICE, created_at=T0
    )
    ledger.add_instance(old)
    _end(ledger, old, T0 + 3600)
    assert _current(ledger).periods == [] and _current(ledger).cost() == pytest.approx(PRICE)


def test_a_hand_over_splits_the_instance_between_the_jobs_and_loses_nothing(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _rented(ledger, made_at=T0, answered_at=T0 + 1)
    monkeypatch.setattr("rentrain.ledger.time.time", lambda: T0 + 600)
    second = ledger.hand_over_instance(_current(ledger), "j2", "takes it over")
    monkeypatch.undo()
    assert second.periods == _current(ledger, "j2").periods  # what it hands back is what the ledger holds
    _end(ledger, second, T0 + 1000)
    assert _current(ledger, "j1").cost(now=T0 + 5000) == pytest.approx(600 * 0.001)
    assert _current(ledger, "j2").cost(now=T0 + 5000) == pytest.approx(400 * 0.001)
    assert first.instance_id == second.instance_id


# ---------------------------------------------------------------------------------------------- reconcile


def test_a_stop_nobody_saw_is_placed_at_the_last_time_it_was_seen_running(ledger: Ledger) -> None:
    record = _rented(ledger, made_at=T0, answered_at=T0 + 1)
    ledger.saw_instance(record, "running", T0 + 1000)  # a heartbeat
    reconcile(ledger, record, _instance("stopped"), now=T0 + 5000)
    running, stopped = _current(ledger).periods
    assert (running.ended_at, stopped.started_at, stopped.usd_per_hour) == (T0 + 1000, T0 + 1000, STORAGE)
    assert _current(ledger).cost(now=T0 + 5000) == pytest.approx(1000 * 0.001 + 4000 * 0.0001)


def test_a_stop_the_following_client_finds_is_placed_when_it_found_it(ledger: Ledger) -> None:
    """It looks every few seconds, and its budget guard must never count less than the watchdog that stopped it."""
    record = _rented(ledger, made_at=T0, answered_at=T0 + 1)
    ledger.saw_instance(record, "running", T0 + 1000)
    reconcile(ledger, record, _instance("stopped"), now=T0 + 1012, following=True)
    assert _current(ledger).periods[-1].started_at == T0 + 1012


def test_a_stopped_instance_whose_storage_rate_is_not_given_counts_the_full_price(ledger: Ledger) -> None:
    record = _rented(ledger, made_at=T0, answered_at=T0 + 1)
    reconcile(ledger, record, _instance("stopped", storage=None), now=T0 + 10)
    assert _current(ledger).periods[-1].usd_per_hour == PRICE


def test_the_watchdogs_record_replaces_the_guess(ledger: Ledger) -> None:
    record = _rented(ledger, made_at=T0, answered_at=T0 + 1)
    reconcile(ledger, record, _instance("stopped"), now=T0 + 5000)  # last seen running when the create answered
    record_started(ledger, record, T0 + 6000)
    assert ledger.place_change(record, "stopped", T0 + 3000, "the watchdog's record")
    running, stopped, again = _current(ledger).periods
    assert (running.ended_at, stopped.started_at, stopped.ended_at, again.started_at) == (
        T0 + 3000,
        T0 + 3000,
        T0 + 6000,
        T0 + 6000,
    )
    assert stopped.source == "the watchdog's record"
    assert not ledger.place_change(record, "stopped", T0 + 7000, "the watchdog's record")  # no stop around then


def test_a_stop_mark_on_the_label_places_the_stop_a_later_command_finds(ledger: Ledger) -> None:
    """`down` on an instance its watchdog stopped while nobody watched: the GPU bills until the mark, not until
    the last time rentrain saw the instance running."""
    record = _rented(ledger, made_at=T0, answered_at=T0 + 1)
    ledger.saw_instance(record, "running", T0 + 1000)
    reconcile(ledger, record, _instance("stopped", made_at=T0, stop_mark=T0 + 4000), now=T0 + 5000)
    running, stopped = _current(ledger).periods
    assert (running.ended_at, stopped.started_at, stopped.usd_per_hour) == (T0 + 4000, T0 + 4000, STORAGE)
    assert stopped.source == "the stop mark on vast's label"
    assert _current(ledger).cost(now=T0 + 5000) == pytest.approx(4000 * 0.001 + 1000 * 0.0001)


def test_a_stop_mark_corrects_a_stop_an_earlier_look_placed_at_a_guess(ledger: Ledger) -> None:
    record = _rented(ledger, made_at=T0, answered_at=T0 + 1)
    reconcile(ledger, record, _instance("stopped"), now=T0 + 5000)  # an answer without the mark: the guess
    reconcile(ledger, record, _instance("stopped", made_at=T0, stop_mark=T0 + 3000), now=T0 + 6000)
    running, stopped = _current(ledger).periods
    assert (running.ended_at, stopped.started_at) == (T0 + 3000, T0 + 3000)


@pytest.mark.parametrize(
    ("mark", "why"),
    [
        (T0 - 60, "before the provider made the instance"),
        (T0 + 9000, "after now"),
    ],
)
def test_a_stop_mark_out_of_range_is_not_believed(ledger: Ledger, mark: float, why: str) -> None:
    record = _rented(ledger, made_at=T0, answered_at=T0 + 1)
    ledger.saw_instance(record, "running", T0 + 1000)
    reconcile(ledger, record, _instance("stopped", made_at=T0, stop_mark=mark), now=T0 + 5000)
    assert _current(ledger).periods[-1].started_at == T0 + 1000, why


def test_a_stop_mark_on_a_running_instance_changes_nothing(ledger: Ledger) -> None:
    """Left from an earlier stop after the instance was started again (the label keeps it)."""
    record = _rented(ledger, made_at=T0, answered_at=T0 + 1)
    reconcile(ledger, record, _instance("running", made_at=T0, stop_mark=T0 + 500), now=T0 + 5000)
    assert [p.state for p in _current(ledger).periods] == ["running"]


def test_an_instance_that_vanished_ends_at_the_last_time_it_was_seen(ledger: Ledger) -> None:
    record = _rented(ledger, made_at=T0, answered_at=T0 + 1)
    reconcile(ledger, record, _instance("running"), now=T0 + 2000)
    reconcile(ledger, record, None, now=T0 + 90_000)
    ended = _current(ledger)
    assert ended.ended_at == T0 + 2000
    assert ended.cost(now=T0 + 90_000) == pytest.approx(2000 * 0.001)


def test_seen_running_after_a_stop_it_bills_the_full_price_from_the_last_time_it_was_seen_stopped(
    ledger: Ledger,
) -> None:
    record = _rented(ledger, made_at=T0, answered_at=T0 + 1)
    reconcile(ledger, record, _instance("stopped"), now=T0 + 100)
    reconcile(ledger, record, _instance("stopped"), now=T0 + 200)
    reconcile(ledger, record, _instance("running"), now=T0 + 900)
    assert [(p.state, p.started_at) for p in _current(ledger).periods] == [
        ("running", T0),
        ("stopped", T0 + 1),
        ("running", T0 + 200),
    ]


def test_a_record_from_an_older_ledger_is_billed_from_its_create_once_seen(ledger: Ledger) -> None:
    old = InstanceRecord(
        job_id="j1", provider="vast", instance_id="i1", offer_id="o1", gpu="A", usd_per_hour=PRICE, created_at=T0
    )
    ledger.add_instance(old)
    reconcile(ledger, old, _instance("stopped", made_at=None), now=T0 + 3600)
    assert [(p.state, p.started_at) for p in _current(ledger).periods] == [("running", T0), ("stopped", T0)]


def test_the_survey_reconciles_what_a_provider_listed_and_ends_what_it_no_longer_has(ledger: Ledger) -> None:
    listed = _rented(ledger, made_at=T0, answered_at=T0 + 1)
    second = InstanceRecord(
        job_id="j2", provider="vast", offer_id="o2", gpu="A", usd_per_hour=PRICE, created_at=T0 + 10
    )
    ledger.add_instance(second)
    record_created(ledger, second, _instance(made_at=T0 + 11).model_copy(update={"id": "i2"}), T0 + 12)

    class Account:
        def get(self, instance_id: str) -> Instance:
            raise NotFound("vast", f"instance {instance_id} not found", 404)

    check = AccountCheck("vast", api=Account(), instances=[_instance("stopped")])  # type: ignore[arg-type]
    view = survey(ledger, {"vast": check})
    assert [p.state for p in _current(ledger, "j1").periods] == ["running", "stopped"]
    assert _current(ledger, "j2").ended_at == T0 + 12  # gone: billed until its create answered, the last sighting
    assert [s.instance_id for s in view.gone] == ["i2"] and listed.instance_id == "i1"


# ---------------------------------------------------------------------------------------------- the watchdog's log


def _log(*entries: dict[str, object]) -> str:
    return "\n".join(json.dumps({"event": "watchdog", **entry}) for entry in entries) + "\n"


def test_a_stop_counts_from_the_line_written_just_before_the_provider_was_called() -> None:
    log = _log(
        {"time": 10.0, "action": "started"},
        {"time": 50.0, "action": "stop_trainer", "pid": 7},
        {"time": 60.0, "action": "ending", "intent": "stop", "reason": "idle"},
        {"time": 61.0, "action": "stop", "method": "PUT", "ok": True},
    )
    assert watchdog_stops(log) == [60.0]


def test_a_stop_whose_every_call_failed_or_that_was_tried_again_did_not_stop_it() -> None:
    log = _log(
        {"time": 60.0, "action": "ending", "intent": "stop"},
        {"time": 61.0, "action": "stop", "method": "PUT", "ok": False},
        {"time": 62.0, "action": "stop", "method": "cli", "ok": False},
        {"time": 90.0, "action": "ending", "intent": "stop"},  # the call said yes, the instance ran on
        {"time": 91.0, "action": "stop", "method": "PUT", "ok": True},
        {"time": 400.0, "action": "ending", "intent": "stop"},
    )
    assert watchdog_stops("{a line cut short\n" + log) == [400.0]


def test_each_stop_before_a_restart_counts_and_destroys_do_not() -> None:
    log = _log(
        {"time": 60.0, "action": "ending", "intent": "stop"},
        {"time": 500.0, "action": "started"},  # a new watchdog after rentrain started the instance again
        {"time": 900.0, "action": "ending", "intent": "stop"},
        {"time": 1500.0, "action": "started"},
        {"time": 2000.0, "action": "ending", "intent": "destroy"},
    )
    assert watchdog_stops(log) == [60.0, 900.0]
