"""The declared versions are the tested ones: the suite runs with the lock, the floors are the locked versions,
and the default image's torch is the torch floor (docs/tested-versions.md)."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType

from packaging.requirements import Requirement

from remote.config import JobSettings
from rentrain.job import RunSettings

REPO = Path(__file__).resolve().parents[2]


def _lock_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lock_requirements", REPO / "scripts" / "lock_requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = project["dependencies"] + [line for extra in project["optional-dependencies"].values() for line in extra]
    return [Requirement(line) for line in lines]


def _floor(requirement: Requirement) -> str:
    floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    assert len(floors) == 1, f"{requirement}: one >= floor, the tested version"
    return floors[0]


def test_the_tests_run_with_exactly_the_locked_versions() -> None:
    # fails when this venv was installed without `-c constraints.txt`, or when a lock is stale
    assert _lock_script().main(["--check"]) == 0


def test_every_floor_is_the_version_the_tests_run_with() -> None:
    lock = _lock_script()
    pins = lock.read_lock(lock.CONSTRAINTS)
    wrong = {}
    for requirement in _declared():
        if requirement.name == "torch":
            continue
        name = lock.normalized(requirement.name)
        tested = pins.get(name) or md.version(name)  # triton: the test extra's, not locked (torch pins its own)
        if _floor(requirement) != tested:
            wrong[requirement.name] = (_floor(requirement), tested)
    assert wrong == {}, "name: (floor, tested)"


def test_the_remote_lock_is_the_local_one_less_what_the_instance_does_not_need() -> None:
    lock = _lock_script()
    local, remote = lock.read_lock(lock.CONSTRAINTS), lock.read_lock(lock.REMOTE_LOCK)
    assert remote.items() <= local.items()
    assert {"diffusers", "transformers", "accelerate", "peft", "safetensors", "huggingface-hub"} <= remote.keys()
    assert "torch" not in remote


def test_the_default_image_carries_the_torch_floor() -> None:
    image = JobSettings.model_fields["image"].default
    assert RunSettings.model_fields["image"].default == image
    found = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", image)
    assert found, image
    torch = next(requirement for requirement in _declared() if requirement.name == "torch")
    assert _floor(torch) == found.group(1)
