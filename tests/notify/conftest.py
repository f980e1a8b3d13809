"""credentials.toml with notify URLs; the webhook fixture (tests/webhook.py) for apprise's json:// service."""

from __future__ import annotations

import os

from rentrain.credentials import credentials_path
from tests.webhook import Webhook, closed_port, webhook

__all__ = ["Webhook", "closed_port", "webhook", "write_credentials"]


def write_credentials(text: str, mode: int = 0o600) -> None:
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
