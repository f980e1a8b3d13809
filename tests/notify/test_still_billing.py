"""The start-up sweep notifies credentials.toml's notify URLs of an instance still billing after its job ended or
its client was last seen: once a day per instance, never for one that is young, and a failing URL only told."""

from __future__ import annotations

import io
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from providers import registry
from rentrain.billing_notices import NOTICE_AFTER_SECONDS, NOTICE_EVERY_SECONDS, claim_notice
from rentrain.commands.jobs import sweep
from rentrain.ledger import Ledger
from tests.jobs.test_sweep import DAY, FakeProvider, _add_job
from tests.notify.conftest import Webhook, closed_port, write_credentials

HOURS_2 = 2 / 24


@pytest.fixture
def vast(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProvider]:
    """Vast faked, with an API key; RunPod has none (not configured, quiet)."""
    fake = FakeProvider("vast")
    monkeypatch.setitem(registry._FACTORIES, "vast", lambda **_kwargs: fake)
    monkeypatch.setenv("VAST_API_KEY", "vast-test-key")
    yield fake


def _sweep() -> str:
    buffer = io.StringIO()
    sweep(Console(file=buffer, width=400))
    return buffer.getvalue()


def test_an_instance_billing_without_its_client_is_notified_once(
    tmp_path: Path, vast: FakeProvider, webhook: Webhook
) -> None:
    write_credentials(f'notify = ["{webhook.url()}"]\n')
    ledger = Ledger()
    _add_job(ledger, tmp_path, "j-left", idle_days=HOURS_2)  # its client died two hours ago
    vast.add("11", "rentrain-j-left")
    _add_job(ledger, tmp_path, "j-young", instance_id="12", idle_days=NOTICE_AFTER_SECONDS / DAY / 2)
    vast.add("12", "rentrain-j-young")

    out = _sweep()
    assert "job j-left: instance 11 on vast" in out  # the sweep's own warning, as before
    [(_path, payload)] = webhook.posts
    assert payload["title"] == "rentrain: vast instance 11 is still billing"
    assert payload["message"].startswith("120 minutes after a rentrain client last had it: job j-left: instance 11")
    assert "rentrain attach j-left  or  rentrain down j-left" in payload["message"]
    assert payload["type"] == "warning"

    _sweep()
    assert len(webhook.posts) == 1  # once a day per instance


def test_an_instance_still_listed_after_its_job_was_closed_is_notified(
    tmp_path: Path, vast: FakeProvider, webhook: Webhook
) -> None:
    write_credentials(f'notify = ["{webhook.url()}"]\n')
    ledger = Ledger()
    job = _add_job(ledger, tmp_path, "j-closed", result_home=True, idle_days=1)
    ledger.update_instance(job.id, "o1", job.created_at, ended_at=time.time(), end_reason="destroyed")
    ledger.transition(job.id, "closed", outcome="succeeded")
    with sqlite3.connect(ledger.path) as db:  # closed an hour ago
        db.execute("UPDATE transitions SET at = ? WHERE job_id = ?", (time.time() - 3600, job.id))
    vast.add("11", "rentrain-j-closed", status="stopped", storage=0.011)  # the destroy did not take
    _sweep()  # the daily look at the account finds it
    [(_path, payload)] = webhook.posts
    assert payload["message"].startswith("60 minutes after its job ended: STOPPED: vast instance 11 (job j-closed)")


def test_a_failing_notify_url_is_told_without_the_url(tmp_path: Path, vast: FakeProvider) -> None:
    write_credentials(f'notify = ["json://user:s3cr3t@127.0.0.1:{closed_port()}/private-path"]\n')
    _add_job(Ledger(), tmp_path, "j-left", idle_days=HOURS_2)
    vast.add("11", "rentrain-j-left")
    out = _sweep()
    assert "a notification through json (notify #1 in " in out and "credentials.toml) was not delivered" in out
    assert "s3cr3t" not in out and "private-path" not in out


def test_without_notify_urls_the_sweep_only_prints(tmp_path: Path, vast: FakeProvider) -> None:
    ledger = Ledger()
    _add_job(ledger, tmp_path, "j-left", idle_days=HOURS_2)
    vast.add("11", "rentrain-j-left")
    assert "no rentrain client follows it" in _sweep()
    assert claim_notice(ledger, "vast", "11")  # nothing was claimed: a notify URL added later is used


def test_a_notice_is_claimed_once_a_day(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    now = time.time()
    assert claim_notice(ledger, "vast", "11", now)
    assert not claim_notice(ledger, "vast", "11", now + NOTICE_EVERY_SECONDS - 60)
    assert claim_notice(ledger, "runpod", "11", now)
    assert claim_notice(ledger, "vast", "11", now + NOTICE_EVERY_SECONDS)
