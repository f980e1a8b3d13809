"""`rentrain continue JOB --epochs N` end to end: a finished job trains on, on a new rental, from its final state."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from tests.e2e.conftest import Client, events_of, write_job
from tests.sim.provider_sim import ProviderSimulator


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_continue_trains_more_epochs_from_the_final_state_and_keeps_the_first_result(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> None:
    config = write_job(tmp_path / "job", epochs=1)
    first_run = client.run("run", str(config), "--provider", "vast", "--yes")
    assert first_run.returncode == 0, first_run.stdout + first_run.stderr
    output = tmp_path / "job" / "output"
    first = output / "e2e.safetensors"
    first_sha = _sha256(first)
    earlier = client.jobs()[-1]
    assert earlier["outcome"] == "succeeded" and earlier["last_state_path"]

    result = client.run("continue", str(earlier["id"]), "--epochs", "1", "--provider", "vast", "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    continued = output / "e2e-2epochs.safetensors"
    assert continued.exists() and _sha256(first) == first_sha
    starts = [e for e in events_of(output) if e["event"] == "start"]
    assert len(starts) == 2 and int(starts[-1]["resumed_from_step"]) > 0  # type: ignore[call-overload]
    job = client.jobs()[-1]
    assert job["outcome"] == "succeeded" and job["result_sha256"] == _sha256(continued)
    with sqlite3.connect(client.ledger_path) as db:
        created = db.execute("SELECT detail FROM transitions WHERE job_id = ? LIMIT 1", (job["id"],)).fetchone()[0]
    assert created == f"continues job {earlier['id']} from {earlier['last_state_path']}"
    assert market.live_instances() == [], [i.id for i in market.live_instances()]
