"""A kohya Flux.1 TOML, with the tiny Flux model in place of FLUX.1 [dev], trains through `rentrain run`: on this
machine (`--provider local`) and on a rented instance of the simulator (`--provider vast`), and the LoRA that
comes home has kohya's lora_flux names and metadata."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors import safe_open

from tests.e2e.conftest import EXAMPLE_IMAGES, Client
from tests.sim.provider_sim import ProviderSimulator

KOHYA_FLUX_TOML = """
pretrained_model_name_or_path = "builtin:tiny-flux"
train_data_dir = "dataset"
resolution = "64,64"
output_dir = "output"
output_name = "my_flux_lora"
save_model_as = "safetensors"
network_module = "networks.lora_flux"
network_dim = 4
network_alpha = 1
network_args = ["train_double_block_indices=all", "train_single_block_indices=0"]
network_train_unet_only = true
learning_rate = 1e-4
optimizer_type = "AdamW"
lr_scheduler = "constant"
max_train_epochs = 2
save_every_n_epochs = 1
mixed_precision = "no"
fp8_base = true
gradient_checkpointing = true
guidance_scale = 1.0
timestep_sampling = "flux_shift"
discrete_flow_shift = 3.1582
model_prediction_type = "raw"
t5xxl_max_token_length = 16
apply_t5_attn_mask = true
loss_type = "l2"
cache_text_encoder_outputs = true
cache_latents = true
caption_extension = ".txt"
sample_prompts = ["rtoy, a red circle"]
sample_steps = 2
sample_seeds = [1]
sample_weights = [1.0]
"""


def _flux_job(folder: Path) -> Path:
    subset = folder / "dataset" / "2_toy"
    subset.mkdir(parents=True)
    for image in sorted(EXAMPLE_IMAGES.glob("*.png"))[:4]:
        shutil.copy(image, subset / image.name)
        shutil.copy(image.with_suffix(".txt"), subset / image.with_suffix(".txt").name)
    config = folder / "config.toml"
    config.write_text(KOHYA_FLUX_TOML)
    return config


def _assert_kohya_flux_lora(output: Path) -> None:
    final = output / "my_flux_lora.safetensors"
    assert final.is_file(), sorted(p.name for p in output.iterdir())
    with safe_open(final, "pt") as lora:
        keys = set(lora.keys())
        metadata = lora.metadata()
    modules = {key.split(".")[0] for key in keys}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in modules
    assert "lora_unet_single_blocks_0_linear1" in modules
    assert not any(m.startswith("lora_unet_single_blocks_1_") for m in modules)  # train_single_block_indices=0
    assert not any(m.startswith("lora_te") for m in modules)  # network_train_unet_only
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["ss_network_module"] == "networks.lora_flux"


def test_a_kohya_flux_toml_trains_on_this_machine(tmp_path: Path, client: Client) -> None:
    config = _flux_job(tmp_path / "job")
    result = client.run("run", str(config), "--provider", "local", "--yes", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_kohya_flux_lora(tmp_path / "job" / "output")


def test_a_kohya_flux_toml_trains_on_a_rented_instance(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> None:
    config = _flux_job(tmp_path / "job")
    result = client.run("run", str(config), "--provider", "vast", "--yes", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_kohya_flux_lora(tmp_path / "job" / "output")
    assert market.live_instances() == []
