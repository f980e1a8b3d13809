"""remote/warm_cache.py finds installed packages without importing them and reads their code files;
bootstrap.sh starts it only on a GPU host."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from remote import warm_cache

REPO = Path(__file__).resolve().parents[2]


def _package(root: Path) -> Path:
    package = root / "fakepkg_warm"
    (package / "sub" / "__pycache__").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / "sub" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0" * 100)
    (package / "sub" / "_ext.so").write_bytes(b"\1" * 3_000_000)
    (package / "sub" / "libcudnn.so.9").write_bytes(b"\2" * 10)
    (package / "sub" / "config.json").write_text("{}")
    (package / "README.md").write_text("not code")
    (package / "photo.png").write_bytes(b"\3" * 50)
    return package


def test_packages_are_found_without_being_imported(tmp_path, monkeypatch):
    package = _package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert warm_cache.package_dirs(("fakepkg_warm", "no_such_package_here")) == [package]
    assert "fakepkg_warm" not in sys.modules


def test_code_files_are_read_in_full_and_the_rest_left_alone(tmp_path, monkeypatch):
    package = _package(tmp_path)
    opened: list[str] = []
    real_open = os.open

    def recording_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(warm_cache.os, "open", recording_open)
    count, size = warm_cache.warm([package], read=True, workers=2)

    assert sorted(opened) == ["__init__.py", "_ext.so", "config.json", "libcudnn.so.9", "mod.cpython-311.pyc"]
    assert count == 5
    assert size == sum(p.stat().st_size for p in package.rglob("*") if p.name in opened)
    assert opened.index("_ext.so") > opened.index("__init__.py")  # shared libraries after the imports' files


def test_an_unreadable_file_is_skipped(tmp_path):
    package = _package(tmp_path)
    (package / "broken.py").symlink_to(tmp_path / "missing.py")
    count, size = warm_cache.warm([package], read=False, workers=2)
    assert count == 6 and size == 3_000_000 + 100 + 10 + 2 + len("raise RuntimeError('imported')\n")


def _bootstrap(job_dir: Path, path: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": path, "HOME": os.environ["HOME"], "RENTRAIN_ALLOW_CPU": "1"}
    script = str(REPO / "remote" / "bootstrap.sh")
    return subprocess.run(["bash", script, str(job_dir)], env=env, capture_output=True, text=True, check=False)


def test_bootstrap_warms_a_gpu_host_in_the_background(tmp_path):
    """An image whose python reports a GPU (a stand-in: this machine has none) and records the warm start."""
    image_bin = tmp_path / "bin"
    image_bin.mkdir()
    stand_in = image_bin / "python3"
    stand_in.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        '  *torch.cuda.is_available*) echo "1 x Stand-in GPU, 24.0 GiB"; exit 0 ;;\n'
        '  *warm_cache.py*) echo "warm started" >&2; exit 0 ;;\n'
        "esac\n"
        f'exec {sys.executable} "$@"\n'
    )
    stand_in.chmod(0o755)
    job = tmp_path / "job"
    completed = _bootstrap(job, f"{image_bin}:/usr/bin:/bin")
    assert completed.returncode == 0, completed.stderr
    for _ in range(100):  # the background process writes its line soon after bootstrap exits
        if (job / "warm.log").exists() and (job / "warm.log").read_text():
            break
        time.sleep(0.05)
    assert (job / "warm.log").read_text() == "warm started\n"


def test_bootstrap_does_not_warm_a_cpu_host(tmp_path):
    completed = _bootstrap(tmp_path, f"{Path(sys.executable).parent}:/usr/bin:/bin")
    assert completed.returncode == 0, completed.stderr
    assert not (tmp_path / "warm.log").exists()
