"""The remote watchdog: deadline, budget and idle paths, stop-vs-destroy, fallbacks, no secret written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from remote.watchdog import FETCHED, HEARTBEAT, LOG, TRAINER_PID, Watchdog
from rentrain.remote_job import RemoteLayout, watchdog_command


class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail_first = 0


@pytest.fixture
def api() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode() if length else None
            recorder.calls.append(
                {"method": self.command, "path": self.path, "auth": self.headers.get("Authorization"), "body": body}
            )
            status = 500 if recorder.fail_first > 0 else 200
            recorder.fail_first -= 1
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_DELETE = do_PUT = do_POST = _handle

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", recorder
    server.shutdown()


def _recipe(base: str) -> dict[str, Any]:
    url = f"{base}/instances/$CONTAINER_ID/"
    auth = {"Authorization": "Bearer $CONTAINER_API_KEY"}
    return {
        "provider": "vast",
        "env_vars": ["CONTAINER_ID", "CONTAINER_API_KEY"],
        "destroy": [
            {"method": "DELETE", "url": url, "headers": auth, "body": "{}"},
            {"method": "POST", "url": f"{base}/fallback/$CONTAINER_ID", "headers": auth, "body": None},
        ],
        "stop": [{"method": "PUT", "url": url, "headers": auth, "body": json.dumps({"state": "stopped"})}],
        "cli_fallback_destroy": None,
        "cli_fallback_stop": None,
    }


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def trainer_pid() -> Iterator[int]:
    """A stand-in trainer: a process of its own session that the watchdog may signal."""
    process = subprocess.Popen(["sleep", "600"], start_new_session=True)
    yield process.pid
    process.kill()
    process.wait()


def _watchdog(job_dir: Path, settings: dict[str, Any], clock: FakeClock, trainer: int | None = None) -> Watchdog:
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "watchdog.json").write_text(json.dumps(settings))
    if trainer is not None:
        (job_dir / TRAINER_PID).write_text(str(trainer))
    return Watchdog(job_dir, settings, clock=clock, sleep=clock.sleep)


@pytest.fixture(autouse=True)
def _instance_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTAINER_ID", "4242")
    monkeypatch.setenv("CONTAINER_API_KEY", "instance-secret-key")


def _log(job_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (job_dir / LOG).read_text().splitlines()]


def _decided_at(job_dir: Path) -> float:
    """When the watchdog decided to end the job: its stop_trainer entry. (The fake clock's time afterwards
    also counts the grace polls while the real stand-in trainer exits, which vary with the machine's load.)"""
    return next(entry["time"] for entry in _log(job_dir) if entry["action"] == "stop_trainer")


def test_deadline_destroys_through_the_instance_key(
    tmp_path: Path, api: tuple[str, Recorder], trainer_pid: int
) -> None:
    base, recorder = api
    clock = FakeClock(1000.0)
    dog = _watchdog(
        tmp_path,
        {"started_at": 1000.0, "max_hours": 1, "usd_per_hour": 0.5, "recipe": _recipe(base), "poll_seconds": 60},
        clock,
        trainer=trainer_pid,
    )
    dog.run(max_rounds=1)
    assert 3600 <= _decided_at(tmp_path) - 1000.0 <= 3600 + 2 * 60
    assert recorder.calls == [
        {"method": "DELETE", "path": "/instances/4242/", "auth": "Bearer instance-secret-key", "body": "{}"}
    ]
    assert "instance-secret-key" not in (tmp_path / LOG).read_text()
    assert "instance-secret-key" not in (tmp_path / "watchdog.json").read_text()
    assert any(entry["action"] == "destroy" and "deadline" in entry["reason"] for entry in _log(tmp_path))


def test_budget_ends_the_instance_when_spent(tmp_path: Path, api: tuple[str, Recorder], trainer_pid: int) -> None:
    base, recorder = api
    clock = FakeClock(0.0)
    # $2/h and a $0.50 budget: 15 minutes
    dog = _watchdog(
        tmp_path,
        {"started_at": 0.0, "max_cost": 0.5, "usd_per_hour": 2.0, "recipe": _recipe(base), "poll_seconds": 30},
        clock,
        trainer=trainer_pid,
    )
    dog.run(max_rounds=1)
    assert 900 <= _decided_at(tmp_path) <= 900 + 2 * 30
    assert [c["method"] for c in recorder.calls] == ["DELETE"]


def test_idle_after_training_ended_but_not_while_client_beats(
    tmp_path: Path, api: tuple[str, Recorder], trainer_pid: int
) -> None:
    base, recorder = api
    clock = FakeClock(10_000.0)
    dog = _watchdog(
        tmp_path,
        {"started_at": 10_000.0, "idle_timeout_seconds": 600, "recipe": _recipe(base)},
        clock,
        trainer=trainer_pid,
    )
    output = tmp_path / "output"
    output.mkdir()
    (output / "events.jsonl").write_text(json.dumps({"event": "step", "step": 1}) + "\n")
    clock.now += 5000
    assert dog.reason_to_end() is None  # training still going: the client may come back
    (output / "events.jsonl").write_text(
        json.dumps({"event": "step", "step": 1}) + "\n" + json.dumps({"event": "done", "path": "x"}) + "\n"
    )
    (tmp_path / HEARTBEAT).touch()
    os.utime(tmp_path / HEARTBEAT, (clock.now - 100, clock.now - 100))
    assert dog.reason_to_end() is None  # client seen 100 s ago
    clock.now += 600
    reason = dog.reason_to_end()
    assert reason is not None and reason.startswith("idle")
    (tmp_path / FETCHED).touch()
    assert dog.end_instance(reason)
    assert [c["method"] for c in recorder.calls] == ["DELETE"]


def test_unfetched_results_stop_instead_of_destroy(tmp_path: Path, api: tuple[str, Recorder], trainer_pid: int) -> None:
    base, recorder = api
    clock = FakeClock(0.0)
    dog = _watchdog(
        tmp_path, {"started_at": 0.0, "max_hours": 0.01, "recipe": _recipe(base)}, clock, trainer=trainer_pid
    )
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "lora-000001.safetensors").write_bytes(b"w")
    dog.run(max_rounds=1)
    assert [(c["method"], c["body"]) for c in recorder.calls] == [("PUT", json.dumps({"state": "stopped"}))]


