"""Headless Chromium, driven over the Chrome DevTools Protocol on a pipe (`--remote-debugging-pipe`: Chromium
reads commands on its fd 3 and answers on fd 4, each message JSON ending in a NUL byte; the transport Puppeteer
and Playwright use). Standard library only: no WebDriver, no chromedriver whose version must match the browser.
Protocol reference: https://chromedevtools.github.io/devtools-protocol/
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

BROWSER_NAMES = ("chromium", "chromium-browser")
TIMEOUT_SECONDS = 30.0


def find_chromium() -> str:
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        f"no headless browser for the report test: none of {', '.join(BROWSER_NAMES)} is installed; "
        "run scripts/install-test-deps (it installs Debian's chromium)",
        pytrace=False,
    )


def _high_fd(fd: int) -> int:
    """The descriptor moved to 10 or above (closed on exec), so that it never collides with fd 3 or 4."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Browser:
    """One headless Chromium with a fresh profile in `workdir`; `open` loads a page and waits for its load event."""

    def __init__(self, workdir: Path, width: int = 1200, height: int = 900):
        executable = find_chromium()
        workdir.mkdir(parents=True, exist_ok=True)
        commands_in, self._commands = map(_high_fd, os.pipe())
        self._answers, answers_out = map(_high_fd, os.pipe())
        self.log = workdir / "chromium.log"
        arguments = [
            executable,
            "--headless",
            "--no-sandbox",  # the tests may run as root (CI does), where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
            f"--user-data-dir={workdir / 'profile'}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                # bash puts the two pipe ends where Chromium looks for them (fd 3 and 4)
                ["bash", "-c", f'exec "$@" 3<&{commands_in} 4>&{answers_out}', "bash", *arguments],
                pass_fds=(commands_in, answers_out),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        os.close(commands_in)
        os.close(answers_out)
        self._buffer = b""
        self._next_id = 0

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *_exc: object) -> None:
        with contextlib.suppress(RuntimeError, OSError):  # it may close its pipe before answering
            self.call("Browser.close")
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        os.close(self._commands)
        os.close(self._answers)

    def _fail(self, why: str) -> RuntimeError:
        log = self.log.read_text(encoding="utf-8", errors="replace")[-3000:]
        return RuntimeError(f"chromium: {why}; its log ends:\n{log}")

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._answers], [], [], remaining)[0]:
                raise self._fail("no answer in time")
            chunk = os.read(self._answers, 1 << 20)
            if not chunk:
                raise self._fail("it closed its pipe (exited?)")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        parsed: dict[str, Any] = json.loads(message)
        return parsed

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self._next_id += 1
        request: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            request["sessionId"] = session
        os.write(self._commands, json.dumps(request).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while True:
            message = self._message(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise self._fail(f"{method} failed: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    def open(self, page: Path) -> str:
        """A new tab showing the file; returns its session once the page (images included) has loaded."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session: str = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=session)
        url = page.resolve().as_uri()
        self.call("Page.navigate", {"url": url}, session=session)
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while True:
            message = self._message(deadline)
            # about:blank's own load event may come late: only the page's counts
            loaded = message.get("method") == "Page.loadEventFired" and message.get("sessionId") == session
            if loaded and self.evaluate(session, "location.href") == url:
                return session

    def evaluate(self, session: str, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
        if "exceptionDetails" in answer:
            raise self._fail(f"{expression} raised: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def screenshot(self, session: str) -> bytes:
        """A PNG of the whole page, not only the window."""
        size = self.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.call(
            "Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True}, session=session
        )
        return base64.b64decode(shot["data"])
