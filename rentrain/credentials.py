"""API keys, looked up in order: the environment, rentrain's credentials file, the provider's own CLI file.

- env: VAST_API_KEY, RUNPOD_API_KEY
- ~/.config/rentrain/credentials.toml (``[vast] api_key = "..."``, ``[runpod] api_key = "..."``); refused
  when group- or world-readable
- Vast's CLI: ~/.config/vastai/vast_api_key (the key alone); RunPod's CLIs: ~/.runpod/config.toml
  (runpodctl writes ``apikey = "..."``, runpod-python ``[default] api_key = "..."``)

A key is never printed, logged or put in an error message; errors name places, not values. A key must be
printable ASCII without spaces (`check_key`): anything else is refused, naming where it came from, before any
request is made. The adapter is told the key's source, so a provider that rejects the key names it too.

The same file holds the notification URLs (`notify_urls`, docs/notifications.md), secrets too.
"""

from __future__ import annotations

import os
import stat
import tomllib
import unicodedata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr

from providers import registry
from providers.base import Provider
from rentrain.paths import config_dir

CREDENTIALS_FILE = "credentials.toml"


# Surrounding ASCII whitespace is dropped (a key file ends with a newline); any other whitespace is refused.
EDGE_WHITESPACE = " \t\r\n"
PRINTABLE_ASCII = range(0x21, 0x7F)


class CredentialsError(Exception):
    pass


class MissingApiKey(CredentialsError):
    """No key for the provider in any of the places: the provider is not configured."""


class ApiKey(BaseModel):
    """A key and where it was found, as the user would name the place (never the key itself)."""

    model_config = ConfigDict(frozen=True)

    value: SecretStr
    source: str


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
    found = [f"the environment variable {env}", f'{credentials_path()} ([{provider}] api_key = "...")']
    cli = provider_cli_path(provider)
    if cli is not None:
        found.append(f"{cli} (written by the {'vastai' if provider == 'vast' else 'runpodctl'} CLI)")
    return found


def load_api_key(provider: str) -> str:
    return find_api_key(provider).value.get_secret_value()


def find_api_key(provider: str) -> ApiKey:
    """The first key found for `provider`, checked (`check_key`), with the place it came from."""
    if not registry.needs_api_key(provider):
        raise CredentialsError(f"{provider} takes no API key")
    env = registry.API_KEY_ENV[provider]
    env_value = os.environ.get(env, "").strip(EDGE_WHITESPACE)
    found = (
        ApiKey(value=SecretStr(env_value), source=f"the environment variable {env}")
        if env_value
        else _from_credentials_file(provider) or _from_provider_cli(provider)
    )
    if found is None:
        where = "\n".join(f"  - {place}" for place in places(provider))
        raise MissingApiKey(f"no {provider} API key found. Put it in one of:\n{where}")
    check_key(provider, found)
    return found


def check_key(provider: str, key: ApiKey) -> None:
    """Refuse a key with whitespace, control, invisible or non-ASCII characters (often pasted from a web page):
    HTTP headers cannot carry them, and such a key is wrong anyway. The message names the place and the
    character, never the key."""
    secret = key.value.get_secret_value()
    for position, char in enumerate(secret, start=1):
        if ord(char) not in PRINTABLE_ASCII:
            raise CredentialsError(
                f"the {provider} API key from {key.source} contains {_describe_char(char)} at character {position} "
                f"of {len(secret)}; API keys are printable ASCII without spaces. Copy the key again, or remove "
                "that character."
            )


def _describe_char(char: str) -> str:
    name = unicodedata.name(char, "a control character")
    return f"U+{ord(char):04X} ({name})"


def _from_credentials_file(provider: str) -> ApiKey | None:
    path = credentials_path()
    if not path.exists():
        return None
    data = _read_private_toml(path)
    section = data.get(provider)
    if isinstance(section, dict) and isinstance(section.get("api_key"), str):
        return _key(section["api_key"], f"{path} ([{provider}] api_key)")
    return None


def _read_private_toml(path: Path) -> dict[str, Any]:
    mode = path.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        raise CredentialsError(
            f"{path} is readable by other users ({stat.filemode(mode)}); it holds secrets (API keys, notification "
            f"URLs). Run:\n  chmod 600 {path}"
        )
    return _read_toml(path)


def notify_urls() -> list[str]:
    """The notification URLs of credentials.toml's top-level ``notify = ["ntfy://...", ...]`` (docs/notifications.md);
    none without the file or the key. Errors name the file and the entry, never a URL: URLs hold secrets."""
    path = credentials_path()
    if not path.exists():
        return []
    urls = _read_private_toml(path).get("notify", [])
    example = 'notify = ["ntfy://my-topic"] at the top of the file, before any [section]'
    if not isinstance(urls, list):
        raise CredentialsError(f"{path}: notify must be a list of URL strings, like {example}")
    for position, url in enumerate(urls, start=1):
        if not isinstance(url, str) or not url.strip():
            raise CredentialsError(f"{path}: notify #{position} is not a URL string; write it like {example}")
    return [url.strip() for url in urls]


def _from_provider_cli(provider: str) -> ApiKey | None:
    path = provider_cli_path(provider)
    if path is None or not path.is_file():
        return None
    if provider == "vast":
        return _key(path.read_text(encoding="utf-8"), str(path))
    data = _read_toml(path)
    for name in ("apikey", "apiKey", "api_key"):
        if isinstance(data.get(name), str) and data[name].strip(EDGE_WHITESPACE):
            return _key(data[name], f"{path} ({name})")
    profile = data.get("default")
    if isinstance(profile, dict) and isinstance(profile.get("api_key"), str):
        return _key(profile["api_key"], f"{path} ([default] api_key)")
    return None


def _key(raw: str, source: str) -> ApiKey | None:
    value = raw.strip(EDGE_WHITESPACE)
    return ApiKey(value=SecretStr(value), source=source) if value else None


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
    """The adapter for `name`, with its key from the user's environment and its base URL override, if any.

    The adapter also gets the key's source, so an AuthError reads "vast rejected the API key from <source> ...".
    """
    if registry.needs_api_key(name) and "api_key" not in kwargs:
        found = find_api_key(name)
        kwargs["api_key"] = found.value.get_secret_value()
        kwargs.setdefault("key_source", found.source)
    return registry.create_provider(name, **kwargs)
