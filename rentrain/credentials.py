"""API keys, looked up in order: the environment, rentrain's credentials file, the provider's own CLI file.

- env: VAST_API_KEY, RUNPOD_API_KEY
- ~/.config/rentrain/credentials.toml (``[vast] api_key = "..."``, ``[runpod] api_key = "..."``); refused
  when group- or world-readable
- Vast's CLI: ~/.config/vastai/vast_api_key (the key alone); RunPod's CLIs: ~/.runpod/config.toml
  (runpodctl writes ``apikey = "..."``, runpod-python ``[default] api_key = "..."``)

A key is never printed, logged or put in an error message; errors name places, not values.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from providers import registry
from providers.base import Provider
from rentrain.paths import config_dir

CREDENTIALS_FILE = "credentials.toml"


class CredentialsError(Exception):
    pass


def credentials_path() -> Path:
    return config_dir() / CREDENTIALS_FILE


def provider_cli_path(provider: str) -> Path | None:
    home = Path.home()
    if provider == "vast":
        base = os.environ.get("XDG_CONFIG_HOME") or str(home / ".config")
        return Path(base) / "vastai" / "vast_api_key"
    if provider == "runpod":
        return home / ".runpod" / "config.toml"
    return None


def places(provider: str) -> list[str]:
    """Where a key for `provider` is looked for, in order, as the user would write them."""
    env = registry.API_KEY_ENV[provider]
    found = [f"the environment variable {env}", f"{credentials_path()} ([{provider}] api_key = \"...\")"]
    cli = provider_cli_path(provider)
    if cli is not None:
        found.append(f"{cli} (written by the {'vastai' if provider == 'vast' else 'runpodctl'} CLI)")
    return found


def load_api_key(provider: str) -> str:
    if not registry.needs_api_key(provider):
        raise CredentialsError(f"{provider} takes no API key")
    env_value = os.environ.get(registry.API_KEY_ENV[provider], "").strip()
    if env_value:
        return env_value
    key = _from_credentials_file(provider) or _from_provider_cli(provider)
    if key:
        return key
    where = "\n".join(f"  - {place}" for place in places(provider))
    raise CredentialsError(f"no {provider} API key found. Put it in one of:\n{where}")


def _from_credentials_file(provider: str) -> str | None:
    path = credentials_path()
    if not path.exists():
        return None
    mode = path.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        raise CredentialsError(
            f"{path} is readable by other users ({stat.filemode(mode)}); it holds API keys. Run:\n  chmod 600 {path}"
        )
    data = _read_toml(path)
    section = data.get(provider)
    if isinstance(section, dict) and isinstance(section.get("api_key"), str):
        return section["api_key"].strip() or None
    return None


def _from_provider_cli(provider: str) -> str | None:
    path = provider_cli_path(provider)
    if path is None or not path.is_file():
        return None
    if provider == "vast":
        return path.read_text(encoding="utf-8").strip() or None
    data = _read_toml(path)
    for name in ("apikey", "apiKey", "api_key"):
        if isinstance(data.get(name), str) and data[name].strip():
            return data[name].strip()
    profile = data.get("default")
    if isinstance(profile, dict) and isinstance(profile.get("api_key"), str):
        return profile["api_key"].strip() or None
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        # the parser's message quotes the offending line, which may be the key itself
        raise CredentialsError(f"{path} is not valid TOML") from None


def save_api_key(provider: str, key: str) -> Path:
    """Write (or replace) one provider's key in credentials.toml, created 0600."""
    import tomli_w

    path = credentials_path()
    data: dict[str, Any] = _read_toml(path) if path.exists() else {}
    data[provider] = {**(data.get(provider) or {}), "api_key": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        tomli_w.dump(data, handle)
    return path


def open_provider(name: str, **kwargs: Any) -> Provider:
    """The adapter for `name`, with its key from the user's environment and its base URL override, if any."""
    if registry.needs_api_key(name):
        kwargs.setdefault("api_key", load_api_key(name))
    return registry.create_provider(name, **kwargs)
