"""`rentrain run` never replaces an earlier result unless --overwrite asks; then it clears that run's files only."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import rentrain.commands.run as run_command
from rentrain.cli import main

REPO = Path(__file__).resolve().parents[2]
EARLIER_RUN = [
    "tiny_toy.safetensors",
    "tiny_toy-000001.safetensors",
    "tiny_toy-000001-state/position.json",
    "samples/tiny_toy-000001.png",
    "events.jsonl",
]
NOT_THE_RUNS = ["notes.txt", "other-000001.safetensors", "samples/other.png"]


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[Path]]:
    """The bundled example with an earlier run's output; the trainer replaced by one that records what it saw."""
    shutil.copytree(REPO / "examples" / "tiny", tmp_path / "tiny", ignore=shutil.ignore_patterns("output"))
    output = tmp_path / "tiny" / "output"
    for name in EARLIER_RUN + NOT_THE_RUNS:
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_text("earlier")
    seen: list[Path] = []

    def trainer(config: Path, output_dir: Path, view: object, resume: object, gpus: int) -> int:
        seen.extend(sorted(p.relative_to(output_dir) for p in output_dir.rglob("*") if p.is_file()))
        return 1

    monkeypatch.setattr(run_command, "ensure_training_stack", lambda gpus: None)
    monkeypatch.setattr(run_command, "run_trainer", trainer)
    return tmp_path / "tiny" / "config.toml", seen


def test_a_second_run_is_refused_and_names_the_option_that_allows_it(example: tuple[Path, list[Path]]) -> None:
    config, seen = example
    result = CliRunner().invoke(main, ["run", "--provider", "local", str(config)], terminal_width=200)
    assert result.exit_code == 1
    assert "already holds tiny_toy" in result.output and "--overwrite" in result.output
    assert seen == []
    assert all((config.parent / "output" / name).exists() for name in EARLIER_RUN)


def test_overwrite_removes_the_earlier_run_and_nothing_else(example: tuple[Path, list[Path]]) -> None:
    config, seen = example
    result = CliRunner().invoke(main, ["run", "--provider", "local", "--overwrite", str(config)], terminal_width=200)
    assert "--overwrite: removed 4 earlier results" in result.output
    assert seen == sorted(Path(name) for name in NOT_THE_RUNS)
