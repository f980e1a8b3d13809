"""remote/bootstrap.sh: phases reported with durations, idempotent, a host without a GPU refused."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = REPO / "remote" / "bootstrap.sh"


def _run(job_dir: Path, allow_cpu: bool) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": os.environ["HOME"]}
    if allow_cpu:
        env["RENTRAIN_ALLOW_CPU"] = "1"
    return subprocess.run(["bash", str(BOOTSTRAP), str(job_dir)], env=env, capture_output=True, text=True, check=False)


def _phases(job_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (job_dir / "bootstrap.jsonl").read_text().splitlines()]


def test_bootstrap_reports_phases_and_skips_work_the_second_time(tmp_path: Path) -> None:
    first = _run(tmp_path, allow_cpu=True)
    assert first.returncode == 0, first.stderr
    phases = _phases(tmp_path)
    assert [p["name"] for p in phases] == ["python", "packages", "gpu"]
    assert all(p["ok"] is True and isinstance(p["seconds"], float) for p in phases)
    assert phases[1]["detail"] == "the image has everything"
    assert "CPU only (allowed)" in str(phases[2]["detail"])
    assert (tmp_path / "python").read_text().strip() == str(Path(sys.executable).parent / "python3")


def test_bootstrap_prefers_the_python_the_host_names(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": os.environ["HOME"],
        "RENTRAIN_ALLOW_CPU": "1",
        "RENTRAIN_PYTHON": sys.executable,
    }
    completed = subprocess.run(
        ["bash", str(BOOTSTRAP), str(tmp_path)], env=env, capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "python").read_text().strip() == sys.executable
    second = _run(tmp_path, allow_cpu=True)
    assert second.returncode == 0
    assert _phases(tmp_path)[4]["detail"] == "already installed"


def test_a_host_without_a_gpu_fails_the_gpu_phase(tmp_path: Path) -> None:
    completed = _run(tmp_path, allow_cpu=False)
    assert completed.returncode == 1
    gpu = _phases(tmp_path)[-1]
    assert gpu["name"] == "gpu" and gpu["ok"] is False
    assert "torch sees no GPU" in str(gpu["detail"])


def test_remote_requirements_mirror_the_train_extra() -> None:
    def names(lines: list[str]) -> set[str]:
        return {re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower() for line in lines if line.strip()}

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    remote = [line.split("#")[0] for line in (REPO / "remote" / "requirements.txt").read_text().splitlines()]
    assert names(extra) - {"torch"} <= names(remote)


def test_an_image_with_python_3_10_is_refused_naming_the_version(tmp_path: Path) -> None:
    """remote/config.py needs tomllib (3.11+): bootstrap refuses an older Python and says which it found."""
    image_bin = tmp_path / "image bin"
    image_bin.mkdir()
    for name in ("python3", "python"):  # an image whose only Python is 3.10.12
        stand_in = image_bin / name
        stand_in.write_text("#!/bin/sh\necho 3.10.12\n")
        stand_in.chmod(0o755)
    job_dir = tmp_path / "job"
    env = {"PATH": f"{image_bin}:/usr/bin:/bin", "HOME": os.environ["HOME"], "RENTRAIN_ALLOW_CPU": "1"}
    completed = subprocess.run(["bash", str(BOOTSTRAP), str(job_dir)], env=env, capture_output=True, text=True)
    assert completed.returncode == 1
    [python] = _phases(job_dir)
    assert python["name"] == "python" and python["ok"] is False
    assert python["detail"] == (
        f"found Python 3.10.12 at {image_bin}/python3; the trainer needs 3.11+ "
        "(set RENTRAIN_PYTHON or use an image with 3.11+)"
    )
    assert not (job_dir / "python").exists()
