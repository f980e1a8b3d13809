"""Flux.1's separate files (ae, clip_l, t5xxl): URLs are fetched on the instance beside the base model, local files
are uploaded there, and the instance's config points at where they land."""

from __future__ import annotations

import io
import shlex
import tomllib
import urllib.request
from pathlib import Path

import pytest

from remote import fetch_model
from remote.config import TrainConfig
from rentrain.remote_job import RemoteLayout, bootstrap_command, remote_train_config

T5_URL = "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors?download=1"
AE_URL = "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/ae.safetensors"


class FakeResponse(io.BytesIO):
    status = 200


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> list[urllib.request.Request]:
    """Every request fetch_model makes, each answered with the URL's own bytes."""
    requests: list[urllib.request.Request] = []

    def urlopen(request: urllib.request.Request, timeout: float) -> FakeResponse:
        requests.append(request)
        return FakeResponse(request.full_url.encode())

    monkeypatch.setattr(fetch_model.urllib.request, "urlopen", urlopen)
    return requests


def test_each_part_is_fetched_into_its_folder_and_no_base_model_when_none_is_given(
    tmp_path: Path, downloads: list[urllib.request.Request], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    code = fetch_model.main(["fetch_model.py", "", str(tmp_path), f"t5xxl={T5_URL}", f"ae={AE_URL}"])
    assert code == 0
    assert (tmp_path / "t5xxl" / "t5xxl_fp16.safetensors").read_bytes() == T5_URL.encode()
    assert (tmp_path / "ae" / "ae.safetensors").read_bytes() == AE_URL.encode()
    assert [r.full_url for r in downloads] == [T5_URL, AE_URL]  # nothing else: no base model
    assert all(r.unredirected_hdrs["Authorization"] == "Bearer hf_secret" for r in downloads)


def test_the_base_model_url_and_the_parts_are_fetched_together(
    tmp_path: Path, downloads: list[urllib.request.Request]
) -> None:
    model = "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors"
    assert fetch_model.main(["fetch_model.py", model, str(tmp_path), f"ae={AE_URL}"]) == 0
    assert (tmp_path / "flux1-dev.safetensors").is_file() and (tmp_path / "ae" / "ae.safetensors").is_file()


@pytest.mark.parametrize("argument", ["vae=https://x/v.safetensors", "ae=/local/ae.safetensors", "ae"])
def test_a_bad_part_argument_is_refused(tmp_path: Path, argument: str) -> None:
    with pytest.raises(ValueError, match="expected PART=https://"):
        fetch_model.fetch_parts([argument], tmp_path)


def test_the_instance_config_points_at_the_fetched_and_uploaded_parts(tmp_path: Path) -> None:
    ae = tmp_path / "ae.safetensors"
    ae.write_bytes(b"x")
    train = TrainConfig.model_validate(
        {
            "pretrained_model_name_or_path": "black-forest-labs/FLUX.1-dev",
            "network_module": "networks.lora_flux",
            "network_train_unet_only": True,
            "ae": str(ae),
            "t5xxl": T5_URL,
            "train_data_dir": str(tmp_path),
            "max_train_epochs": 1,
            "learning_rate": 1e-4,
        }
    )
    layout = RemoteLayout(root="/w/rentrain/j1")
    remote = tomllib.loads(remote_train_config(train, layout))
    assert remote["ae"] == "/w/rentrain/j1/model/ae/ae.safetensors"
    assert remote["t5xxl"] == "/w/rentrain/j1/model/t5xxl/t5xxl_fp16.safetensors"
    assert "clip_l" not in remote  # left to the diffusers folder
    command = bootstrap_command(layout, train.pretrained_model_name_or_path, 1, [f"t5xxl={T5_URL}"])
    arguments = shlex.join([train.pretrained_model_name_or_path, "1", f"t5xxl={T5_URL}"])
    assert arguments.replace("'", "'\"'\"'") in command  # quoted, inside the detached `sh -c '...'`
