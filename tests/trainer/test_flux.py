"""Flux.1 through the trainer: the tiny model trains end to end (8-bit base, T5 mask, samples) and resumes
exactly; the LoRA's kohya names on the full architecture; its file loads in diffusers with the same effect."""

from __future__ import annotations

import io
import re

import pytest
import torch
from safetensors.torch import load_file

from remote.events import EventWriter, read_events
from remote.trainer.families import get_family
from remote.trainer.families.flux import FLUX_DEV_CONFIG
from remote.trainer.loop import Stopped, train
from remote.trainer.lora import LoRANetwork, build_metadata, save_kohya

# kohya's networks.lora_flux names: 10 modules per double block, 3 per single block
KOHYA_FLUX_NAME = re.compile(
    r"lora_unet_(double_blocks_\d+_(img|txt)_(mod_lin|attn_qkv|attn_proj|mlp_0|mlp_2)"
    r"|single_blocks_\d+_(linear1|linear2|modulation_lin))"
)


def _flux_config(make_config, **keys):
    keys = {"network_train_unet_only": True, "max_train_steps": 2, "t5xxl_max_token_length": 16, **keys}
    _, cfg = make_config(
        pretrained_model_name_or_path="builtin:tiny-flux", sizes=[(64, 64), (64, 64)], repeats=1, **keys
    )
    return cfg


def _run(cfg, **kw):
    log = cfg.output_dir / "events.jsonl"
    final = train(cfg, EventWriter(log, stream=io.StringIO()), **kw)
    return final, read_events(log)


def test_tiny_flux_trains_end_to_end_with_an_8bit_base_and_writes_kohyas_file(make_config):
    cfg = _flux_config(
        make_config,
        fp8_base=True,
        apply_t5_attn_mask=True,
        timestep_sampling="flux_shift",
        gradient_checkpointing=True,
        sample_prompts=["rtoy, red circle"],
        sample_steps=2,
        sample_weights=[1.0],
    )
    final, events = _run(cfg)
    start = next(e for e in events if e.event == "start")
    assert start.model_family == "flux"
    assert any("float8" in choice for choice in start.choices)
    losses = [e.loss for e in events if e.event == "step"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert [e.event for e in events if e.event == "sample"] == ["sample"]

    tensors = load_file(str(final))
    names = {key.split(".")[0] for key in tensors}
    assert len(names) == 2 * 10 + 2 * 3 and all(KOHYA_FLUX_NAME.fullmatch(n) for n in names)
    assert any(tensors[f"{n}.lora_up.weight"].abs().sum() > 0 for n in names)  # it trained
    from remote.trainer.lora import read_metadata

    meta = read_metadata(final)
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and "modelspec.prediction_type" not in meta
    assert meta["ss_timestep_sampling"] == "flux_shift" and meta["ss_apply_t5_attn_mask"] == "True"


def test_a_flux_run_that_trains_the_text_encoders_is_refused_with_the_key_to_set(make_config):
    from remote.config import ConfigError
    from remote.trainer.families.base import ModelError

    with pytest.raises(ConfigError, match="network_train_unet_only"):  # the config check refuses it first
        _flux_config(make_config, network_train_unet_only=False)
    cfg = _flux_config(make_config).model_copy(update={"network_train_unet_only": False})  # past the check
    with pytest.raises(ModelError, match="network_train_unet_only = true"):
        _run(cfg)


def test_a_resumed_flux_run_ends_with_the_same_weights(tmp_path, make_config):
    cfg = _flux_config(make_config, max_train_steps=4, timestep_sampling="shift", model_prediction_type="raw")
    reference, _ = _run(cfg)
    expected = load_file(str(reference))
    out = tmp_path / "resumed"
    resumed_cfg = cfg.model_copy(update={"output_dir": out})
    with pytest.raises(Stopped):
        _run(resumed_cfg, stop_after_step=2)
    final, events = _run(resumed_cfg, resume="last")
    assert next(e for e in events if e.event == "start" and e.resumed_from_step).resumed_from_step == 2
    got = load_file(str(final))
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)


def _meta_dev_transformer():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**FLUX_DEV_CONFIG)


def test_full_flux_dev_lora_has_kohyas_304_modules_with_fused_layouts():
    net = LoRANetwork(_meta_dev_transformer(), [], "flux", dim=4, alpha=1)
    names = net.unet_names
    assert len(names) == 19 * 10 + 38 * 3 and all(KOHYA_FLUX_NAME.fullmatch(n) for n in names)
    assert names[:3] == [
        "lora_unet_double_blocks_0_img_mod_lin",
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_0_img_attn_proj",
    ]
    assert names[-3:] == [
        "lora_unet_single_blocks_37_linear1",
        "lora_unet_single_blocks_37_linear2",
        "lora_unet_single_blocks_37_modulation_lin",
    ]
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight"] == (4, 3072)
    assert shapes["lora_unet_double_blocks_3_img_attn_qkv.lora_up.weight"] == (3 * 3072, 4)
    assert shapes["lora_unet_double_blocks_3_txt_mod_lin.lora_up.weight"] == (6 * 3072, 4)
    assert shapes["lora_unet_single_blocks_5_linear1.lora_up.weight"] == (3 * 3072 + 12288, 4)
    assert shapes["lora_unet_single_blocks_5_linear2.lora_down.weight"] == (4, 3072 + 12288)


