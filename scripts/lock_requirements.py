"""Write the lock files from this environment, at the versions installed here:

- constraints.txt: every package installed here except rentrain itself and torch (README's commands and CI
  install with `-c constraints.txt`, so the tests run with exactly this set);
- remote/requirements.txt: what the rented machine needs, the `train` extra and the remote side's packages with
  everything they pull in, less torch and torch's own dependencies (the image keeps its own).

Run it in a venv where the whole test command passed (docs/tested-versions.md):

    .venv/bin/python scripts/lock_requirements.py          # rewrites both files
    .venv/bin/python scripts/lock_requirements.py --check  # exit 1 when either differs from this venv
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"
REMOTE_LOCK = REPO / "remote" / "requirements.txt"
KEPT_AS_THE_IMAGE_HAS_IT = "torch"
# triton: a CUDA build of torch pins its own (the test extra installs it only where torch's CPU build lacks it)
NOT_LOCKED = {"rentrain", KEPT_AS_THE_IMAGE_HAS_IT, "triton", "pip", "setuptools", "wheel"}
# the remote side's own imports beyond the trainer's stack (remote/config.py, remote/dataset.py)
REMOTE_ROOTS = ["pydantic", "pillow"]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def direct_requirements(name: str) -> list[str]:
    names = []
    for line in md.requires(name) or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.append(normalized(requirement.name))
    return names


def closure(roots: list[str], leave_out: frozenset[str] = frozenset()) -> set[str]:
    found: set[str] = set()
    pending = [normalized(root) for root in roots]
    while pending:
        name = pending.pop()
        if name in found or name in leave_out:
            continue
        found.add(name)
        pending += direct_requirements(name)
    return found


def train_extra() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(line).name for line in project["optional-dependencies"]["train"]]


def locked_names() -> list[str]:
    """The packages the lock must pin: the train extra's closure and the remote side's, without torch's."""
    torch_side = closure([KEPT_AS_THE_IMAGE_HAS_IT])
    return sorted(closure(train_extra() + REMOTE_ROOTS, leave_out=frozenset(torch_side)))


def installed_names() -> list[str]:
    names = {normalized(dist.metadata["Name"]) for dist in md.distributions()}
    return sorted(names - NOT_LOCKED)


def read_lock(path: Path) -> dict[str, str]:
    """name -> pinned version, from a lock's `name==version` lines."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        spec = line.split("#")[0].strip()
        if spec:
            name, _, version = spec.partition("==")
            pins[normalized(name)] = version.strip()
    return pins


def lock_text(path: Path, names: list[str]) -> str:
    """The file as it should be: its comment lines as they are, then one pin per package."""
    comments = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if line.startswith("#")]
    return "".join(comments) + "".join(f"{name}=={md.version(name)}\n" for name in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    stale = []
    for path, names in ((CONSTRAINTS, installed_names()), (REMOTE_LOCK, locked_names())):
        text = lock_text(path, names)
        if not args.check:
            path.write_text(text, encoding="utf-8")
        elif path.read_text(encoding="utf-8") != text:
            stale.append(path.relative_to(REPO))
    for path in stale:
        print(
            f"{path} differs from the versions installed here: install with -c constraints.txt, or run "
            "scripts/lock_requirements.py once the whole test command passes",
            file=sys.stderr,
        )
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
