"""Each queued job's share of what its rentals cost.

The ledger bills each job the instance time it held: a rental's first job from the create until it handed the
instance on, each later job from taking it over until handing it on or its destroy. The rental's setup (from
the create until the first job's trainer started: boot, packages, the base model) served every job on it, so
the share moves that setup from the first job to all of them equally. Shares add up to what was billed.
"""

from __future__ import annotations

import time
from collections import defaultdict

from rentrain.ledger import InstanceRecord, Ledger


def cost_shares(ledger: Ledger, queue_id: str, now: float | None = None) -> dict[str, float]:
    """Job id -> its share in USD, for every job of the queue (0 for one that never rented)."""
    jobs = ledger.queue_jobs(queue_id)
    shares = {job.id: ledger.job_cost(job.id, now) for job in jobs}
    rentals: dict[str, list[InstanceRecord]] = defaultdict(list)
    for job in jobs:
        for record in ledger.instances(job.id):
            if record.instance_id is not None:
                rentals[f"{record.provider}/{record.instance_id}"].append(record)
    for records in rentals.values():
        records.sort(key=lambda r: r.created_at)
        first = records[0]
        setup = _setup_cost(ledger, first, now)
        users = {r.job_id for r in records}
        shares[first.job_id] -= setup
        for job_id in users:
            shares[job_id] += setup / len(users)
    return shares


def _setup_cost(ledger: Ledger, record: InstanceRecord, now: float | None) -> float:
    """The instance time from the create until the job's trainer started on it (all of it, if it never did)."""
    end = record.ended_at if record.ended_at is not None else (time.time() if now is None else now)
    moves = ledger.transitions(record.job_id)
    started = [t.at for t in moves if t.to_state == "training" and t.at >= record.created_at]
    until = min([*started, end])
    return record.usd_per_hour * max(0.0, until - record.created_at) / 3600