def test_failing_call_falls_back_then_retries(tmp_path: Path, api: tuple[str, Recorder], trainer_pid: int) -> None:
    base, recorder = api
    recorder.fail_first = 3  # DELETE, fallback POST, then DELETE again fail; the 4th call succeeds
    clock = FakeClock(0.0)
    dog = _watchdog(
        tmp_path,
        {"started_at": 0.0, "max_hours": 0.01, "recipe": _recipe(base), "poll_seconds": 10},
        clock,
        trainer=trainer_pid,
    )
    dog.run(max_rounds=2)
    assert [c["method"] for c in recorder.calls] == ["DELETE", "POST", "DELETE", "POST"]
    assert recorder.calls[1]["path"] == "/fallback/4242"


def test_missing_variable_is_logged_not_sent(tmp_path: Path, api: tuple[str, Recorder]) -> None:
    base, recorder = api
    clock = FakeClock(0.0)
    dog = _watchdog(tmp_path, {"started_at": 0.0, "max_hours": 0.01, "recipe": _recipe(base)}, clock)
    dog.environment = lambda: {"CONTAINER_ID": "4242"}  # the key is in neither this environment nor PID 1's
    assert dog.end_instance("test") is False
    assert recorder.calls == []
    assert any("CONTAINER_API_KEY" in entry.get("detail", "") for entry in _log(tmp_path))


def test_running_trainer_is_stopped_with_sigterm_first(tmp_path: Path, api: tuple[str, Recorder]) -> None:
    base, recorder = api
    marker = tmp_path / "got_sigterm"
    script = (
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(marker)!r}).write_text('x'), sys.exit(0)))\n"
        "time.sleep(60)\n"
    )
    trainer = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    time.sleep(0.3)
    (tmp_path / TRAINER_PID).write_text(str(trainer.pid))
    dog = Watchdog(tmp_path, {"started_at": time.time() - 7200, "max_hours": 1, "recipe": _recipe(base)})
    assert dog.end_instance("deadline") is True
    trainer.wait(timeout=10)
    assert marker.exists()
    assert [c["method"] for c in recorder.calls] == ["DELETE"]


