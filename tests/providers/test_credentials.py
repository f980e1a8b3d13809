"""Where API keys come from, in which order, and that they are never shown."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from providers.base import AuthError
from providers.runpod import RunPodProvider
from providers.vast import VastProvider
from rentrain.credentials import CredentialsError, credentials_path, load_api_key, open_provider, save_api_key

KEY = "vk-SECRET-credtest-0042"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_environment_wins(monkeypatch):
    monkeypatch.setenv("VAST_API_KEY", KEY)
    write(credentials_path(), '[vast]\napi_key = "from-file"\n')
    assert load_api_key("vast") == KEY


def test_credentials_file(monkeypatch):
    write(credentials_path(), '[vast]\napi_key = "vast-from-file"\n[runpod]\napi_key = "runpod-from-file"\n')
    assert load_api_key("vast") == "vast-from-file"
    assert load_api_key("runpod") == "runpod-from-file"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_readable_credentials_file_is_refused_with_the_chmod(mode):
    path = write(credentials_path(), f'[vast]\napi_key = "{KEY}"\n', mode)
    with pytest.raises(CredentialsError) as caught:
        load_api_key("vast")
    assert f"chmod 600 {path}" in str(caught.value)
    assert KEY not in str(caught.value)


def test_vast_cli_key_file():
    write(Path.home() / ".config" / "vastai" / "vast_api_key", f"{KEY}\n")
    assert load_api_key("vast") == KEY


@pytest.mark.parametrize(
    "text", ['apikey = "rp-key-1"\napiurl = "https://api.runpod.io/graphql"\n', '[default]\napi_key = "rp-key-1"\n']
)
def test_runpod_cli_config(text):
    write(Path.home() / ".runpod" / "config.toml", text)
    assert load_api_key("runpod") == "rp-key-1"


def test_rentrain_file_wins_over_provider_cli_files():
    write(credentials_path(), '[runpod]\napi_key = "ours"\n')
    write(Path.home() / ".runpod" / "config.toml", 'apikey = "theirs"\n')
    assert load_api_key("runpod") == "ours"


@pytest.mark.parametrize(
    ("provider", "env", "cli_file"),
    [("vast", "VAST_API_KEY", "vastai/vast_api_key"), ("runpod", "RUNPOD_API_KEY", ".runpod/config.toml")],
)
def test_missing_key_names_all_three_places(provider, env, cli_file):
    with pytest.raises(CredentialsError) as caught:
        load_api_key(provider)
    message = str(caught.value)
    assert env in message
    assert str(credentials_path()) in message
    assert cli_file in message


def test_broken_toml_does_not_quote_the_file(monkeypatch):
    write(credentials_path(), f'[vast]\napi_key = "{KEY}\n')  # unterminated string: the parser would quote it
    with pytest.raises(CredentialsError) as caught:
        load_api_key("vast")
    assert KEY not in str(caught.value)


def test_save_writes_0600_and_keeps_other_providers():
    write(credentials_path(), '[runpod]\napi_key = "rp"\n')
    path = save_api_key("vast", KEY)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_api_key("vast") == KEY and load_api_key("runpod") == "rp"


def test_open_provider_uses_key_and_base_url_override(monkeypatch):
    monkeypatch.setenv("VAST_API_KEY", KEY)
    monkeypatch.setenv("RENTRAIN_VAST_URL", "http://127.0.0.1:8765/api/v0")
    monkeypatch.setenv("RUNPOD_API_KEY", "rp")
    monkeypatch.setenv("RENTRAIN_RUNPOD_URL", "http://127.0.0.1:8766")
    vast = open_provider("vast")
    runpod = open_provider("runpod")
    assert isinstance(vast, VastProvider) and vast.base_url == "http://127.0.0.1:8765/api/v0"
    assert isinstance(runpod, RunPodProvider) and runpod.base_url == "http://127.0.0.1:8766"
    assert KEY not in repr(vast) and KEY not in repr(vars(vast))


def test_open_provider_gpuflow_needs_no_key():
    assert open_provider("gpuflow").info.can_provision is False


@pytest.mark.parametrize(
    ("char", "described"),
    [
        ("\u200b", "U+200B (ZERO WIDTH SPACE)"),
        (" ", "U+0020 (SPACE)"),
        ("\u00a0", "U+00A0 (NO-BREAK SPACE)"),
        ("\x07", "U+0007 (a control character)"),
        ("é", "U+00E9 (LATIN SMALL LETTER E WITH ACUTE)"),
    ],
)
def test_a_key_with_an_invisible_or_non_ascii_character_is_refused_naming_the_variable(monkeypatch, char, described):
    monkeypatch.setenv("VAST_API_KEY", KEY[:9] + char + KEY[9:])
    with pytest.raises(CredentialsError) as caught:
        open_provider("vast")  # refused before any request: no HTTP mock is needed
    message = str(caught.value)
    assert "the environment variable VAST_API_KEY" in message
    assert f"{described} at character 10 of {len(KEY) + 1}" in message
    assert KEY[:9] not in message and KEY[9:] not in message


def test_a_key_with_an_invisible_character_is_refused_naming_the_file():
    path = write(credentials_path(), '[runpod]\napi_key = "rp-key\u200b-1"\n')
    with pytest.raises(CredentialsError, match="U\\+200B") as caught:
        load_api_key("runpod")
    assert f"{path} ([runpod] api_key)" in str(caught.value)
    cli_file = write(Path.home() / ".config" / "vastai" / "vast_api_key", "vk-1\u00a0\n")
    with pytest.raises(CredentialsError, match="U\\+00A0") as caught:
        load_api_key("vast")
    assert str(cli_file) in str(caught.value)


def test_surrounding_ascii_whitespace_is_not_part_of_the_key(monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", "  rp-key-1\n")
    assert load_api_key("runpod") == "rp-key-1"


@pytest.mark.parametrize(
    ("setup", "source"),
    [
        (lambda mp: mp.setenv("VAST_API_KEY", KEY), "the environment variable VAST_API_KEY"),
        (
            lambda mp: write(credentials_path(), f'[vast]\napi_key = "{KEY}"\n'),
            "{config}/rentrain/credentials.toml ([vast] api_key)",
        ),
        (lambda mp: write(Path.home() / ".config" / "vastai" / "vast_api_key", KEY), "{config}/vastai/vast_api_key"),
    ],
)
def test_a_rejected_key_names_the_place_it_came_from(monkeypatch, setup, source):
    import responses

    setup(monkeypatch)
    monkeypatch.setenv("RENTRAIN_VAST_URL", "https://vast.test/api/v0")
    expected = source.format(config=os.environ["XDG_CONFIG_HOME"])
    with responses.RequestsMock() as mocked:
        mocked.add(
            responses.GET,
            "https://vast.test/api/v1/instances/",
            status=401,
            json={"success": False, "error": "auth_error", "msg": "Invalid user key"},
        )
        with pytest.raises(AuthError) as caught:
            open_provider("vast").list_instances()
    assert str(caught.value) == f"vast rejected the API key from {expected} (HTTP 401): auth_error: Invalid user key"
    assert KEY not in str(caught.value)
