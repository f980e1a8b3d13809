"""The optimizer-argument table that `rentrain check` uses without torch matches the real constructors."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from remote.trainer.optimizer_args import ACCEPTED_ARGS, optimizer_arg_problem


def _constructors() -> dict[str, type]:
    import bitsandbytes as bnb
    import torch
    from lion_pytorch import Lion
    from prodigyopt import Prodigy
    from transformers.optimization import Adafactor

    return {
        "adamw": torch.optim.AdamW,
        "adamw8bit": bnb.optim.AdamW8bit,
        "lion": Lion,
        "lion8bit": bnb.optim.Lion8bit,
        "prodigy": Prodigy,
        "adafactor": Adafactor,
    }


@pytest.mark.parametrize("name", sorted(ACCEPTED_ARGS))
def test_table_matches_the_constructor(name: str) -> None:
    parameters = inspect.signature(_constructors()[name].__init__).parameters.values()
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    assert ACCEPTED_ARGS[name] == {p.name for p in parameters} - {"self", "params", "lr"}


def test_every_configurable_optimizer_has_a_row() -> None:
    from remote.config import OPTIMIZERS

    assert {name.lower() for name in OPTIMIZERS} == set(ACCEPTED_ARGS)


@pytest.mark.parametrize(
    ("optimizer", "item", "problem"),
    [
        ("AdamW", "weight_decay=0.01", None),
        ("AdamW", "betas=0.9,0.99", None),
        ("Prodigy", "decouple=True", None),
        ("Prodigy", "d_coef=2", None),
        ("Adafactor", "relative_step=false", None),
        ("AdamW", "decouple=True", "AdamW takes no argument 'decouple'"),
        ("AdamW", "lr=1", "set learning_rate"),
        ("AdamW", "eps=inf", "must be a finite number"),
        ("AdamW", "betas=0.9,nan", "must be a finite number"),
        ("AdamW", "weight_decay=", "must be a finite number"),
        ("AdamW", "=1", "expected name=value"),
    ],
)
def test_argument_problems(optimizer: str, item: str, problem: str | None) -> None:
    found = optimizer_arg_problem(optimizer, item)
    assert (found is None) if problem is None else (problem in (found or "")), found


def test_the_check_imports_no_torch() -> None:
    code = "import sys, remote.config; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