def test_ssh_provider_only_stops_the_trainer(tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    dog = _watchdog(tmp_path, {"started_at": 0.0, "max_hours": 0.01, "recipe": None}, clock)
    dog.run()
    assert [entry["action"] for entry in _log(tmp_path)][-1] == "trainer_stopped"


def test_watchdog_runs_with_the_standard_library_only(tmp_path: Path) -> None:
    code = (
        "import sys; sys.path.insert(0, 'remote'); import watchdog; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'rentrain', 'providers', 'torch')))"
    )
    completed = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_a_success_that_did_not_end_the_instance_is_tried_again(
    tmp_path: Path, api: tuple[str, Recorder], trainer_pid: int
) -> None:
    base, recorder = api
    clock = FakeClock(0.0)
    dog = _watchdog(
        tmp_path,
        {"started_at": 0.0, "max_hours": 0.01, "recipe": _recipe(base), "poll_seconds": 60},
        clock,
        trainer=trainer_pid,
    )
    dog.run(max_rounds=2)  # the fake provider says OK but this process lives on: the instance was not ended
    assert [c["method"] for c in recorder.calls] == ["DELETE", "DELETE"]
    assert clock.now >= 36 + 300


def test_a_json_failure_body_is_not_success(tmp_path: Path) -> None:
    from remote.watchdog import _says_success

    assert _says_success(b'{"success": true}') and _says_success(b"") and _says_success(b"{}")
    assert not _says_success(b'{"success": false, "error": "invalid_args"}')
    assert not _says_success(b'{"errors": [{"message": "not allowed"}]}')


def test_stops_that_keep_failing_turn_into_a_destroy(
    tmp_path: Path, api: tuple[str, Recorder], trainer_pid: int
) -> None:
    base, recorder = api
    recorder.fail_first = 3  # three stop rounds fail
    clock = FakeClock(0.0)
    dog = _watchdog(
        tmp_path,
        {"started_at": 0.0, "max_hours": 0.01, "recipe": _recipe(base), "poll_seconds": 5},
        clock,
        trainer=trainer_pid,
    )
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "lora-000001.safetensors").write_bytes(b"w")
    dog.run(max_rounds=4)
    assert [c["method"] for c in recorder.calls] == ["PUT", "PUT", "PUT", "DELETE"]


def test_a_client_that_never_started_the_trainer_counts_as_gone(tmp_path: Path, api: tuple[str, Recorder]) -> None:
    base, _recorder = api
    clock = FakeClock(0.0)
    dog = _watchdog(
        tmp_path, {"started_at": 0.0, "idle_timeout_seconds": 600, "recipe": _recipe(base), "poll_seconds": 60}, clock
    )
    assert dog.reason_to_end() is None
    clock.now += 600
    reason = dog.reason_to_end()
    assert reason is not None and reason.startswith("idle")


def test_a_full_disk_does_not_stop_the_watchdog(tmp_path: Path, api: tuple[str, Recorder], trainer_pid: int) -> None:
    base, recorder = api
    clock = FakeClock(0.0)
    dog = _watchdog(
        tmp_path, {"started_at": 0.0, "max_hours": 0.01, "recipe": _recipe(base)}, clock, trainer=trainer_pid
    )
    (tmp_path / LOG).mkdir()  # appending to the log now fails with an OSError
    dog.run(max_rounds=1)
    assert [c["method"] for c in recorder.calls] == ["DELETE"]


def _set_up_at(job_dir: Path, when: float) -> None:
    """The client began this setup at `when`: it writes watchdog.json first thing."""
    os.utime(job_dir / "watchdog.json", (when, when))


def test_a_setup_that_takes_too_long_ends_the_instance(tmp_path: Path, api: tuple[str, Recorder]) -> None:
    base, recorder = api
    clock = FakeClock(50_000.0)
    settings = {
        "started_at": 50_000.0,
        "setup_timeout_seconds": 900,
        "idle_timeout_seconds": 600,
        "recipe": _recipe(base),
        "poll_seconds": 60,
    }
    dog = _watchdog(tmp_path, settings, clock)  # no trainer.pid: setup is still running
    _set_up_at(tmp_path, clock.now)
    for _ in range(3):  # the client beats all along: only the setup limit can end it
        clock.now += 290
        (tmp_path / HEARTBEAT).touch()
        os.utime(tmp_path / HEARTBEAT, (clock.now, clock.now))
        assert dog.reason_to_end() is None
    clock.now += 30
    reason = dog.reason_to_end()
    assert reason is not None and reason.startswith("setup: the trainer has not started 900 s")
    assert dog.end_instance(reason)
    assert [c["method"] for c in recorder.calls] == ["DELETE"]


