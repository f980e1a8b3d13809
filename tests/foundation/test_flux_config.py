"""Flux.1 configs (issue 19): kohya's Flux keys load as validated settings, each bad value or key of the other
family is refused naming the key, and the family facts stay free of torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from remote.config import ConfigError, TrainConfig, load_config, parse_block_selection
from rentrain.job_profile import profile_from_config
from rentrain.setup_time import model_download_gb
from tests.foundation.helpers import write_captioned

FIXTURE = Path(__file__).parent / "fixtures" / "kohya_flux.toml"
BASE = {"train_data_dir": "d", "max_train_epochs": 1, "learning_rate": 1e-4}
FLUX = {
    **BASE,
    "pretrained_model_name_or_path": "black-forest-labs/FLUX.1-dev",
    "network_module": "networks.lora_flux",
    "network_train_unet_only": True,
}
SD = {**BASE, "pretrained_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


def kohya_job(tmp_path: Path) -> Path:
    """The kohya Flux.1 config in a job folder with its local model files and a small dataset."""
    config = tmp_path / "config.toml"
    shutil.copy(FIXTURE, config)
    for name in ("flux1-dev.safetensors", "clip_l.safetensors", "ae.safetensors"):
        (tmp_path / "models").mkdir(exist_ok=True)
        (tmp_path / "models" / name).write_bytes(b"x" * 10)
    write_captioned(tmp_path / "dataset" / "2_zed", "a", (64, 64), (200, 10, 10), "zed")
    return config


def problems(values: dict[str, object]) -> str:
    with pytest.raises(ValueError) as caught:
        TrainConfig.model_validate(values)
    return str(caught.value)


def test_a_kohya_flux_config_loads_unchanged(tmp_path: Path) -> None:
    loaded = load_config(kohya_job(tmp_path))
    train = loaded.train
    assert train.is_flux and train.fp8_base and train.full_bf16 and train.apply_t5_attn_mask
    assert (train.timestep_sampling, train.model_prediction_type) == ("flux_shift", "raw")
    assert (train.guidance_scale, train.discrete_flow_shift, train.sigmoid_scale) == (1.0, 3.1582, 1.0)
    assert (train.t5xxl_max_token_length, train.loss_type) == (256, "l2")
    assert "blocks_to_swap" in loaded.ignored_keys
    assert train.ae == str(tmp_path / "models" / "ae.safetensors")  # local files made absolute
    assert train.t5xxl is not None and train.t5xxl.startswith("https://huggingface.co/comfyanonymous/")
    assert train.train_double_block_indices == frozenset({0, 1, 2, 3, 4, 5, 10})
    assert train.train_single_block_indices == frozenset()
    assert {"highvram", "cache_text_encoder_outputs", "sdpa", "cache_latents"} <= set(loaded.ignored_keys)


def test_t5_token_length_defaults_as_kohya() -> None:
    train = TrainConfig.model_validate(FLUX)
    assert (train.t5_token_length(schnell=False), train.t5_token_length(schnell=True)) == (512, 256)
    assert TrainConfig.model_validate({**FLUX, "t5xxl_max_token_length": 128}).t5_token_length(schnell=False) == 128


@pytest.mark.parametrize(
    ("text", "chosen"),
    [
        ("all", set(range(19))),
        ("none", set()),
        ("", set()),
        ("0-5,10", {0, 1, 2, 3, 4, 5, 10}),
        (" 3 , 7 - 8 ", {3, 7, 8}),
        ("18", {18}),
    ],
)
def test_block_selection_reads_kohyas_syntax(text: str, chosen: set[int]) -> None:
    assert parse_block_selection(text, 19, "train_double_block_indices") == chosen


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("train_double_block_indices=0-19", "'0-19' is outside the blocks 0-18"),
        ("train_single_block_indices=38", "'38' is outside the blocks 0-37"),
        ("train_double_block_indices=5-3", "'5-3' is outside the blocks 0-18"),
        ("train_double_block_indices=-1", 'expected "all", "none", or indices and ranges'),
        ("train_double_block_indices=first", 'expected "all", "none", or indices and ranges'),
        ("split_qkv=True", "only conv_dim=N and conv_alpha=X (SD), train_double_block_indices=S"),
    ],
)
def test_bad_block_selections_are_refused(arg: str, expected: str) -> None:
    message = problems({**FLUX, "network_args": [arg]})
    assert "network_args" in message and expected in message


def test_every_block_is_trained_when_no_selection_is_given() -> None:
    train = TrainConfig.model_validate(FLUX)
    assert train.train_double_block_indices is None and train.train_single_block_indices is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("guidance_scale", 4.0),
        ("fp8_base", True),
        ("timestep_sampling", "sigmoid"),
        ("model_prediction_type", "raw"),
        ("t5xxl", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"),
    ],
)
def test_flux_keys_on_an_sd_config_are_refused(key: str, value: object) -> None:
    message = problems({**SD, key: value})
    assert key in message and 'Flux.1 only: set network_module = "networks.lora_flux"' in message


def test_flux_block_selection_on_an_sd_config_is_refused() -> None:
    message = problems({**SD, "network_args": ["train_double_block_indices=all"]})
    assert "train_double_block_indices: Flux.1 only" in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("v2", True, "SD/SDXL only: a Flux.1 model is not SD 2.x"),
        ("min_snr_gamma", 5.0, "SD/SDXL only: Min-SNR"),
        ("noise_offset", 0.05, "SD/SDXL only"),
        ("clip_skip", 2, "SD/SDXL only: Flux.1 uses CLIP-L's pooled output"),
        ("network_args", ["conv_dim=8"], "conv_dim: SD only"),
    ],
)
def test_sd_keys_on_a_flux_config_are_refused(key: str, value: object, expected: str) -> None:
    message = problems({**FLUX, key: value})
    assert key in message and expected in message


def test_keys_that_change_nothing_pass_on_the_other_family() -> None:
    TrainConfig.model_validate({**FLUX, "v2": False, "clip_skip": 1, "noise_offset": 0, "sdxl": False})
    TrainConfig.model_validate({**SD, "guidance_scale": 3.5, "fp8_base": False, "timestep_sampling": "sigma"})


@pytest.mark.parametrize("values", [SD, FLUX], ids=["sd", "flux"])
def test_a_config_written_back_in_full_loads_again(values: dict[str, object]) -> None:
    """`continue` and the instance's config write every key, defaults included."""
    full = TrainConfig.model_validate(values).model_dump(mode="json", exclude_none=True)
    assert TrainConfig.model_validate(full).is_flux == (values is FLUX)


