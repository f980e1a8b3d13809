"""README's Quickstart and environment table against what the code and CI do."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from providers import registry

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")
INSTALL_TEST_DEPS = REPO / "scripts" / "install-test-deps"


def _shell_blocks(markdown: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", markdown, flags=re.DOTALL)


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def test_ci_runs_the_readme_test_command_verbatim_and_no_command_needs_sudo() -> None:
    quickstart = _shell_blocks(_section("Quickstart"))
    assert len(quickstart) == 2
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    test_command = ci_lines[-1]
    assert quickstart[1].strip().startswith("scripts/install-test-deps && ")
    assert quickstart[1].strip().endswith(" && " + test_command)
    assert "scripts/install-test-deps" in ci_lines
    assert not any(re.search(r"(^|&&\s*)sudo\b", block) for block in quickstart)


def _environment_variables_read_by_the_code() -> set[str]:
    names = set(registry.API_KEY_ENV.values())
    sources = [*REPO.glob("rentrain/**/*.py"), *REPO.glob("providers/**/*.py"), *REPO.glob("remote/**/*.py")]
    for path in [*sources, *REPO.glob("remote/*.sh")]:
        text = path.read_text(encoding="utf-8")
        names |= set(re.findall(r'environ(?:\.get|\.setdefault)?[(\[]\s*"([A-Z][A-Z0-9_]*)"', text))
        names |= set(re.findall(r'"(RENTRAIN_[A-Z0-9_]+)"', text))
        names |= set(re.findall(r"\$\{?(RENTRAIN_[A-Z0-9_]+)", text))
        for listed in re.findall(r"env_vars=\[([^\]]*)\]", text):
            names |= set(re.findall(r'"([A-Z][A-Z0-9_]*)"', listed))
    return names


def test_readme_documents_every_environment_variable_the_code_reads() -> None:
    names = _environment_variables_read_by_the_code()
    assert {"RENTRAIN_ALLOW_CPU", "RENTRAIN_PYTHON", "RENTRAIN_WORKDIR", "HF_TOKEN", "XDG_CONFIG_HOME"} <= names
    table = _section("Environment variables")
    assert sorted(name for name in names if f"`{name}`" not in table) == []


@pytest.fixture
def fake_system(tmp_path: Path) -> Path:
    """A PATH with no ssh client and no rsync, whose apt-get and sudo only record how they were called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("apt-get", "sudo"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/calls"\n')
    (bin_dir / "sudo").write_text((bin_dir / "sudo").read_text() + 'exec "$@"\n')
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    return tmp_path


def _install(system: Path, uid: int, with_sudo: bool = True) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = system / "bin"
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (bin_dir / "id").chmod(0o755)
    if not with_sudo:
        (bin_dir / "sudo").unlink()
    env = {"PATH": str(bin_dir), "HOME": str(system)}
    completed = subprocess.run(["/bin/bash", str(INSTALL_TEST_DEPS)], env=env, capture_output=True, text=True)
    calls = (system / "calls").read_text().splitlines() if (system / "calls").exists() else []
    return completed, calls


def test_install_test_deps_as_root_installs_what_is_missing_without_sudo(fake_system: Path) -> None:
    completed, calls = _install(fake_system, uid=0)
    assert completed.returncode == 0, completed.stderr
    assert calls[0] == "apt-get update -qq"
    assert calls[1].startswith("apt-get install -y") and {"openssh-client", "rsync"} <= set(calls[1].split())


def test_install_test_deps_as_a_user_asks_sudo(fake_system: Path) -> None:
    completed, calls = _install(fake_system, uid=1000)
    assert completed.returncode == 0, completed.stderr
    assert calls[0] == "sudo apt-get update -qq" and calls[2].startswith("sudo apt-get install -y")


def test_install_test_deps_as_a_user_without_sudo_says_what_to_install(fake_system: Path) -> None:
    completed, calls = _install(fake_system, uid=1000, with_sudo=False)
    assert completed.returncode == 1 and calls == []
    assert "not root and no sudo to install" in completed.stderr and "rsync" in completed.stderr


def test_install_test_deps_does_nothing_when_everything_is_there(fake_system: Path) -> None:
    # the machine running the tests has all of them: the test command runs install-test-deps first
    env = {"PATH": f"{fake_system / 'bin'}:{os.environ['PATH']}", "HOME": str(fake_system)}
    completed = subprocess.run(["/bin/bash", str(INSTALL_TEST_DEPS)], env=env, capture_output=True, text=True)
    assert completed.returncode == 0 and not (fake_system / "calls").exists()
