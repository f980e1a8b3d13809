"""Notifications through apprise (https://appriseit.com/services/): one library for ntfy, Discord, Slack,
Telegram, email and JSON webhooks. docs/notifications.md is the user's side.

The URLs come from `--notify URL` options and credentials.toml's ``notify = [...]``; `Notifier.from_sources`
joins both and refuses a URL apprise cannot read, so a command can refuse before anything is rented.

A notification URL holds its service's secret (a token, a webhook id and token, a password). rentrain names a URL
only by its place and its service kind (the URL scheme: "json (--notify #2)"), never by its text. apprise logs
URLs (one it cannot read in full, at ERROR) and the HTTP library under it logs request paths, where Discord's and
Slack's tokens are, at DEBUG. So:
- this process never sends: a child process (``python -m rentrain.notify``) does, the URLs given on its stdin and
  its output other than the outcomes discarded. No log record of a send exists here, whatever logging is set up;
- here, URLs are only read (`Notifier`'s check), with every record of the "apprise" logger dropped.

Time: `send` returns within `seconds` + CHILD_START_SECONDS, whatever the services do. apprise stops waiting for a
service at `seconds` (its call timeout; a service's own socket timeouts are 4 s to connect and 4 s to read), and a
child still running after the extra start-up margin is killed. `send` never raises: a URL whose notification was
not delivered is told once through `say`, its later failures are silent.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from rentrain.credentials import CredentialsError, credentials_path, notify_urls

NotificationKind = Literal["job_done", "job_failed", "queue_stopped", "still_billing"]
Outcome = Literal["sent", "failed", "timeout"]

SEND_SECONDS = 15.0  # apprise stops waiting for a service after this long
CHILD_START_SECONDS = 10.0  # the child's Python and apprise imports, on a slow disk: past both it is killed
# apprise's notification types, which services show as a colour or an icon
NOTIFY_TYPES: dict[NotificationKind, str] = {
    "job_done": "success",
    "job_failed": "failure",
    "queue_stopped": "warning",
    "still_billing": "warning",
}
URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31})://")
SERVICES_HELP = "every service's URL format: https://appriseit.com/services/"
OUTCOMES = TypeAdapter(dict[int, Outcome])


class NotifyConfigError(Exception):
    """A notification URL apprise cannot read, or a malformed notify list: refused before anything is rented."""


class Notification(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: NotificationKind
    title: str = Field(min_length=1)
    body: str  # plain text
    attachment: Path | None = None  # a local file, e.g. the job's final sample grid; sent without it when missing


@dataclass(frozen=True)
class Target:
    url: str  # the secret: never printed, logged or put in a message
    place: str  # where the user wrote it: "--notify #2", "notify #1 in ~/.config/rentrain/credentials.toml"
    kind: str  # the URL scheme: "ntfy", "discord", "json"

    @property
    def name(self) -> str:
        return f"{self.kind} ({self.place})"


class SendOrder(BaseModel):
    """What the child process is given on its stdin."""

    urls: list[str]
    title: str
    body: str
    notify_type: str
    attachment: str | None
    seconds: float


class Notifier:
    def __init__(
        self, urls: Sequence[tuple[str, str]], say: Callable[[str], None], seconds: float = SEND_SECONDS
    ) -> None:
        """`urls`: (place, URL) pairs, the place as the user would name it ("--notify #2"); a URL given twice is
        sent to once. NotifyConfigError for a URL apprise cannot read."""
        places: dict[str, str] = {}
        for place, url in urls:
            places.setdefault(url, place)
        self.targets = [_target(place, url) for url, place in places.items()]
        self.say = say
        self.seconds = seconds
        self._reported: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def from_sources(cls, cli_urls: Sequence[str], say: Callable[[str], None]) -> Notifier:
        """The `--notify` URLs, then credentials.toml's; NotifyConfigError for a bad URL or notify list."""
        try:
            stored = notify_urls()
        except CredentialsError as exc:
            raise NotifyConfigError(str(exc)) from None
        places = [(f"--notify #{n}", url) for n, url in enumerate(cli_urls, start=1)]
        places += [(f"notify #{n} in {credentials_path()}", url) for n, url in enumerate(stored, start=1)]
        return cls(places, say)

    def send(self, notification: Notification) -> None:
        """Deliver to every URL at once; never raises, returns within `seconds` + CHILD_START_SECONDS."""
        if not self.targets:
            return
        outcomes = self._dispatch(notification)
        for index, target in enumerate(self.targets):
            outcome = outcomes.get(index)
            if outcome != "sent":
                self._report(target, outcome)

    def _dispatch(self, notification: Notification) -> dict[int, Outcome]:
        """Each URL's outcome, by its index in `targets`; an index missing: the child did not say."""
        attachment, body = notification.attachment, notification.body
        try:
            if attachment is not None and not attachment.is_file():
                body += f"\n\n({attachment.name} could not be attached: it is not there)"
                attachment = None
            order = SendOrder(
                urls=[target.url for target in self.targets],
                title=notification.title,
                body=body,
                notify_type=NOTIFY_TYPES[notification.kind],
                attachment=str(attachment) if attachment else None,
                seconds=self.seconds,
            )
            # -P: the current folder is not searched first, so a folder named rentrain there is not imported
            child = subprocess.run(
                [sys.executable, "-P", "-m", "rentrain.notify"],
                input=order.model_dump_json().encode(),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                timeout=self.seconds + CHILD_START_SECONDS,
                check=False,
            )
            return OUTCOMES.validate_json(child.stdout)
        except (OSError, subprocess.SubprocessError, ValidationError):
            return {}

    def _report(self, target: Target, outcome: Outcome | None) -> None:
        with self._lock:
            if target.url in self._reported:
                return
            self._reported.add(target.url)
        why = {
            "failed": "the service refused it or could not be reached",
            "timeout": f"no answer within {self.seconds:g} s",
            None: "the sending process did not finish",
        }[outcome]
        self.say(f"a notification through {target.name} was not delivered ({why}); its later failures are not reported")