def test_a_single_file_flux_model_needs_its_encoders_and_autoencoder(tmp_path: Path) -> None:
    config = kohya_job(tmp_path)
    text = config.read_text().replace('ae = "models/ae.safetensors"\n', "").replace('clip_l = "models/', '# "')
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    message = str(caught.value)
    assert "ae in [model]: missing: a single-file Flux.1 model holds the transformer only" in message
    assert "clip_l in [model]: missing" in message and "t5xxl in" not in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("comfyanonymous/flux_text_encoders", "is not a file: give a local .safetensors file or the https:// URL"),
        ("models/missing.safetensors", "does not exist"),
        ("builtin:tiny-sd15", "is not a file"),
    ],
)
def test_encoder_files_must_be_files(tmp_path: Path, value: str, expected: str) -> None:
    config = kohya_job(tmp_path)
    config.write_text(config.read_text().replace('clip_l = "models/clip_l.safetensors"', f'clip_l = "{value}"'))
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert f"clip_l in the top level: {value}" in str(caught.value) or expected in str(caught.value)
    assert expected in str(caught.value)


def test_loss_types_other_than_l2_are_named() -> None:
    assert "'huber' is not supported: rentrain trains with the l2" in problems({**SD, "loss_type": "huber"})
    assert "'mse' is not one of l2, l1, huber, smooth_l1" in problems({**SD, "loss_type": "mse"})
    assert TrainConfig.model_validate({**SD, "loss_type": "L2"}).loss_type == "l2"


def test_tiny_flux_is_a_flux_model_and_needs_the_flux_network_module() -> None:
    tiny = {**BASE, "pretrained_model_name_or_path": "builtin:tiny-flux", "network_train_unet_only": True}
    assert TrainConfig.model_validate(tiny).is_flux
    assert 'use "networks.lora_flux"' in problems({**tiny, "network_module": "networks.lora"})


def test_the_profile_of_a_flux_job_counts_what_is_uploaded_and_downloaded(tmp_path: Path) -> None:
    profile = profile_from_config(kohya_job(tmp_path))
    assert profile.family == "flux" and profile.fp8_base
    assert set(profile.local_parts) == {"model", "ae", "clip_l"}
    assert profile.local_model_bytes == 30
    assert model_download_gb(profile).value == pytest.approx(9.79)  # only the T5-XXL URL is fetched


def test_family_facts_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from remote.trainer.families.facts import FAMILIES\n"
        "flux = FAMILIES['flux']\n"
        "print(flux.label, flux.download_gb, flux.architecture.unet_params, flux.module)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["Flux.1", "34.17", "11901408320", "remote.trainer.families.flux"]


def test_a_flux_config_that_would_train_the_text_encoders_is_refused_before_renting() -> None:
    message = problems({**FLUX, "network_train_unet_only": False})
    assert "network_train_unet_only" in message and "transformer only" in message
    TrainConfig.model_validate({**FLUX, "network_train_unet_only": False, "text_encoder_lr": 0.0})  # no error


def test_changing_captions_keep_t5_on_the_gpu_and_a_24_gb_card_no_longer_holds_dev(tmp_path: Path) -> None:
    from providers.base import Offer
    from rentrain.costs import estimate_job

    card = Offer(
        provider="vast", offer_id="1", gpu_model="RTX 4090", gpu_name_raw="RTX 4090", gpu_count=1, vram_gb=24,
        price_per_hour=0.4,
    )  # fmt: skip
    static = profile_from_config(kohya_job(tmp_path))
    assert not static.text_encoders_on_gpu and estimate_job(static, card) is not None
    shuffled = static.model_copy(update={"text_encoders_on_gpu": True})  # shuffle_caption: T5 encodes every step
    assert estimate_job(shuffled, card) is None  # 11 GiB of 8-bit transformer + 9.7 GiB of T5-XXL and CLIP-L
    again = tmp_path / "again"
    again.mkdir()
    loaded = load_config(kohya_job(again)).train.model_copy(update={"shuffle_caption": True})
    assert loaded.text_encoders_on_gpu and not loaded.captions_are_static
