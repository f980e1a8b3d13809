"""Flux.1's pieces: kohya's timestep sampling and flow-matching formulas, the packed latent patches, the
single-file loader on a tiny file in BFL's key layout, the float8 frozen base, detection."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from remote.trainer.families import get_family
from remote.trainer.families.detect import builtin_family, detect_family_from_keys, folder_family
from remote.trainer.families.flux_flow import (
    FlowMatchObjective,
    image_ids,
    pack_latents,
    sample_sigmas,
    unpack_latents,
)

CPU = torch.device("cpu")


def _sigmas(mode: str, n: int = 20000, latent_hw=(128, 128), **kw) -> torch.Tensor:
    return sample_sigmas(mode, n, latent_hw, torch.Generator().manual_seed(0), CPU, **kw)


@pytest.mark.parametrize(
    ("mode", "kw", "median"),
    [
        ("uniform", {}, 0.5),
        ("sigmoid", {"sigmoid_scale": 2.0}, 0.5),  # sigmoid(scale * N(0, 1))
        ("shift", {"shift": 3.0}, 0.75),  # 3 * 0.5 / (1 + 2 * 0.5)
        # flux_shift at 128x128 latents: 64 * 64 = 4096 tokens, mu = 1.15, median e^mu / (e^mu + 1)
        ("flux_shift", {}, math.exp(1.15) / (math.exp(1.15) + 1)),
        # sigma: 1000 shifted grid points; the median index 500 -> 3 * 0.5 / (1 + 2 * 0.5)
        ("sigma", {"shift": 3.0}, 0.75),
    ],
)
def test_each_timestep_sampling_mode_draws_kohyas_distribution(mode, kw, median):
    sigmas = _sigmas(mode, **kw)
    assert sigmas.shape == (20000,) and sigmas.dtype == torch.float32
    assert float(sigmas.min()) > 0 and float(sigmas.max()) <= 1
    assert float(sigmas.median()) == pytest.approx(median, abs=0.02)


def test_sigma_mode_draws_only_the_shifted_grid_of_kohyas_scheduler():
    sigmas = _sigmas("sigma", shift=3.0)
    grid = torch.arange(1, 1001).float() / 1000
    grid = 3 * grid / (1 + 2 * grid)
    assert torch.isin(sigmas, grid).all()
    assert len(sigmas.unique()) > 900


def test_unknown_sampling_mode_names_the_known_ones():
    with pytest.raises(ValueError, match="sigma, uniform, sigmoid, shift, flux_shift"):
        _sigmas("logit")


def test_flow_matching_noises_linearly_and_targets_the_velocity():
    latents, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    timesteps = torch.tensor([0.0, 250.0, 1000.0])
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    prediction = torch.randn(3, 16, 4, 4)
    objective = FlowMatchObjective()
    noisy = objective.add_noise(latents, noise, timesteps)
    torch.testing.assert_close(noisy, (1 - sigma) * latents + sigma * noise)
    torch.testing.assert_close(objective.target(latents, noise, timesteps), noise - latents)
    expected = {"raw": prediction, "additive": prediction + noisy, "sigma_scaled": -sigma * prediction + noisy}
    for kind, value in expected.items():
        got = FlowMatchObjective(model_prediction_type=kind).loss_prediction(prediction, noisy, timesteps)
        torch.testing.assert_close(got, value)
    assert torch.equal(objective.min_snr_weight(timesteps, 5.0), torch.ones(3))


def test_packed_tokens_are_2x2_patches_channel_first_with_row_column_ids():
    latents = torch.randn(2, 16, 6, 8)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 3 * 4, 64)
    i, j, c, ph, pw = 2, 1, 5, 1, 0
    assert tokens[1, i * 4 + j, c * 4 + ph * 2 + pw] == latents[1, c, 2 * i + ph, 2 * j + pw]
    torch.testing.assert_close(unpack_latents(tokens, 6, 8), latents)
    ids = image_ids(6, 8)
    assert ids.shape == (12, 3) and ids[i * 4 + j].tolist() == [0.0, i, j]


# ---------------------------------------------------------------------------------------------------
# BFL's single file

# diffusers' layers -> BFL's names inside a block, written out (a tiny file in the original layout is built
# from the tiny model with these)
DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}


def _original_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for leaf in ("weight", "bias"):
        for ours, theirs in TOP.items():
            out[f"{theirs}.{leaf}"] = sd[f"{ours}.{leaf}"]
        shift_scale = sd[f"norm_out.linear.{leaf}"].chunk(2)  # diffusers (scale, shift) -> BFL (shift, scale)
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift_scale[1], shift_scale[0]])
        for i in range(len(model.transformer_blocks)):
            b = f"transformer_blocks.{i}"
            for ours, theirs in DOUBLE.items():
                out[f"double_blocks.{i}.{theirs}.{leaf}"] = sd[f"{b}.{ours}.{leaf}"]
            out[f"double_blocks.{i}.img_attn.qkv.{leaf}"] = torch.cat([sd[f"{b}.attn.to_{x}.{leaf}"] for x in "qkv"])
            out[f"double_blocks.{i}.txt_attn.qkv.{leaf}"] = torch.cat(
                [sd[f"{b}.attn.add_{x}_proj.{leaf}"] for x in "qkv"]
            )
        for i in range(len(model.single_transformer_blocks)):
            b = f"single_transformer_blocks.{i}"
            for ours, theirs in SINGLE.items():
                out[f"single_blocks.{i}.{theirs}.{leaf}"] = sd[f"{b}.{ours}.{leaf}"]
            parts = [sd[f"{b}.attn.to_{x}.{leaf}"] for x in "qkv"] + [sd[f"{b}.proj_mlp.{leaf}"]]
            out[f"single_blocks.{i}.linear1.{leaf}"] = torch.cat(parts)
    for i in range(len(model.transformer_blocks)):
        for stream, prefix in (("img", "attn.norm_"), ("txt", "attn.norm_added_")):
            for which, letter in (("query", "q"), ("key", "k")):
                out[f"double_blocks.{i}.{stream}_attn.norm.{which}_norm.scale"] = sd[
                    f"transformer_blocks.{i}.{prefix}{letter}.weight"
                ]
    for i in range(len(model.single_transformer_blocks)):
        for which, letter in (("query", "q"), ("key", "k")):
            scale = sd[f"single_transformer_blocks.{i}.attn.norm_{letter}.weight"]
            out[f"single_blocks.{i}.norm.{which}_norm.scale"] = scale
    return {f"model.diffusion_model.{k}": v.contiguous() for k, v in out.items()}  # as ComfyUI nests them


def test_the_single_file_loader_reads_bfls_layout_into_the_same_model(tmp_path):
    from safetensors.torch import save_file

    from remote.trainer.families.flux import load_transformer_file

    family = get_family("flux")
    parts = family.build_tiny()
    reference = parts["unet"]
    path = tmp_path / "flux1-tiny.safetensors"
    original = _original_layout(reference)
    # every tensor placed; BFL fuses q, k, v (and a single block's MLP input): 2 x 4 and 2 x 3 fewer tensors
    assert len(original) == len(reference.state_dict()) - 2 * 8 - 2 * 6
    save_file(original, str(path))
    assert detect_family_from_keys(original) == "flux"

    loaded = load_transformer_file(path, torch.float32)
    assert loaded.config.num_layers == 2 and loaded.config.guidance_embeds
    assert tuple(loaded.config.axes_dims_rope) == tuple(reference.config.axes_dims_rope)
    ids = family.tokenize(parts["tokenizers"], ["rtoy"], None)
    with torch.no_grad():
        context, pooled = family.encode(parts["text_encoders"], ids, None)
        noisy, t = torch.randn(1, 16, 8, 8), torch.tensor([300.0])
        torch.testing.assert_close(
            family.predict(loaded, noisy, t, context, pooled, {}),
            family.predict(reference, noisy, t, context, pooled, {}),
        )


def test_a_single_flux_file_without_its_encoders_names_the_missing_keys(tmp_path):
    from remote.trainer.families.base import ModelError

    with pytest.raises(ModelError, match="set ae, clip_l, t5xxl"):
        get_family("flux").load_single_file(tmp_path / "flux1-dev.safetensors")


def test_flux_is_detected_from_files_folders_and_builtins():
    assert detect_family_from_keys(["double_blocks.0.img_attn.qkv.weight"]) == "flux"
    assert detect_family_from_keys(["single_transformer_blocks.0.proj_out.weight"]) == "flux"
    assert folder_family(lambda name: {"_class_name": "FluxPipeline"}) == "flux"
    assert builtin_family("builtin:tiny-flux") == "flux"


# ---------------------------------------------------------------------------------------------------
# The 8-bit frozen base


def test_float8_weight_only_linear_is_close_to_the_bf16_layer_and_stays_8bit():
    from remote.trainer.float8 import FLOAT8, Float8Linear, quantize_linears

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    expected = model.to(torch.bfloat16)(x)
    assert quantize_linears(model, lambda path: True) == 2
    model.to(torch.bfloat16)  # the trainer's placement: the float8 weights stay float8
    layer = model[0]
    assert isinstance(layer, Float8Linear) and layer.weight8.dtype == FLOAT8
    assert layer.weight_scale.dtype == torch.float32
    x.requires_grad_(True)
    got = model(x)
    assert got.dtype == torch.bfloat16
    got_values, want = got.detach().float(), expected.detach().float()
    relative = float((got_values - want).norm() / want.norm())
    assert relative < 0.05, relative
    got.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
