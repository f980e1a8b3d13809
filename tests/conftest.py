"""Suite-wide settings: nothing reaches the internet, nothing touches the real home folder."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The trainer's Triton kernels run on the CPU in Triton's interpreter (read once, when triton is imported)
os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local" / "state"))
    for key in ("VAST_API_KEY", "RUNPOD_API_KEY", "RENTRAIN_VAST_URL", "RENTRAIN_RUNPOD_URL"):
        monkeypatch.delenv(key, raising=False)
