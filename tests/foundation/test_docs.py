"""README's config reference is generated from the schema; this fails when someone forgets to regenerate."""

from __future__ import annotations

from pathlib import Path

from remote.config import JobSettings, TrainConfig
from rentrain.config_docs import config_reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_reference_is_current() -> None:
    assert config_reference() in README.read_text(encoding="utf-8"), (
        "README.md's config reference is stale: run python -m rentrain.config_docs --write README.md"
    )


def test_every_key_is_described() -> None:
    for model in (TrainConfig, JobSettings):
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"
