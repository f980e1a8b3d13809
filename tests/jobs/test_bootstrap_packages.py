"""remote/bootstrap.sh's packages phase installs the tested versions and never replaces the image's torch."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def test_a_pin_at_another_version_is_installed_with_the_images_torch_kept(tmp_path: Path) -> None:
    payload = tmp_path / "payload" / "remote"
    payload.mkdir(parents=True)
    shutil.copy(REPO / "remote" / "bootstrap.sh", payload / "bootstrap.sh")
    (payload / "requirements.txt").write_text(
        f"# the image has click at the pinned version and rich unpinned: both are left alone\n"
        f"pillow==0.0.1\nclick=={md.version('click')}\nrich\n"
    )
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "uv-calls"
    (fake_bin / "uv").write_text(
        f'#!/bin/sh\necho "UV_BREAK_SYSTEM_PACKAGES=$UV_BREAK_SYSTEM_PACKAGES $*" >> {calls}\n'
    )
    (fake_bin / "uv").chmod(0o755)
    job = tmp_path / "job"
    job.mkdir()
    env = {
        "PATH": f"{fake_bin}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": os.environ["HOME"],
        "RENTRAIN_ALLOW_CPU": "1",
    }
    completed = subprocess.run(
        ["bash", str(payload / "bootstrap.sh"), str(job)], env=env, capture_output=True, text=True, check=False
    )
    phases = {p["name"]: p for p in map(json.loads, (job / "bootstrap.jsonl").read_text().splitlines())}
    assert phases["packages"]["ok"] is True, completed.stderr
    assert phases["packages"]["detail"] == "installed: pillow==0.0.1"
    [call] = calls.read_text().splitlines()
    assert call.startswith("UV_BREAK_SYSTEM_PACKAGES=1 pip install")
    assert call.endswith(f" -c {job / 'keep-torch.txt'} pillow==0.0.1")
    assert (job / "keep-torch.txt").read_text().strip() == f"torch=={torch.__version__}"
