"""The config a job trains with: its file's, with the training keys its settings change.

A job keeps the path of the user's config file (JobRecord.config_path); `rentrain continue` trains with more
epochs and its own output_name, which it records in RunSettings.train_overrides. Every command that loads a
job's config (run, attach, a queue's attach) goes through here, so the job trains with the same config
whichever client follows it.
"""

from __future__ import annotations

from typing import Any

from remote.config import ConfigError, ConfigIssue, LoadedConfig, TrainConfig, _validate, load_config
from rentrain.ledger import JobRecord, settings_of


def with_train_overrides(loaded: LoadedConfig, overrides: dict[str, Any]) -> LoadedConfig:
    """`loaded` with these training keys changed, validated as the file's keys are (ConfigError names the key)."""
    if not overrides:
        return loaded
    issues: list[ConfigIssue] = []
    values = loaded.train.model_dump() | overrides
    train = _validate(TrainConfig, values, {}, loaded.key_sections, issues, set())
    if train is None:
        raise ConfigError(loaded.path, issues)
    return loaded.model_copy(update={"train": train})


def job_config(job: JobRecord) -> LoadedConfig:
    """The config `job` trains with (ConfigError when its file can no longer be read or no longer fits)."""
    overrides: dict[str, Any] = settings_of(job).get("train_overrides", {})
    return with_train_overrides(load_config(job.config_path), overrides)
