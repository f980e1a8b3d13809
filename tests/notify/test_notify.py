"""Notifications through apprise, sent for real to a local JSON webhook: what arrives, a failing or silent service
told once by its kind and place, a URL apprise cannot read refused up front, credentials.toml's notify list, and
nothing of a URL (it holds the service's secret) in any output or log."""

from __future__ import annotations

import base64
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from rentrain.credentials import credentials_path
from rentrain.notify import Notification, Notifier, NotifyConfigError
from tests.notify.conftest import Webhook, closed_port, write_credentials

SECRET = "s3cr3t-token"
GRID = b"\x89PNG\r\n\x1a\n a sample grid"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


def _done(attachment: Path | None = None) -> Notification:
    return Notification(kind="job_done", title="job j-1 done", body="lora.safetensors is home", attachment=attachment)


def test_a_notification_arrives_with_its_title_body_and_attachment(webhook: Webhook, tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    grid.write_bytes(GRID)
    said: list[str] = []
    Notifier([("--notify #1", webhook.url("/hooks/rentrain"))], said.append).send(_done(grid))
    assert said == []
    [(path, payload)] = webhook.posts
    assert path == "/hooks/rentrain"
    assert payload["title"] == "job j-1 done" and payload["message"] == "lora.safetensors is home"
    assert payload["type"] == "success"
    [attached] = payload["attachments"]
    assert attached["filename"] == "grid.png" and attached["mimetype"] == "image/png"
    assert base64.b64decode(attached["base64"]) == GRID


def test_a_missing_attachment_is_named_and_the_notification_still_goes(webhook: Webhook, tmp_path: Path) -> None:
    Notifier([("--notify #1", webhook.url())], print).send(_done(tmp_path / "grid.png"))
    [(_path, payload)] = webhook.posts
    assert "grid.png could not be attached: it is not there" in payload["message"]
    assert not payload.get("attachments")


def test_a_failing_url_is_told_once_by_kind_and_place_and_the_others_still_get_theirs(webhook: Webhook) -> None:
    port = closed_port()
    said: list[str] = []
    notifier = Notifier(
        [("--notify #1", webhook.url()), ("--notify #2", f"json://user:{SECRET}@127.0.0.1:{port}/private-path")],
        said.append,
    )
    notifier.send(_done())
    notifier.send(Notification(kind="job_failed", title="job j-2 failed", body="out of memory"))
    assert len(said) == 1
    assert "a notification through json (--notify #2) was not delivered" in said[0]
    assert "could not be reached" in said[0]
    for part in (SECRET, "127.0.0.1", str(port), "private-path", "user"):
        assert part not in said[0]
    assert [payload["title"] for _path, payload in webhook.posts] == ["job j-1 done", "job j-2 failed"]
    assert webhook.posts[1][1]["type"] == "failure"


def test_a_service_that_never_answers_is_given_up_on(silent_port: int) -> None:
    said: list[str] = []
    Notifier([("--notify #1", f"json://127.0.0.1:{silent_port}/hook")], said.append, seconds=0.5).send(_done())
    assert said == [
        "a notification through json (--notify #1) was not delivered (no answer within 0.5 s); "
        "its later failures are not reported"
    ]


@pytest.mark.parametrize(
    "bad, kind",
    [
        (f"nosuchservice://{SECRET}@example.org/x", "nosuchservice://"),
        (f"discord://{SECRET}", "discord://"),  # a webhook id without its token
        (f"{SECRET} pasted without its scheme", None),
    ],
)
def test_a_url_apprise_cannot_read_is_refused_at_construction(bad: str, kind: str | None) -> None:
    with pytest.raises(NotifyConfigError) as refused:
        Notifier.from_sources(["ntfy://my-topic", bad], print)
    message = str(refused.value)
    assert message.startswith("--notify #2")
    assert SECRET not in message and "example.org" not in message
    if kind is None:
        assert "does not start with a service such as ntfy:// or json://" in message
    else:
        assert f"apprise cannot read this {kind} URL" in message


def test_credentials_notify_urls_follow_the_cli_ones_each_url_once(webhook: Webhook) -> None:
    write_credentials(f'notify = ["{webhook.url()}", "ntfy://my-topic"]\n\n[vast]\napi_key = "k"\n')
    notifier = Notifier.from_sources(["ntfy://my-topic", "discord://123/abc"], print)
    assert [(t.kind, t.place) for t in notifier.targets] == [
        ("ntfy", "--notify #1"),
        ("discord", "--notify #2"),
        ("json", f"notify #1 in {credentials_path()}"),
    ]


@pytest.mark.parametrize(
    "notify, problem",
    [
        ('"ntfy://my-topic"', "notify must be a list of URL strings"),
        ('["ntfy://my-topic", 3]', "notify #2 is not a URL string"),
        (f'["ntfy://my-topic", "nosuchservice://{SECRET}"]', "notify #2 in {path}: apprise cannot read"),
    ],
)
def test_a_bad_notify_list_in_credentials_is_a_clear_error(notify: str, problem: str) -> None:
    write_credentials(f"notify = {notify}\n")
    with pytest.raises(NotifyConfigError) as refused:
        Notifier.from_sources([], print)
    path = credentials_path()
    assert str(path) in str(refused.value) and problem.format(path=path) in str(refused.value)
    assert SECRET not in str(refused.value)


def test_credentials_readable_by_others_are_refused() -> None:
    write_credentials('notify = ["ntfy://my-topic"]\n', mode=0o644)
    with pytest.raises(NotifyConfigError, match="readable by other users"):
        Notifier.from_sources([], print)


def test_nothing_of_a_url_reaches_logs_or_output(
    webhook: Webhook, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(NotifyConfigError):
        Notifier([("--notify #1", f"nosuchservice://{SECRET}@example.org")], print)
    said: list[str] = []
    good = f"json://user:{SECRET}@127.0.0.1:{webhook.port}/private-path"
    failing = f"json://user:{SECRET}@127.0.0.1:{closed_port()}/private-path"
    Notifier([("--notify #1", good), ("--notify #2", failing)], said.append).send(_done())
    assert len(webhook.posts) == 1 and len(said) == 1
    output = capfd.readouterr()
    everything = caplog.text + output.out + output.err + said[0]
    for part in (SECRET, "example.org", "private-path"):
        assert part not in everything