def test_block_indices_choose_which_blocks_get_lora(make_config):
    args = ["train_double_block_indices=0-1,5", "train_single_block_indices=none"]
    cfg = _flux_config(make_config, network_args=args)
    family = get_family("flux").configure(cfg)
    net = LoRANetwork(_meta_dev_transformer(), [], family, dim=1, alpha=1)
    blocks = {int(n.split("_")[4]) for n in net.unet_names}
    assert blocks == {0, 1, 5} and all("double_blocks" in n for n in net.unet_names)


def _tiny_with_random_lora(family, seed: int = 0):
    parts = family.build_tiny()
    torch.manual_seed(seed)
    net = LoRANetwork(parts["unet"], [], family, dim=4, alpha=2)
    net.apply_to()
    for lora in net.loras():
        torch.nn.init.normal_(lora.lora_up.weight, std=0.05)
    return parts, net


def test_the_shared_down_lora_is_the_fused_layers_lora_member_by_member():
    parts, net = _tiny_with_random_lora(get_family("flux"))
    transformer = parts["unet"]
    for name, members in (
        ("lora_unet_double_blocks_1_txt_attn_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
        ("lora_unet_single_blocks_0_linear1", ("to_q", "to_k", "to_v", "proj_mlp")),
    ):
        lora = getattr(net, name)
        block = transformer.transformer_blocks[1] if "double" in name else transformer.single_transformer_blocks[0]
        layers = [block.get_submodule(f"attn.{m}" if m != "proj_mlp" else m) for m in members]
        x = torch.randn(3, layers[0].in_features)
        with torch.no_grad():
            fused_delta = x @ (lora.lora_up.weight @ lora.lora_down.weight).T * lora.scale
            outputs = [layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias) for layer in layers]
        torch.testing.assert_close(torch.cat(outputs, dim=1), fused_delta, rtol=1e-5, atol=1e-6)


def _tiny_inputs(family, parts):
    ids = family.tokenize(parts["tokenizers"], ["rtoy, red circle"], None)
    with torch.no_grad():
        context, pooled = family.encode(parts["text_encoders"], ids, None)
    gen = torch.Generator().manual_seed(3)
    noisy = torch.randn(1, 16, 8, 8, generator=gen)
    return noisy, torch.tensor([500.0]), context, pooled


def test_diffusers_flux_pipeline_loads_the_file_with_the_same_effect(tmp_path, make_config):
    """diffusers' converter hard-codes FLUX.1's widths for single blocks' linear1, so the tiny model's file
    holds the double blocks (train_single_block_indices = "none"); the full architecture's single blocks are
    checked by the next test."""
    from diffusers import FluxPipeline

    cfg = _flux_config(make_config, network_args=["train_single_block_indices=none"])
    family = get_family("flux").configure(cfg)
    parts, net = _tiny_with_random_lora(family)
    noisy, timesteps, context, pooled = _tiny_inputs(family, parts)
    with torch.no_grad():
        with_lora = family.predict(parts["unet"], noisy, timesteps, context, pooled, {})
        net.set_multiplier(0.0)
        base = family.predict(parts["unet"], noisy, timesteps, context, pooled, {})
    path = tmp_path / "flux.safetensors"
    save_kohya(net, path, build_metadata(cfg, family, {}), None)
    net.restore()

    fresh = family.build_tiny()
    pipe = FluxPipeline(
        scheduler=family.objective(False).sampling_scheduler(),
        vae=fresh["vae"],
        text_encoder=fresh["text_encoders"][0],
        tokenizer=fresh["tokenizers"][0],
        text_encoder_2=fresh["text_encoders"][1],
        tokenizer_2=fresh["tokenizers"][1],
        transformer=fresh["unet"],
    )
    pipe.load_lora_weights(str(path))  # raises on a key it cannot place
    with torch.no_grad():
        loaded = family.predict(pipe.transformer, noisy, timesteps, context, pooled, {})
    assert (loaded - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, with_lora, rtol=1e-4, atol=1e-5)


def test_diffusers_maps_every_key_of_the_full_architectures_file():
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    net = LoRANetwork(_meta_dev_transformer(), [], "flux", dim=2, alpha=1)
    state = {k: v if k.endswith("alpha") else torch.randn_like(v) for k, v in net.kohya_state_dict().items()}
    converted = _convert_kohya_flux_lora_to_diffusers(dict(state))
    # an A and a B for each of diffusers' Linears: 14 per double block (qkv split in three), 6 per single block
    # (linear1 split into q, k, v and the MLP input)
    assert len(converted) == 2 * (19 * 14 + 38 * 6)
    down = state["lora_unet_single_blocks_7_linear1.lora_down.weight"]
    up = state["lora_unet_single_blocks_7_linear1.lora_up.weight"]
    scale = 0.5  # alpha 1 / dim 2
    mlp_b = converted["transformer.single_transformer_blocks.7.proj_mlp.lora_B.weight"]
    mlp_a = converted["transformer.single_transformer_blocks.7.proj_mlp.lora_A.weight"]
    torch.testing.assert_close(mlp_b @ mlp_a, scale * up[3 * 3072 :] @ down)
