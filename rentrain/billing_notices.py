"""The start-up sweep's "still billing" notification (rentrain/commands/jobs.py): when it is due, and the memory
that sends it at most once a day per instance.

An instance is unattended from when its job was closed or, for an open job that no client follows, from when a
client last had it (`last_contact`). Its watchdog ends it within the job's idle timeout (20 minutes by default)
after the client is gone, so one still on its provider's account NOTICE_AFTER_SECONDS later is billing when it
should not be: a stopped instance bills its disk, a running one the whole machine.

The memory is a table of the ledger's SQLite file, claimed in one statement, so two rentrain commands sweeping at
the same time send one notification.
"""

from __future__ import annotations

import sqlite3
import time

from rentrain.accounts import Sighting, last_contact
from rentrain.ledger import Ledger

NOTICE_AFTER_SECONDS = 30 * 60.0
NOTICE_EVERY_SECONDS = 24 * 3600.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS billing_notices (
    provider TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    sent_at REAL NOT NULL,
    PRIMARY KEY (provider, instance_id)
)
"""


def unattended_since(ledger: Ledger, sighting: Sighting) -> float | None:
    """When the instance's job was closed or its client last had it; None for an instance not seen on its
    provider's account, gone, or of no job of this ledger."""
    job, instance = sighting.job, sighting.instance
    if job is None or instance is None or instance.status == "gone":
        return None
    if job.state == "closed":
        return max(t.at for t in ledger.transitions(job.id) if t.to_state == "closed")
    return last_contact(job, sighting.record)


def claim_notice(ledger: Ledger, provider: str, instance_id: str, now: float | None = None) -> bool:
    """Record a notice for the instance now, unless one was recorded in the last NOTICE_EVERY_SECONDS: whether
    this caller is the one to send it."""
    now = time.time() if now is None else now
    db = sqlite3.connect(ledger.path, timeout=30, isolation_level=None)
    try:
        db.execute(SCHEMA)
        claimed = db.execute(
            "INSERT INTO billing_notices VALUES (?, ?, ?) ON CONFLICT (provider, instance_id) "
            "DO UPDATE SET sent_at = excluded.sent_at WHERE sent_at <= ?",
            (provider, instance_id, now, now - NOTICE_EVERY_SECONDS),
        )
        return claimed.rowcount == 1
    finally:
        db.close()
