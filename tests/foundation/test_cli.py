"""`rentrain check` and `rentrain init` through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from rentrain.cli import main
from tests.foundation.helpers import TUTORIAL_CONFIG, make_dataset, write_config

REPO = Path(__file__).resolve().parents[2]


def test_check_passes_the_tutorial_and_prints_steps(tmp_path: Path) -> None:
    make_dataset(tmp_path / "dataset", [(512, 512)] * 30)
    config = write_config(tmp_path, TUTORIAL_CONFIG)
    result = CliRunner().invoke(main, ["check", str(config)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "= 1500 steps" in result.output
    assert "OK: ready to train." in result.output
    assert "caption_extension" in result.output and ".txt  (default)" in result.output


def test_check_json_is_machine_readable(tmp_path: Path) -> None:
    make_dataset(tmp_path / "dataset", [(512, 512)] * 30)
    config = write_config(tmp_path, TUTORIAL_CONFIG)
    result = CliRunner().invoke(main, ["check", "--json", str(config)])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["ok"] is True
    assert data["dataset"]["step_plan"]["total_steps"] == 1500
    assert data["config"]["batch_size"] == 2
    assert data["model_source"] == "hub"


def test_check_exits_2_on_config_error_and_names_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, TUTORIAL_CONFIG.replace("learning_rate", "learning_rat"))
    result = CliRunner().invoke(main, ["check", str(config)], terminal_width=200)
    assert result.exit_code == 2
    assert "learning_rat: unknown key in [training]; did you mean learning_rate?" in result.output
    as_json = CliRunner().invoke(main, ["check", "--json", str(config)])
    assert as_json.exit_code == 2
    assert json.loads(as_json.output)["config_errors"] == [
        "learning_rat: unknown key in [training]; did you mean learning_rate?"
    ]


def test_check_exits_2_on_dataset_error(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "dataset", [(512, 512)] * 20)
    (folder / "broken.png").write_bytes(b"nope")
    config = write_config(tmp_path, TUTORIAL_CONFIG)
    result = CliRunner().invoke(main, ["check", str(config)], terminal_width=300)
    assert result.exit_code == 2
    assert "broken.png: cannot be decoded as an image" in result.output


def test_bundled_example_passes_check_as_installed_command() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "rentrain", "check", str(REPO / "examples" / "tiny" / "config.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "OK: ready to train." in completed.stdout


def test_init_writes_a_config_that_loads_and_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "job"
    result = CliRunner().invoke(main, ["init", str(target), "--trigger", "zed", "--repeats", "8"])
    assert result.exit_code == 0, result.output
    assert (target / "dataset" / "8_zed").is_dir()
    # Empty dataset: the config itself is valid, the dataset is reported as empty.
    check = CliRunner().invoke(main, ["check", "--json", str(target / "config.toml")])
    data = json.loads(check.output)
    assert data["config_errors"] == []
    assert data["config"]["output_name"] == "zed"
    assert any("no training images found" in f["message"] for f in data["dataset"]["findings"])
    before = (target / "config.toml").read_text()
    again = CliRunner().invoke(main, ["init", str(target)])
    assert again.exit_code != 0 and "never overwrites" in again.output
    assert (target / "config.toml").read_text() == before


def test_init_sdxl_starter_loads(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["init", str(tmp_path), "--sdxl"])
    assert result.exit_code == 0
    data = json.loads(CliRunner().invoke(main, ["check", "--json", str(tmp_path / "config.toml")]).output)
    assert data["config_errors"] == []
    assert data["config"]["sdxl"] is True and data["config"]["resolution"] == [1024, 1024]
    assert data["config"]["text_encoder_lr"] == 0


def test_the_cli_never_imports_torch() -> None:
    code = (
        "import sys, rentrain.cli, rentrain.commands.check, rentrain.commands.run, rentrain.progress; "
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules); "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_core_dependencies_exclude_the_training_stack() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    for heavy in ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes"):
        assert heavy not in core
        assert any(heavy in dep for dep in project["optional-dependencies"]["train"])
