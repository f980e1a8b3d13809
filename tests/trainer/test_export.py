"""The exported file: kohya keys only, metadata, hashes, precision, and it loads in diffusers unchanged."""

from __future__ import annotations

import hashlib

import pytest
import torch

from remote.trainer.lora import LoRANetwork, read_metadata, save_kohya
from remote.trainer.models import ModelBundle, encode, tokenize
from remote.trainer.tiny import build_tiny


def _bundle(family):
    return ModelBundle(family=family, v_prediction=False, reference=f"builtin:tiny-{family}", **build_tiny(family))


def _trained_network(bundle, dim=4, alpha=2.0, conv_dim=None):
    net = LoRANetwork(bundle.unet, bundle.text_encoders, bundle.family, dim, alpha, conv_dim, 1.0 if conv_dim else None)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, value in net.state_dict().items():
            if "lora_up" in key:
                value.copy_(torch.randn(value.shape, generator=gen) * 0.1)
    net.apply_to()
    return net


def _outputs(bundle, prompt="rtoy, a red circle"):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    t = torch.tensor([500])
    with torch.no_grad():
        ctx, pooled = encode(bundle, tokenize(bundle, [prompt], None), None)
        kwargs = {}
        if pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        return ctx, bundle.unet(x, t, encoder_hidden_states=ctx, **kwargs).sample


def _diffusers_pipeline(family):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = build_tiny(family)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=parts["vae"],
            text_encoder=parts["text_encoders"][0],
            text_encoder_2=parts["text_encoders"][1],
            tokenizer=parts["tokenizers"][0],
            tokenizer_2=parts["tokenizers"][1],
            unet=parts["unet"],
            scheduler=scheduler,
        ), parts
    return StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoders"][0],
        tokenizer=parts["tokenizers"][0],
        unet=parts["unet"],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ), parts


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_file_loads_in_diffusers_and_changes_output_by_the_expected_amount(tmp_path, family):
    bundle = _bundle(family)
    net = _trained_network(bundle)
    with_lora = _outputs(bundle)
    net.set_multiplier(0.0)
    without = _outputs(bundle)
    assert (with_lora[1] - without[1]).abs().max() > 1e-3  # the LoRA does something
    path = tmp_path / "l.safetensors"
    save_kohya(net, path, {"ss_network_dim": "4"}, None)

    pipe, parts = _diffusers_pipeline(family)
    pipe.load_lora_weights(str(path), adapter_name="k")
    loaded = ModelBundle(family=family, v_prediction=False, reference="x", **parts)
    for weight, (ref_ctx, ref_out) in ((1.0, with_lora), (0.0, without)):
        pipe.set_adapters(["k"], [weight])
        ctx, out = _outputs(loaded)
        assert torch.allclose(ctx, ref_ctx, atol=1e-5), (weight, (ctx - ref_ctx).abs().max())
        assert torch.allclose(out, ref_out, atol=1e-5), (weight, (out - ref_out).abs().max())


def test_conv_dim_file_loads_in_diffusers(tmp_path):
    bundle = _bundle("sdxl")
    net = _trained_network(bundle, conv_dim=2)
    assert any("in_layers_2" in n for n in net.unet_names) and any(n.endswith("_op") for n in net.unet_names)
    ref = _outputs(bundle)
    path = tmp_path / "c.safetensors"
    save_kohya(net, path, {}, None)
    pipe, parts = _diffusers_pipeline("sdxl")
    pipe.load_lora_weights(str(path))
    _ctx, out = _outputs(ModelBundle(family="sdxl", v_prediction=False, reference="x", **parts))
    assert torch.allclose(out, ref[1], atol=1e-5)


def test_keys_metadata_hash_and_precision(tmp_path):
    from safetensors.torch import load_file

    from remote.config import TrainConfig
    from remote.trainer.lora import build_metadata

    bundle = _bundle("sdxl")
    net = _trained_network(bundle, dim=4, alpha=2.0)
    cfg = TrainConfig.model_validate(
        {
            "pretrained_model_name_or_path": "builtin:tiny-sdxl",
            "train_data_dir": str(tmp_path),
            "max_train_steps": 1,
            "learning_rate": 1e-4,
            "network_dim": 4,
            "network_alpha": 2,
            "resolution": 64,
        }
    )
    meta = build_metadata(cfg, "sdxl", {"epoch": 1, "step": 1})
    path = tmp_path / "x.safetensors"
    save_kohya(net, path, meta, "fp16")
    tensors = load_file(str(path))
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in tensors)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    assert all(v.dtype == torch.float16 for v in tensors.values())
    assert tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"].item() == 2.0
    saved = read_metadata(path)
    assert saved["ss_base_model_version"] == "sdxl_base_v1-0" and saved["ss_v2"] == "False"
    assert saved["ss_network_module"] == "networks.lora" and saved["ss_network_dim"] == "4"
    assert saved["ss_network_alpha"] == "2.0"
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert saved["sshs_model_hash"] == hashlib.sha256(raw[8 + header :]).hexdigest()  # what A1111 computes
    sd15 = build_metadata(cfg.model_copy(update={"pretrained_model_name_or_path": "x"}), "sd15", {})
    assert sd15["ss_base_model_version"] == "sd_v1" and sd15["ss_v2"] == "False"
    assert build_metadata(cfg, "sd2", {})["ss_v2"] == "True"
