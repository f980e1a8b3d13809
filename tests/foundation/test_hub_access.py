"""`rentrain check` asks the Hugging Face Hub, before anything is rented, whether this machine's token can read the
gated repos a Flux.1 job downloads (FLUX.1 [dev]); the token is sent to huggingface.co only and never printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import responses
from click.testing import CliRunner

from rentrain.cli import main
from rentrain.hub_access import token_for_download
from tests.foundation.helpers import write_captioned

TOKEN = "hf_secretTOKEN123"
DEV = "black-forest-labs/FLUX.1-dev"
SCHNELL = "black-forest-labs/FLUX.1-schnell"
T5_URL = "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"


def auth_check(repo: str) -> str:
    return f"https://huggingface.co/api/models/{repo}/auth-check"


@pytest.fixture(autouse=True)
def no_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def flux_job(tmp_path: Path, model: str = DEV, extra: str = "") -> Path:
    write_captioned(tmp_path / "dataset" / "2_zed", "a", (64, 64), (200, 10, 10), "zed")
    config = tmp_path / "config.toml"
    config.write_text(
        f'pretrained_model_name_or_path = "{model}"\nnetwork_module = "networks.lora_flux"\n'
        "network_train_unet_only = true\n"
        f'train_data_dir = "dataset"\nresolution = 64\nmax_train_epochs = 1\nlearning_rate = 1e-4\n{extra}'
    )
    return config


def check(config: Path, *options: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["check", *options, str(config)])
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


@responses.activate
def test_without_a_token_dev_is_refused_with_how_to_accept_the_license(tmp_path: Path) -> None:
    responses.get(auth_check(DEV), status=401)
    code, out = check(flux_job(tmp_path))
    assert code == 2
    assert f"{DEV} is gated or private and no Hugging Face token was found" in out
    assert f"https://huggingface.co/{DEV}" in out and "Agree and access repository" in out
    assert "Authorization" not in responses.calls[0].request.headers


@responses.activate
def test_a_token_without_access_is_refused_and_never_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    responses.get(auth_check(DEV), status=403, headers={"X-Error-Code": "GatedRepo"})
    config = flux_job(tmp_path)
    code, out = check(config)
    json_code, json_out = check(config, "--json")
    assert (code, json_code) == (2, 2)
    assert "is gated and this token's account has no access yet" in out and "Agree and access repository" in out
    assert json.loads(json_out)["model_access"][0]["severity"] == "error"
    assert TOKEN not in out + json_out
    assert responses.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"


@responses.activate
def test_the_saved_login_token_is_used_and_access_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "hf-home"
    home.mkdir()
    (home / "token").write_text(TOKEN + "\n")
    responses.get(auth_check(DEV), status=200)
    responses.get(auth_check("comfyanonymous/flux_text_encoders"), status=200)
    code, out = check(flux_job(tmp_path, extra=f't5xxl = "{T5_URL}"\n'))
    assert code == 0, out
    assert [call.request.headers["Authorization"] for call in responses.calls] == [f"Bearer {TOKEN}"] * 2
    assert TOKEN not in out


@responses.activate
def test_schnell_needs_no_token(tmp_path: Path) -> None:
    responses.get(auth_check(SCHNELL), status=200)
    code, out = check(flux_job(tmp_path, model=SCHNELL))
    assert code == 0, out
    assert len(responses.calls) == 1


@responses.activate
def test_an_unreachable_hub_is_a_warning(tmp_path: Path) -> None:
    code, out = check(flux_job(tmp_path))  # no response registered: the request fails to connect
    assert code == 0, out
    assert f"could not ask huggingface.co whether {DEV} can be downloaded" in out


@responses.activate
def test_sd_configs_and_builtin_models_ask_nothing(tmp_path: Path) -> None:
    config = flux_job(tmp_path, model="builtin:tiny-flux")
    assert check(config)[0] == 0
    sd = tmp_path / "sd.toml"
    sd.write_text(
        'pretrained_model_name_or_path = "stabilityai/stable-diffusion-xl-base-1.0"\ntrain_data_dir = "dataset"\n'
        "resolution = 64\nmax_train_epochs = 1\nlearning_rate = 1e-4\n"
    )
    assert check(sd)[0] == 0
    assert len(responses.calls) == 0


@responses.activate
def test_the_token_goes_to_the_instance_only_for_a_repo_an_anonymous_download_cannot_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    check = "https://huggingface.co/api/models/{}/auth-check"
    responses.get(check.format("black-forest-labs/FLUX.1-dev"), status=401)  # gated
    responses.get(check.format("comfyanonymous/flux_text_encoders"), status=200)  # public
    responses.get(check.format("black-forest-labs/FLUX.1-schnell"), status=200)
    t5 = "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"
    assert token_for_download(["black-forest-labs/FLUX.1-dev", t5]) == TOKEN
    assert token_for_download(["black-forest-labs/FLUX.1-schnell", t5]) is None  # all public: none sent
    assert token_for_download(["builtin:tiny-sd15"]) is None
    assert token_for_download(["", "https://civitai.com/api/download/models/1234"]) is None  # not its host
    assert all(call.request.headers.get("Authorization") is None for call in responses.calls)  # asked anonymously
    monkeypatch.delenv("HF_TOKEN")
    assert token_for_download(["black-forest-labs/FLUX.1-dev"]) is None  # none here: the instance's own, if any
