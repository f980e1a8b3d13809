"""The dead-man's switch on the rented machine. Standard library only; started first, detached.

It starts as soon as SSH answers, before any package install or model download, and ends its own instance
through the provider's in-instance credentials when:
- the hard deadline (max_hours) is reached;
- the running cost (billed time x price) reaches the budget (max_cost);
- setup (everything before the trainer starts: no trainer.pid yet) has run longer than setup_timeout_seconds,
  counted from when the client last wrote watchdog.json (it does so at the start of each setup);
- training has ended (done, error, or the trainer is gone), or has not started, and the client has been silent
  for idle_timeout (during setup, for three of its heartbeat_seconds at the least).

Before ending, it stops a running trainer (SIGTERM, so the trainer saves its state). If results exist that
the client has not fetched yet, it STOPS the instance (the disk survives, cheaply) instead of destroying it,
first publishing the stop's time where the client can read it without starting the instance (the recipe's
`before_stop` calls; Vast: a mark on the instance's label), since this log stays on the stopped disk.

    python3 watchdog.py JOB_DIR          # reads JOB_DIR/watchdog.json, written by the client

It runs on whatever Python 3.8+ the image has (it starts before bootstrap looks for the trainer's 3.11+), so
it keeps to 3.8 syntax and standard-library calls.

The client touches JOB_DIR/heartbeat while it sets up and follows the job, and writes JOB_DIR/fetched once
the final result is home. Decisions are appended to JOB_DIR/watchdog.jsonl. No secret is in watchdog.json: the
provider calls name environment variables (CONTAINER_API_KEY, RUNPOD_API_KEY) that the provider put in the
container, read from the environment, or from PID 1's environment when an SSH session lacks them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HEARTBEAT = "heartbeat"
FETCHED = "fetched"
SETTINGS = "watchdog.json"
LOG = "watchdog.jsonl"
TRAINER_PID = "trainer.pid"
VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
NOW_VARIABLE = "RENTRAIN_NOW"  # the provider calls may use it: the Unix time (to the ms) when the end began
MARK_TIMEOUT_SECONDS = 10  # a call before the stop that hangs delays the stop, which bills the GPU meanwhile


def container_environment() -> dict[str, str]:
    """This process's environment, completed from PID 1's (where providers put their variables)."""
    merged: dict[str, str] = {}
    try:
        raw = Path("/proc/1/environ").read_bytes()
        for item in raw.split(b"\0"):
            name, sep, value = item.decode("utf-8", "replace").partition("=")
            if sep:
                merged[name] = value
    except OSError:
        pass
    merged.update(os.environ)
    return merged


def expand(text: str, env: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise KeyError(name)
        return env[name]

    return VARIABLE.sub(replace, text)


def http_call(call: dict[str, Any], env: dict[str, str], timeout: float = 30) -> tuple[bool, str]:
    try:
        url = expand(call["url"], env)
        headers = {name: expand(value, env) for name, value in (call.get("headers") or {}).items()}
        body = call.get("body")
        data = expand(body, env).encode() if body is not None else None
    except KeyError as missing:
        return False, f"environment variable {missing} is not set"
    if data is not None:
        headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(url, data=data, headers=headers, method=call["method"])
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = response.read(65536)
            if not 200 <= response.status < 300:
                return False, f"HTTP {response.status}"
            return _says_success(answer), f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"network error: {exc}"


def _says_success(body: bytes) -> bool:
    """A 2xx whose JSON body says {"success": false} (Vast's error shape) or carries GraphQL errors failed."""
    try:
        data = json.loads(body) if body.strip() else None
    except ValueError:
        return True
    if isinstance(data, dict):
        return data.get("success", True) is not False and not data.get("errors")
    return True


def cli_call(command: str | None, env: dict[str, str]) -> tuple[bool, str]:
    if not command:
        return False, "no command-line fallback"
    try:
        completed = subprocess.run(["sh", "-c", command], env=env, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return completed.returncode == 0, f"exit {completed.returncode}"


class Watchdog:
    def __init__(
        self,
        job_dir: Path,
        settings: dict[str, Any],
        clock: Any = time.time,
        sleep: Any = time.sleep,
        environment: Any = container_environment,
    ):
        self.job_dir = job_dir
        self.environment = environment
        self.settings = settings
        self.clock = clock
        self.sleep = sleep
        self.started_at = float(settings["started_at"])  # billing start: deadline and budget count from here
        self.watch_started = clock()  # the client's silence is counted from here at the earliest
        self.events_offset = 0
        self.training_ended = False
        self.failed_stops = 0

    def log(self, action: str, **fields: Any) -> None:
        line = json.dumps({"event": "watchdog", "time": self.clock(), "action": action, **fields})
        try:
            with (self.job_dir / LOG).open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        except OSError:
            pass  # a full disk must not stop the watchdog from ending the instance

    def cost_so_far(self) -> float:
        return (self.clock() - self.started_at) / 3600 * float(self.settings.get("usd_per_hour") or 0)

    def trainer_pid(self) -> int | None:
        try:
            return int((self.job_dir / TRAINER_PID).read_text().strip())
        except (OSError, ValueError):
            return None

    def trainer_alive(self) -> bool:
        pid = self.trainer_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1]
        except OSError:
            return True  # no /proc here (or it just ended): kill -0 said it exists
        return not state.startswith("Z")

    def _scan_events(self) -> None:
        path = self.job_dir / self.settings.get("events_file", "output/events.jsonl")
        try:
            with path.open("rb") as handle:
                handle.seek(self.events_offset)
                chunk = handle.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.events_offset += len(complete)
        for line in complete.splitlines():
            try:
                kind = json.loads(line).get("event")
            except (ValueError, AttributeError):
                continue
            if kind in ("done", "error"):
                self.training_ended = True

    def client_silent_for(self) -> float:
        try:
            last = (self.job_dir / HEARTBEAT).stat().st_mtime
        except OSError:
            last = self.watch_started
        return self.clock() - max(last, self.watch_started)

    def setup_seconds(self) -> float:
        """Time since the client began the current setup: it writes watchdog.json first thing each time."""
        try:
            began = (self.job_dir / SETTINGS).stat().st_mtime
        except OSError:
            began = self.watch_started
        return self.clock() - began

    def reason_to_end(self) -> str | None:
        max_hours = self.settings.get("max_hours")
        if max_hours is not None and self.clock() - self.started_at >= float(max_hours) * 3600:
            return f"deadline: {max_hours} h reached"
        max_cost = self.settings.get("max_cost")
        if max_cost is not None and self.cost_so_far() >= float(max_cost):
            return f"budget: ${self.cost_so_far():.2f} of ${float(max_cost):.2f} spent"
        self._scan_events()
        trainer_started = self.trainer_pid() is not None
        idle = float(self.settings.get("idle_timeout_seconds") or 1200)
        if not trainer_started:
            setup_limit = self.settings.get("setup_timeout_seconds")
            if setup_limit is not None and self.setup_seconds() >= float(setup_limit):
                return f"setup: the trainer has not started {self.setup_seconds():.0f} s after setup began"
            # during setup the client beats every heartbeat_seconds: silence counts after three missed beats
            idle = max(idle, 3 * float(self.settings.get("heartbeat_seconds") or 0))
        # no trainer at all counts as ended too: the client went away before it could start one
        ended = self.training_ended or not trainer_started or not self.trainer_alive()
        if ended and self.client_silent_for() >= idle:
            phase = "training ended" if trainer_started else "setup not done"
            return f"idle: {phase} and no client for {self.client_silent_for():.0f} s"
        return None

    def stop_trainer(self, grace_seconds: float = 60) -> None:
        pid = self.trainer_pid()
        if pid is None or not self.trainer_alive():
            return
        self.log("stop_trainer", pid=pid)
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return
        deadline = self.clock() + grace_seconds
        while self.trainer_alive() and self.clock() < deadline:
            self.sleep(1)
        if self.trainer_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    def results_not_fetched(self) -> bool:
        if (self.job_dir / FETCHED).exists():
            return False
        output = self.job_dir / "output"
        return output.is_dir() and any(output.glob("*.safetensors"))

    def end_instance(self, reason: str) -> bool:
        recipe = self.settings.get("recipe")
        self.stop_trainer()
        if recipe is None:
            self.log("trainer_stopped", reason=reason, detail="no provider to end: the machine stays as it is")
            return True
        action = "stop" if self.results_not_fetched() and self.failed_stops < 3 else "destroy"
        self.log("ending", intent=action, reason=reason)  # a successful call may end this process before it logs
        env = {**self.environment(), NOW_VARIABLE: f"{self.clock():.3f}"}
        if action == "stop":
            self.mark_stop(recipe, env, reason)
        for call in recipe.get(action) or []:
            ok, detail = http_call(call, env)
            self.log(action, reason=reason, method=call["method"], ok=ok, detail=detail)
            if ok:
                return True
        ok, detail = cli_call(recipe.get(f"cli_fallback_{action}"), env)
        self.log(action, reason=reason, method="cli", ok=ok, detail=detail)
        if not ok and action == "stop":
            self.failed_stops += 1  # after three rounds: destroy rather than bill on
        return ok

    def mark_stop(self, recipe: dict[str, Any], env: dict[str, str], reason: str) -> None:
        """Publish the stop's time where the client can read it while the disk with this log is stopped (Vast: on
        the instance's label); best effort, the stop follows whatever these calls answer."""
        for call in recipe.get("before_stop") or []:
            ok, detail = http_call(call, env, timeout=MARK_TIMEOUT_SECONDS)
            self.log("mark_stop", reason=reason, method=call["method"], ok=ok, detail=detail)

    def run(self, max_rounds: int | None = None) -> None:
        """Watch until the instance is ended. A call that 'succeeded' ends this process with the instance;
        if the process is still here a while later, the instance is not ended: call again."""
        poll = float(self.settings.get("poll_seconds") or 15)
        self.log("started", pid=os.getpid(), settings={k: v for k, v in self.settings.items() if k != "recipe"})
        retry = poll
        next_try = 0.0
        rounds = 0
        while max_rounds is None or rounds < max_rounds:
            try:
                reason = self.reason_to_end()
                if reason is not None and self.clock() >= next_try:
                    rounds += 1
                    if self.end_instance(reason):
                        if self.settings.get("recipe") is None:
                            return  # nothing to end but the trainer: done
                        next_try = self.clock() + 300
                    else:
                        next_try = self.clock() + retry  # billing goes on while we fail: retry, but do not hammer
                        retry = min(retry * 2, 300)
            except Exception as exc:
                self.log("error", detail=f"{type(exc).__name__}: {exc}")
            self.sleep(poll)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: watchdog.py JOB_DIR", file=sys.stderr)
        return 2
    job_dir = Path(argv[1])
    settings = json.loads((job_dir / SETTINGS).read_text(encoding="utf-8"))
    (job_dir / "watchdog.pid").write_text(str(os.getpid()))
    Watchdog(job_dir, settings).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
