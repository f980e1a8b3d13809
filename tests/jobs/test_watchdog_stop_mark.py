"""The watchdog runs Vast's real recipe: before a stop it puts the stop's time on the instance's label (where a
client reads it without starting the instance); a mark that fails never keeps the instance from stopping."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from providers.vast import VastProvider
from remote.watchdog import LOG, Watchdog

INSTANCE_KEY = "instance-SECRET-key-42"
NOW = 1_765_000_000.7


class Api:
    """Records each call; answers `failing` calls (counted from the first) with HTTP 500."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.failing = 0


@pytest.fixture
def api() -> Iterator[tuple[str, Api]]:
    recorder = Api()

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            recorder.calls.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            status = 500 if len(recorder.calls) <= recorder.failing else 200
            self.send_response(status)
            self.send_header("Content-Length", "16")
            self.end_headers()
            self.wfile.write(b'{"success":true}')

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/api/v0", recorder
    server.shutdown()


def _stopping_watchdog(job_dir: Path, base_url: str, env: dict[str, str]) -> Watchdog:
    """A watchdog whose job has results nobody fetched, so it stops the instance rather than destroy it."""
    (job_dir / "output").mkdir(parents=True)
    (job_dir / "output" / "lora.safetensors").write_bytes(b"w")
    recipe = VastProvider("account-key-never-sent", base_url).self_destroy_recipe().model_dump()
    return Watchdog(job_dir, {"started_at": NOW - 3600, "recipe": recipe}, clock=lambda: NOW, environment=lambda: env)


def _instance_env() -> dict[str, str]:
    return {"CONTAINER_ID": "4242", "CONTAINER_API_KEY": INSTANCE_KEY, "RENTRAIN_LABEL": "rentrain-job42"}


def test_the_label_gets_the_stop_mark_before_the_stop(tmp_path: Path, api: tuple[str, Api]) -> None:
    base, recorder = api
    assert _stopping_watchdog(tmp_path, base, _instance_env()).end_instance("idle")
    assert [(c["path"], c["body"]) for c in recorder.calls] == [
        ("/api/v0/instances/4242/", {"label": "rentrain-job42|stopped@1765000000.700"}),
        ("/api/v0/instances/4242/", {"state": "stopped"}),
    ]
    assert {c["auth"] for c in recorder.calls} == {f"Bearer {INSTANCE_KEY}"}
    log = (tmp_path / LOG).read_text()
    assert INSTANCE_KEY not in log
    assert [json.loads(line)["action"] for line in log.splitlines()] == ["ending", "mark_stop", "stop"]


def test_a_mark_that_fails_does_not_keep_the_instance_from_stopping(tmp_path: Path, api: tuple[str, Api]) -> None:
    base, recorder = api
    recorder.failing = 1
    assert _stopping_watchdog(tmp_path, base, _instance_env()).end_instance("idle")
    marked = {"label": "rentrain-job42|stopped@1765000000.700"}
    assert [c["body"] for c in recorder.calls] == [marked, {"state": "stopped"}]


def test_an_instance_made_without_its_label_in_the_environment_is_stopped_unmarked(
    tmp_path: Path, api: tuple[str, Api]
) -> None:
    """Made by an older rentrain: nothing is sent that would overwrite its label with a half-filled one."""
    base, recorder = api
    env = {k: v for k, v in _instance_env().items() if k != "RENTRAIN_LABEL"}
    assert _stopping_watchdog(tmp_path, base, env).end_instance("idle")
    assert [c["body"] for c in recorder.calls] == [{"state": "stopped"}]
    marks = [json.loads(line) for line in (tmp_path / LOG).read_text().splitlines()]
    assert [m["detail"] for m in marks if m["action"] == "mark_stop"] == [
        "environment variable 'RENTRAIN_LABEL' is not set"
    ]
