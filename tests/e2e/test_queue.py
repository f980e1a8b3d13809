"""`rentrain run A B C --provider vast`: a queue on one rental, end to end against the simulator."""

from __future__ import annotations

import itertools
import json
import signal
import sqlite3
from pathlib import Path

from tests.e2e.conftest import Client, started_market, write_job
from tests.sim.provider_sim import ProviderSimulator, SimOffer, wait_until
from tests.tiny_models import save_tiny_sd15_folder
from tests.webhook import Webhook, closed_port, webhook

__all__ = ["webhook"]  # a fixture


def _queue_jobs(client: Client) -> list[dict[str, object]]:
    with sqlite3.connect(client.ledger_path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM jobs WHERE queue_id IS NOT NULL ORDER BY queue_position")]


def _assert_nothing_billing(market: ProviderSimulator, client: Client) -> None:
    assert market.live_instances() == [], [i.id for i in market.live_instances()]
    price = max(i.price_per_hour for i in market.instances.values())
    assert abs(client.ledger_cost() - market.total_billed()) <= price / 3600


def test_three_jobs_run_in_turn_on_one_rental(
    tmp_path: Path, market: ProviderSimulator, client: Client, webhook: Webhook
) -> None:
    configs = [write_job(tmp_path / name, epochs=1) for name in ("a", "b", "c")]
    broken = f"json://127.0.0.1:{closed_port()}/secret-token"
    notify = ["--notify", webhook.url(), "--notify", broken]
    result = client.run("run", *map(str, configs), "--provider", "vast", "--yes", *notify, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [body["title"] for _path, body in webhook.posts] == [
        f"rentrain: {name}/config.toml is done" for name in ("a", "b", "c")
    ]
    assert all(body["attachments"] for _path, body in webhook.posts), "each job's sample grid goes with it"
    assert result.stdout.count("json (--notify #2)") == 1, "a failing notifier is told once"
    assert "secret-token" not in result.stdout + result.stderr
    assert (tmp_path / "a" / "output" / "report.html").exists()
    assert "queue report: " in result.stdout
    assert "rental 1:" in result.stdout and "3 job(s) in turn" in result.stdout
    assert len(market.instances) == 1, "the three jobs shared one rental"
    for name in ("a", "b", "c"):
        assert (tmp_path / name / "output" / "e2e.safetensors").exists()
    jobs = _queue_jobs(client)
    assert [j["outcome"] for j in jobs] == ["succeeded"] * 3
    records = client.instances()
    assert len({r["instance_id"] for r in records}) == 1
    assert [r["job_id"] for r in records] == [j["id"] for j in jobs], "one instance record per job, in turn"
    for earlier, later in itertools.pairwise(records):
        assert earlier["ended_at"] == later["created_at"], "each job is billed until the next takes over"
    _assert_nothing_billing(market, client)


def _jobs_or_none(client: Client) -> list[dict[str, object]]:
    try:
        return _queue_jobs(client)
    except sqlite3.OperationalError:  # the client is still creating the ledger
        return []


def _state_of(client: Client, position: int) -> dict[str, object]:
    jobs = _jobs_or_none(client)
    return jobs[position] if len(jobs) > position else {}


def _queue_id(client: Client) -> str:
    with sqlite3.connect(client.ledger_path) as db:
        return str(db.execute("SELECT id FROM queues").fetchone()[0])


def test_kill_9_mid_queue_then_attach_finishes_the_queue(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> None:
    configs = [write_job(tmp_path / name, images=8, repeats=5, epochs=2) for name in ("a", "b", "c")]  # 40 steps
    process = client.start("run", *map(str, configs), "--provider", "vast", "--yes")
    assert wait_until(lambda: int(_state_of(client, 1).get("last_step") or 0) >= 2, timeout=180)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(market.live_instances()) == 1  # job b trains on, without a client; job c waits
    assert _state_of(client, 2)["state"] == "planned"
    attached = client.run("attach", _queue_id(client), timeout=400)
    assert attached.returncode == 0, attached.stdout + attached.stderr
    assert [j["outcome"] for j in _queue_jobs(client)] == ["succeeded"] * 3
    for name in ("a", "b", "c"):
        assert (tmp_path / name / "output" / "e2e.safetensors").exists()
    assert len(market.instances) == 1, "job c ran on the rental job b left, after the attach"
    _assert_nothing_billing(market, client)


def test_host_death_mid_queue_moves_the_rest_to_the_next_offer(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> None:
    configs = [write_job(tmp_path / name, images=8, repeats=5, epochs=3) for name in ("a", "b", "c")]  # 60 steps
    process = client.start("run", *map(str, configs), "--provider", "vast", "--yes")
    assert wait_until(lambda: bool(_state_of(client, 1).get("last_state_path")), timeout=180)
    first = market.live_instances()[0]
    market.kill_host(first.id)
    out, _ = process.communicate(timeout=400)
    assert process.returncode == 0, out
    assert "host lost" in out
    jobs = _queue_jobs(client)
    assert [j["outcome"] for j in jobs] == ["succeeded"] * 3
    b_events = [json.loads(line) for line in (tmp_path / "b" / "output" / "events.jsonl").read_text().splitlines()]
    assert [e for e in b_events if e["event"] == "start"][-1]["resumed_from_step"] > 0
    c_instances = {r["instance_id"] for r in client.instances() if r["job_id"] == jobs[2]["id"]}
    assert len(market.instances) == 2 and first.id not in c_instances, "job c went on where job b resumed"
    _assert_nothing_billing(market, client)


def test_a_budget_reached_mid_queue_stops_the_job_and_skips_the_rest(
    tmp_path: Path, client: Client, webhook: Webhook
) -> None:
    # a GPU with no speed figure gives an SD 1.5 model no estimate, so only the meter stops the queue ($1 a second)
    market = started_market(tmp_path / "market", [SimOffer("vast", "9001", "Quadro RTX 8000", 3600.0, vram_gb=48)])
    try:
        client.env["RENTRAIN_VAST_URL"] = market.vast_url
        model = save_tiny_sd15_folder(tmp_path / "tiny-model")
        configs = [write_job(tmp_path / "a", epochs=1), write_job(tmp_path / "b", images=8, epochs=200)]
        configs.append(write_job(tmp_path / "c", epochs=1))
        for config in configs:
            config.write_text(config.read_text().replace('"builtin:tiny-sd15"', json.dumps(str(model))))
        budget = ["--max-cost", "30", "--notify", webhook.url()]
        result = client.run("run", *map(str, configs), "--provider", "vast", "--yes", *budget, timeout=400)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "total: unknown (no speed figure for Quadro RTX 8000)" in result.stdout
        a, b, c = _queue_jobs(client)
        assert a["outcome"] == "succeeded"
        assert b["outcome"] == "failed" and "budget reached" in str(b["error"])
        assert c["outcome"] == "skipped" and str(c["error"]).startswith("skipped: budget reached")
        assert list((tmp_path / "b" / "output").glob("e2e-*.safetensors")), "b's checkpoints so far came home"
        titles = [body["title"] for _path, body in webhook.posts]
        assert titles[0] == "rentrain: a/config.toml is done" and "rentrain: b/config.toml failed" in titles
        stops = [body["message"] for _path, body in webhook.posts if str(body["title"]).endswith("stopped")]
        assert len(stops) == 1 and stops[0].startswith("budget reached") and "1 job(s) not started" in stops[0]
        assert market.live_instances() == []
        # what the provider billed stays within a few seconds' price of the budget; the ledger's figure (it counts
        # the instance its watchdog stopped at full price until the client found it stopped) is an upper bound of it
        assert market.total_billed() <= 30 + 3 * 1.0
        assert client.ledger_cost() >= market.total_billed() - 1.0
    finally:
        market.shutdown()


def test_failing_jobs_do_not_stop_the_others(tmp_path: Path, market: ProviderSimulator, client: Client) -> None:
    """A model that cannot be downloaded, and a training that diverges (its learning rate far too high): each
    job fails with its reason, and the rental goes on to the next job (neither is the host's fault)."""
    broken = write_job(tmp_path / "broken", epochs=1)
    text = broken.read_text().replace('"builtin:tiny-sd15"', '"https://127.0.0.1:9/no-such-model.safetensors"')
    broken.write_text(text)
    diverging = write_job(tmp_path / "diverging", epochs=4)
    diverging.write_text(diverging.read_text().replace("learning_rate = 1e-3", "learning_rate = 10"))
    configs = [broken, diverging, write_job(tmp_path / "a", epochs=1)]
    result = client.run("run", *map(str, configs), "--provider", "vast", "--yes", timeout=400)
    assert result.returncode == 1, result.stdout + result.stderr
    jobs = _queue_jobs(client)
    outcomes = {Path(str(j["config_path"])).parent.name: j["outcome"] for j in jobs}
    assert outcomes == {"broken": "failed", "diverging": "failed", "a": "succeeded"}
    assert "downloading the base model on the instance failed" in result.stdout
    diverged = next(j for j in jobs if Path(str(j["config_path"])).parent.name == "diverging")
    assert "training diverged" in str(diverged["error"]) and "Lower the learning rate" in str(diverged["error"])
    with sqlite3.connect(client.ledger_path) as db:
        rental = dict(db.execute("SELECT job_id, instance_id FROM instances").fetchall())
    assert rental[diverged["id"]] == rental[jobs[-1]["id"]]  # the rental went on to the next job
    _assert_nothing_billing(market, client)


def test_parallel_spreads_the_queue_over_two_rentals(tmp_path: Path, market: ProviderSimulator, client: Client) -> None:
    configs = [write_job(tmp_path / name, epochs=1) for name in ("a", "b", "c", "d")]
    result = client.run("run", *map(str, configs), "--provider", "vast", "--yes", "--parallel", "2", timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rental 2:" in result.stdout
    assert [j["outcome"] for j in _queue_jobs(client)] == ["succeeded"] * 4
    spans = [(i.created_at, i.ended_at) for i in market.instances.values()]
    assert len(spans) == 2
    (start_1, end_1), (start_2, end_2) = spans
    assert end_1 is not None and end_2 is not None
    assert start_2 < end_1 and start_1 < end_2, "the two rentals ran at the same time"
    _assert_nothing_billing(market, client)


def test_down_queue_ends_the_running_job_and_cancels_the_rest(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> None:
    configs = [write_job(tmp_path / name, images=8, repeats=10, epochs=3) for name in ("a", "b")]
    process = client.start("run", *map(str, configs), "--provider", "vast", "--yes")
    assert wait_until(lambda: int(_state_of(client, 0).get("last_step") or 0) >= 2, timeout=180)
    down = client.run("down", _queue_id(client), "--yes")
    assert down.returncode == 0, down.stdout + down.stderr
    process.communicate(timeout=120)
    assert market.live_instances() == []
    a, b = _queue_jobs(client)
    assert a["state"] == "closed" and b["outcome"] == "cancelled"
    status = client.run("status")
    assert "queue q-" in status.stdout and "2 jobs (2 cancelled)" in status.stdout, status.stdout[-600:]
