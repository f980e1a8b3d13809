"""kohya key names on the FULL SD 1.5 and SDXL architectures, built without weights on the meta device."""

from __future__ import annotations

import pytest
import torch

from remote.trainer.families.sdxl import diffusers_to_sgm
from remote.trainer.lora import LoRANetwork, select_te_targets, select_unet_targets

SD15_UNET = dict(
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
CLIP_BIGG = dict(
    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280
)


def _meta_unet(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def _meta_te(config, with_projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.device("meta"):
        return cls(CLIPTextConfig(**config))


@pytest.fixture(scope="module")
def sd15_names():
    unet = [n for n, _, _ in select_unet_targets(_meta_unet(SD15_UNET), "sd15", None)]
    te = [n for n, _, _ in select_te_targets([_meta_te(CLIP_L)])]
    return unet, te


@pytest.fixture(scope="module")
def sdxl_names():
    unet_model = _meta_unet(SDXL_UNET)
    unet = [n for n, _, _ in select_unet_targets(unet_model, "sdxl", None)]
    te = [n for n, _, _ in select_te_targets([_meta_te(CLIP_L), _meta_te(CLIP_BIGG, True)])]
    return unet, te, unet_model


def test_sd15_counts_and_examples(sd15_names):
    unet, te = sd15_names
    assert len(unet) == 192 and len(set(unet)) == 192
    assert len(te) == 72 and len(set(te)) == 72
    for name in (
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_up_blocks_3_attentions_2_proj_out",
    ):
        assert name in unet
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in te


def test_sdxl_counts_and_examples(sdxl_names):
    unet, te, _ = sdxl_names
    assert len(unet) == 722 and len(set(unet)) == 722
    te1 = [n for n in te if n.startswith("lora_te1_")]
    te2 = [n for n in te if n.startswith("lora_te2_")]
    assert (len(te1), len(te2)) == (72, 192)
    for name in (
        "lora_unet_input_blocks_4_1_proj_in",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn1_to_k",
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_0_proj",
    ):
        assert name in unet
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in te1
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc1" in te2
    assert not any("down_blocks" in n or "up_blocks" in n for n in unet)


def test_sdxl_names_map_back_through_diffusers(sdxl_names):
    """diffusers' own SGM->diffusers converter maps every name back to a real module of the UNet."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    unet_names, _, unet_model = sdxl_names
    state = {f"{n}.lora_down.weight": torch.zeros(1) for n in unet_names}
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(state), unet_model.config)
    modules = {name.replace(".", "_") for name, _ in unet_model.named_modules()}
    assert len(mapped) == len(unet_names)
    for key in mapped:
        name = key.split(".")[0].removeprefix("lora_unet_")
        name = name.replace("input_blocks", "down_blocks").replace("middle_block", "mid_block")
        name = name.replace("output_blocks", "up_blocks")
        assert name in modules, key


def test_conv_dim_adds_resnet_and_sampler_convs():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    names = {n: conv3 for n, _, conv3 in select_unet_targets(unet, "sd15", 4)}
    assert names["lora_unet_down_blocks_0_resnets_0_conv1"] is True
    assert names["lora_unet_down_blocks_0_resnets_0_time_emb_proj"] is False
    assert names["lora_unet_down_blocks_0_downsamplers_0_conv"] is True
    assert names["lora_unet_up_blocks_0_upsamplers_0_conv"] is True
    assert names["lora_unet_down_blocks_1_resnets_0_conv_shortcut"] is False
    assert not any("Conv2d_0" in n for n in names)


def test_sgm_map_for_resnets_and_samplers():
    assert diffusers_to_sgm("down_blocks.0.resnets.1.conv1", 2) == "input_blocks.2.0.in_layers.2"
    assert diffusers_to_sgm("down_blocks.1.downsamplers.0.conv", 2) == "input_blocks.6.0.op"
    assert diffusers_to_sgm("mid_block.resnets.1.time_emb_proj", 2) == "middle_block.2.emb_layers.1"
    assert diffusers_to_sgm("up_blocks.0.upsamplers.0.conv", 2, {0: True}) == "output_blocks.2.2.conv"
    assert diffusers_to_sgm("up_blocks.1.upsamplers.0.conv", 2, {1: False}) == "output_blocks.5.1.conv"
    assert diffusers_to_sgm("up_blocks.2.resnets.0.conv_shortcut", 2) == "output_blocks.6.0.skip_connection"


def test_network_on_meta_has_kohya_tensor_layout():
    with torch.device("meta"):
        net = LoRANetwork(_meta_unet(SD15_UNET), [_meta_te(CLIP_L)], "sd15", dim=4, alpha=2)
    keys = list(net.state_dict())
    assert len(keys) == 3 * 264
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] == (4, 320, 1, 1)
    assert shapes["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] == (320, 4, 1, 1)
    assert shapes["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] == (4, 768)
    assert shapes["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"] == ()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_exported_full_architecture_file_has_exactly_kohyas_keys(tmp_path, family, sd15_names, sdxl_names):
    """The LoRA of the real architectures (base on the meta device, LoRA tensors real), written to disk."""
    from safetensors import safe_open

    from remote.trainer.lora import save_kohya

    if family == "sd15":
        unet, tes = _meta_unet(SD15_UNET), [_meta_te(CLIP_L)]
        names = sd15_names[0] + sd15_names[1]
    else:
        unet, tes = sdxl_names[2], [_meta_te(CLIP_L), _meta_te(CLIP_BIGG, True)]
        names = sdxl_names[0] + sdxl_names[1]
    net = LoRANetwork(unet, tes, family, dim=1, alpha=1)
    path = tmp_path / "full.safetensors"
    save_kohya(net, path, {"ss_network_dim": "1"}, "fp16")
    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
    expected = {f"{n}.{suffix}" for n in names for suffix in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert keys == expected
    assert len(keys) == 3 * (264 if family == "sd15" else 722 + 72 + 192)