def _target(place: str, url: str) -> Target:
    """The URL checked with apprise: NotifyConfigError naming the place and the scheme, never the URL."""
    import apprise

    _silence_apprise()
    scheme = URL_SCHEME.match(url)
    if scheme is None:
        raise NotifyConfigError(
            f"{place} is not a notification URL: it does not start with a service such as ntfy:// or json:// "
            f"({SERVICES_HELP})"
        )
    kind = scheme.group(1).lower()
    if apprise.Apprise.instantiate(url) is None:
        raise NotifyConfigError(
            f"{place}: apprise cannot read this {kind}:// URL (an unknown service, or a part of the URL missing or "
            f"malformed; {SERVICES_HELP})"
        )
    return Target(url=url, place=place, kind=kind)


def _silence_apprise() -> None:
    """apprise logs URLs (all its records are its one logger's, "apprise"): that logger drops every record, so no
    handler sees one, not even one attached to it (pytest's caplog attaches to loggers that do not propagate)."""
    logging.getLogger("apprise").addFilter(_drop_record)  # once: addFilter keeps a filter once


def _drop_record(_record: logging.LogRecord) -> bool:
    return False


def _send_in_child() -> None:
    """``python -m rentrain.notify``: send the SendOrder on stdin, print each URL's outcome as JSON."""
    import apprise
    from apprise import AppriseResultStatus

    order = SendOrder.model_validate_json(sys.stdin.buffer.read())
    sender = apprise.Apprise()
    for index, url in enumerate(order.urls):
        sender.add(url, tag=f"url{index}")
    result = sender.notify(
        body=order.body,
        title=order.title,
        notify_type=order.notify_type,
        body_format=apprise.NotifyFormat.TEXT,
        attach=order.attachment,
        timeout=order.seconds,
    )
    word: dict[AppriseResultStatus, Outcome] = {
        AppriseResultStatus.SUCCESS: "sent",
        AppriseResultStatus.TIMEOUT: "timeout",
    }
    outcomes = {int(service.tag[0].removeprefix("url")): word.get(service.status, "failed") for service in result}
    sys.stdout.buffer.write(OUTCOMES.dump_json(outcomes))
    sys.stdout.flush()
    os._exit(0)  # a service apprise stopped waiting for may still hold one of its threads


if __name__ == "__main__":
    _send_in_child()
