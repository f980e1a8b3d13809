"""`rentrain run A B C`: every config checked before anything is asked of a provider; a plan that cannot fit the
budget or the deadline is refused with nothing rented."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import responses
from click.testing import CliRunner

from rentrain.cli import main

REPO = Path(__file__).resolve().parents[2]
VAST_OFFERS = "https://console.vast.ai/api/v0/bundles/"


def _example(folder: Path, output_name: str) -> Path:
    shutil.copytree(REPO / "examples" / "tiny", folder, ignore=shutil.ignore_patterns("output"))
    config = folder / "config.toml"
    text = config.read_text()
    config.write_text(text.replace('output_name = "tiny_toy"', f'output_name = "{output_name}"'))
    return config


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["run", *args], terminal_width=200)
    return result.exit_code, result.output


@responses.activate
def test_every_configs_problem_is_named_at_once_and_nothing_is_asked_of_a_provider(tmp_path: Path) -> None:
    good = _example(tmp_path / "good", "good")
    typo = _example(tmp_path / "typo", "typo")
    typo.write_text(typo.read_text().replace("learning_rate", "learning_rat"))
    empty = _example(tmp_path / "empty", "empty")
    for image in (tmp_path / "empty").rglob("*.png"):
        image.unlink()
    code, output = _run(str(good), str(typo), str(empty), "--provider", "vast", "--yes")
    assert code == 2
    assert "learning_rat" in output and str(empty) in output
    assert "2 of the queue's 3 configs have problems; nothing was rented" in output
    assert len(responses.calls) == 0


@responses.activate
def test_two_jobs_writing_the_same_files_are_refused(tmp_path: Path) -> None:
    first = _example(tmp_path / "a", "same")
    second = tmp_path / "a" / "copy.toml"
    second.write_text(first.read_text())
    code, output = _run(str(first), str(second), "--provider", "vast", "--yes")
    assert code == 2
    assert "both write same.safetensors" in output
    assert len(responses.calls) == 0


def test_a_queue_file_names_its_missing_config_and_line(tmp_path: Path) -> None:
    queue = tmp_path / "night.txt"
    queue.write_text("# tonight\n\nmissing.toml\n")
    code, output = _run(str(queue), "--provider", "vast")
    assert code == 2
    assert f"{queue}, line 3: no config file 'missing.toml'" in output


def test_a_queue_needs_a_rented_provider(tmp_path: Path) -> None:
    configs = [_example(tmp_path / name, name) for name in ("a", "b")]
    code, output = _run(*map(str, configs), "--provider", "local")
    assert code == 2
    assert "a queue runs on rented instances" in output


def test_parallel_needs_a_queue(tmp_path: Path) -> None:
    code, output = _run(str(_example(tmp_path / "a", "a")), "--provider", "local", "--parallel", "2")
    assert code == 2 and "--parallel spreads a queue" in output


def _vast_offer() -> dict[str, object]:
    return {
        "id": 7001,
        "ask_contract_id": 7001,
        "gpu_name": "RTX 4090",
        "num_gpus": 1,
        "gpu_ram": 24564,
        "dph_total": 0.40,
        "reliability2": 0.995,
        "inet_down": 800.0,
        "geolocation": "Norway, NO",
        "verified": True,
        "cuda_max_good": 12.8,
        "rentable": True,
    }


@pytest.mark.parametrize(
    ("option", "refusal"),
    [
        (["--max-cost", "0.01"], "is above the budget $0.01; nothing was rented"),
        (["--deadline", "IN_5_MINUTES"], "after the deadline"),
    ],
)
@responses.activate
def test_a_plan_that_cannot_fit_is_refused_before_renting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: list[str], refusal: str
) -> None:
    monkeypatch.setenv("VAST_API_KEY", "k" * 64)
    responses.add(responses.POST, VAST_OFFERS, json={"offers": [_vast_offer()]})
    responses.add(responses.PUT, VAST_OFFERS, json={"offers": [_vast_offer()]})
    configs = [_example(tmp_path / name, name) for name in ("a", "b")]
    soon = time.strftime("%Y-%m-%d %H:%M", time.localtime(time.time() + 300))  # now, not when tests were collected
    option = [soon if value == "IN_5_MINUTES" else value for value in option]
    code, output = _run(*map(str, configs), "--provider", "vast", "--yes", *option)
    assert code == 1, output
    assert refusal in output
    assert all(call.request.url.startswith(VAST_OFFERS) for call in responses.calls), "nothing but the search"
