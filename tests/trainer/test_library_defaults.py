"""The trainer runs the libraries' own code: no kernels fetched from the Hub at run time."""

from __future__ import annotations

import os

import pytest

from remote.trainer.__main__ import set_library_defaults


def test_hub_kernels_are_off_unless_the_environment_asks_for_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    set_library_defaults()
    assert os.environ["USE_HUB_KERNELS"] == "NO"
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    set_library_defaults()
    assert os.environ["USE_HUB_KERNELS"] == "YES"


def test_transformers_reads_the_setting_as_hub_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.integrations import hub_kernels

    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    assert hub_kernels._kernels_enabled()  # transformers' own default: on
    set_library_defaults()
    assert not hub_kernels._kernels_enabled()
