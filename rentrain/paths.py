"""Where rentrain keeps its files on the user's machine."""

from __future__ import annotations

import os
from pathlib import Path


def config_dir() -> Path:
    """~/.config/rentrain (XDG_CONFIG_HOME honoured): credentials and user defaults."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "rentrain"


def state_dir() -> Path:
    """~/.local/state/rentrain (XDG_STATE_HOME honoured): the job ledger, per-job SSH keys, logs."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "rentrain"