def test_a_new_setup_and_a_started_trainer_are_not_cut_by_the_setup_limit(tmp_path: Path, trainer_pid: int) -> None:
    clock = FakeClock(50_000.0)
    dog = _watchdog(tmp_path, {"started_at": 0.0, "setup_timeout_seconds": 900, "recipe": None}, clock)
    _set_up_at(tmp_path, clock.now)
    (tmp_path / HEARTBEAT).touch()
    clock.now += 800
    _set_up_at(tmp_path, clock.now)  # a client came back (attach) and set up again: its own 900 s
    os.utime(tmp_path / HEARTBEAT, (clock.now + 700, clock.now + 700))
    clock.now += 700
    assert dog.reason_to_end() is None
    (tmp_path / TRAINER_PID).write_text(str(trainer_pid))  # the trainer runs: setup is over
    clock.now += 5000
    os.utime(tmp_path / HEARTBEAT, (clock.now, clock.now))
    assert dog.reason_to_end() is None


def test_the_watchdog_keeps_to_python_3_8_syntax() -> None:
    """It starts before bootstrap has found the trainer's 3.11+, with whatever Python 3.8+ the image has."""
    import ast

    source = (Path(__file__).resolve().parents[2] / "remote" / "watchdog.py").read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    # annotations such as `str | None` and `dict[str, Any]` are only strings there
    assert any(
        isinstance(node, ast.ImportFrom) and node.module == "__future__" and node.names[0].name == "annotations"
        for node in tree.body
    )


def _watchdog_layout(tmp_path: Path) -> tuple[RemoteLayout, Path]:
    root = tmp_path / "job dir"
    (root / "payload").mkdir(parents=True)
    (root / "payload" / "remote").symlink_to(Path(__file__).resolve().parents[2] / "remote")
    (root / "watchdog.json").write_text(json.dumps({"started_at": time.time(), "recipe": None, "poll_seconds": 60}))
    return RemoteLayout(root=str(root)), root


def _stop_watchdog(root: Path) -> None:
    pid = int((root / "watchdog.pid").read_text())
    os.kill(pid, signal.SIGKILL)


def test_the_watchdog_starts_once_with_the_images_python(tmp_path: Path) -> None:
    layout, root = _watchdog_layout(tmp_path)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    first = subprocess.run(["sh", "-c", watchdog_command(layout)], env=env, capture_output=True, text=True, timeout=30)
    try:
        assert first.returncode == 0, first.stderr
        pid = (root / "watchdog.pid").read_text()
        again = subprocess.run(
            ["sh", "-c", watchdog_command(layout)], env=env, capture_output=True, text=True, timeout=9
        )
        assert again.returncode == 0 and (root / "watchdog.pid").read_text() == pid  # a retried start starts none
    finally:
        _stop_watchdog(root)


def test_an_image_without_python_3_8_fails_the_watchdog_start_saying_so(tmp_path: Path) -> None:
    layout, _root = _watchdog_layout(tmp_path)
    image_bin = tmp_path / "bin"
    image_bin.mkdir()
    for name in ("sh", "setsid", "nohup", "sleep", "cat", "tail", "rm", "grep", "kill"):
        found = shutil.which(name)
        if found:
            (image_bin / name).symlink_to(found)
    completed = subprocess.run(
        [str(image_bin / "sh"), "-c", watchdog_command(layout)],
        env={"PATH": str(image_bin)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 1
    assert "no Python 3.8+ on this image to run the watchdog with" in completed.stderr


def test_a_client_silent_during_setup_ends_the_instance_after_three_missed_beats_at_the_least(
    tmp_path: Path, api: tuple[str, Recorder]
) -> None:
    base, _recorder = api
    clock = FakeClock(50_000.0)
    settings = {
        "started_at": 50_000.0,
        "setup_timeout_seconds": 1800,
        "idle_timeout_seconds": 5,
        "heartbeat_seconds": 10,
        "recipe": _recipe(base),
    }
    dog = _watchdog(tmp_path, settings, clock)
    _set_up_at(tmp_path, clock.now)
    (tmp_path / HEARTBEAT).touch()
    os.utime(tmp_path / HEARTBEAT, (clock.now, clock.now))
    clock.now += 29  # an idle timeout shorter than the beats (a test's --idle-timeout) waits for three of them
    assert dog.reason_to_end() is None
    clock.now += 1
    reason = dog.reason_to_end()
    assert reason is not None and reason.startswith("idle: setup not done and no client for 30 s")
