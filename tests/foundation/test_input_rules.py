"""The rules behind the bad-input table that a command line cannot show: one name rule on both sides, one
file-name function for downloaded models, HF_TOKEN by exact host, 16-bit PNGs trained as their content."""

from __future__ import annotations

import email.message
import io
import posixpath
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from remote.config import ConfigError, TrainConfig, parse_config
from remote.fetch_model import download_request, sends_hf_token, url_file_name
from remote.names import MAX_STEM_BYTES, file_stem_problem
from remote.trainer.data import ImageRecord, load_pixels, open_image
from rentrain.remote_job import RemoteLayout, remote_model_reference
from rentrain.transport import check_remote_path

ACCEPTED = ["my_lora", "v1.2-final", "A", "0", "n" * MAX_STEM_BYTES]
TOO_LONG = "n" * (MAX_STEM_BYTES + 1)
REFUSED = ["my lora", "../x", "/abs", "", "a\x00b", "x\n", "-rf", ".hidden", "ünï", "a/b", TOO_LONG, "..", "名前"]


def _written_by_trainer(stem: str) -> list[str]:
    """Every name the trainer writes from output_name (remote/trainer/loop.py, state.py)."""
    return [
        f"{stem}.safetensors",
        f"{stem}-000001.safetensors",
        f"{stem}-step00000001.safetensors",
        f"{stem}-000001-state",
        f"{stem}-step00000001-state",
        f"samples/{stem}-000001.png",
        f"samples/{stem}.png",
    ]


@pytest.mark.parametrize("stem", ACCEPTED, ids=repr)
def test_a_name_check_accepts_is_one_fetch_accepts(stem: str) -> None:
    assert file_stem_problem(stem) is None
    for name in _written_by_trainer(stem):
        assert check_remote_path(f"/job/output/{name}", "/job/output") == f"/job/output/{name}"


@pytest.mark.parametrize("stem", REFUSED, ids=repr)
def test_other_names_are_refused_by_the_config(stem: str) -> None:
    with pytest.raises(ConfigError, match="output_name"):
        parse_config({"output_name": stem, **_minimal()}, Path("/tmp/config.toml"))


def _minimal() -> dict[str, object]:
    return {
        "pretrained_model_name_or_path": "builtin:tiny-sd15",
        "train_data_dir": "/d",
        "max_train_epochs": 1,
        "learning_rate": 1e-4,
    }


@pytest.mark.parametrize(
    ("url", "saved_as"),
    [
        ("https://huggingface.co/o/r/resolve/main/model.safetensors?download=true", "model.safetensors"),
        ("https://example.com/files/my%20model.safetensors#part", "my model.safetensors"),
        ("https://example.com/a/b.ckpt/", "b.ckpt"),
    ],
)
def test_the_trainer_looks_for_the_file_the_instance_saved(url: str, saved_as: str) -> None:
    train = TrainConfig.model_validate({**_minimal(), "pretrained_model_name_or_path": url})
    layout = RemoteLayout(root="/w/rentrain/job")
    assert url_file_name(url) == saved_as
    assert remote_model_reference(train, layout) == posixpath.join(layout.model, saved_as)


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        ("https://huggingface.co/o/r/resolve/main/m.safetensors", True),
        ("https://cdn-lfs.huggingface.co/x", True),
        ("https://HuggingFace.co:443/x", True),
        ("https://huggingface.co.evil.com/x", False),
        ("https://evil.com/huggingface.co/x", False),
        ("https://evil.com/?u=https://huggingface.co/", False),
        ("https://huggingface.co@evil.com/x", False),
        ("https://evilhuggingface.co/x", False),
        ("http://huggingface.co/x", False),
    ],
)
def test_hf_token_goes_to_huggingface_hosts_only(monkeypatch: pytest.MonkeyPatch, url: str, sent: bool) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert sends_hf_token(url) is sent
    request = download_request(url)
    assert (request.get_header("Authorization") == "Bearer hf_secret") is sent


def test_hf_token_is_not_repeated_to_where_a_redirect_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    request = download_request("https://huggingface.co/o/r/resolve/main/m.safetensors")
    redirected = urllib.request.HTTPRedirectHandler().redirect_request(
        request, io.BytesIO(), 302, "Found", email.message.Message(), "https://evil.com/m.safetensors"
    )
    assert redirected is not None
    assert "Authorization" not in dict(redirected.header_items())


def test_a_16_bit_png_trains_as_its_content(tmp_path: Path) -> None:
    grey = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")  # the case that convert("RGB") clips to white

    expected = np.round(grey / 257).astype(np.int16)
    shown = np.asarray(open_image(path)).astype(np.int16)
    assert np.abs(shown - expected[..., None]).max() <= 1

    record = ImageRecord(path, "x", 1, False, (64, 64), (64, 64), (64, 64), (0, 0, 64, 64))
    pixels = load_pixels(record)
    assert torch.allclose(pixels[0], torch.from_numpy(expected).float() / 127.5 - 1, atol=2 / 127.5)
    assert pixels.min() < -0.9 and pixels.max() > 0.5  # dark to light, not white
