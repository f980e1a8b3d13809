"""Each default the user can set is declared once, in the config's [rentrain] table (remote.config.JobSettings): the
job runner's settings take theirs from it, and the offer requirements are always built from it."""

from __future__ import annotations

from providers.base import Requirements
from remote.config import JobSettings
from rentrain.job import RunSettings
from rentrain.offers import requirements_from

# field -> the [rentrain] key it carries
RUN_SETTINGS_KEYS = {
    "max_cost": "max_cost",
    "max_hours": "max_hours",
    "idle_timeout_minutes": "idle_timeout_minutes",
    "max_offers": "max_offers",
    "max_retries": "max_retries",
    "image": "image",
    "disk_gb": "disk_gb",
    "gpus": "gpu_count",
}
REQUIREMENT_KEYS = {
    "gpu_count": "gpu_count",
    "min_vram_gb": "min_vram_gb",
    "min_reliability": "min_reliability",
    "min_cuda": "min_cuda",
    "verified_only": "verified_only",
    "include_interruptible": "include_interruptible",
    "max_price_per_hour": "max_price_per_hour",
    "gpu_models": "gpu",
    "disk_gb": "disk_gb",
}


def test_run_settings_built_with_no_arguments_are_the_rentrain_tables_defaults() -> None:
    settings, table = RunSettings(provider="vast"), JobSettings()
    assert {field: getattr(settings, field) for field in RUN_SETTINGS_KEYS} == {
        field: getattr(table, key) for field, key in RUN_SETTINGS_KEYS.items()
    }


def test_every_run_setting_named_like_a_rentrain_key_is_one_of_them() -> None:
    shared = (set(RunSettings.model_fields) & set(JobSettings.model_fields)) - {"provider"}  # required in a run
    assert shared <= set(RUN_SETTINGS_KEYS)


def test_requirements_declare_no_default_of_their_own_for_what_the_user_sets() -> None:
    assert all(Requirements.model_fields[field].is_required() for field in REQUIREMENT_KEYS)
    assert set(REQUIREMENT_KEYS) | {"min_download_mbps"} == set(Requirements.model_fields)


def test_requirements_without_a_config_are_the_rentrain_tables_defaults() -> None:
    requirements, table = requirements_from(), JobSettings()
    assert {field: getattr(requirements, field) for field in REQUIREMENT_KEYS} == {
        field: getattr(table, key) for field, key in REQUIREMENT_KEYS.items()
    }
