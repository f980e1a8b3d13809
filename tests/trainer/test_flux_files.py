"""Flux.1's ``ae``, ``clip_l`` and ``t5xxl`` single files, in the key layouts the public files have, through the
loaders in flux.py. The layouts, from public sources:

- ae.safetensors: Black Forest Labs' AutoEncoder (kohya-ss/sd-scripts library/flux_models.py, a copy of BFL's
  flux repo; kohya's flux_utils.load_ae reads the file into it unchanged): ``encoder.down.{i}.block.{j}``,
  ``mid.block_1`` / ``mid.attn_1`` (1x1 convolutions q, k, v, proj_out), ``decoder.up.{i}`` numbered from the
  highest resolution, ``nin_shortcut``; no quant_conv / post_quant_conv; latents ``0.3611 * (z - 0.1159)``.
- clip_l.safetensors: transformers' CLIPTextModel keys under ``text_model.`` with ComfyUI's ``text_projection``
  beside them (comfyanonymous/ComfyUI comfy/clip_model.py; comfy/sd.py tells CLIP-L by
  ``text_model.encoder.layers.0.mlp.fc1.weight``; kohya's flux_utils.load_clip_l).
- t5xxl_fp16 / t5xxl_fp8_e4m3fn.safetensors: T5's encoder, its embedding as ``shared.weight`` only
  (ComfyUI comfy/text_encoders/t5.py has no ``encoder.embed_tokens``); here the fp8 file holds every tensor,
  layer norms too, as float8_e4m3fn, as the T5 listed in AUTOMATIC1111/stable-diffusion-webui pull 16484 does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from remote.trainer.families import flux
from remote.trainer.families.base import ModelError

FP8 = torch.float8_e4m3fn

# ---------------------------------------------------------------------------------------------------
# ae.safetensors


def _bfl_ae_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of BFL's AutoEncoder and its shape, built as its Encoder/Decoder constructors build them
    (ch 128, ch_mult 1, 2, 4, 4, two ResnetBlocks a level, z_channels 16)."""
    ch, ch_mult, res_blocks, z_channels = 128, (1, 2, 4, 4), 2, 16
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int, kernel: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, kernel, kernel), (cout,)

    def norm(name: str, channels: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (channels,), (channels,)

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def middle(side: str, channels: int) -> None:
        resnet(f"{side}.mid.block_1", channels, channels)
        norm(f"{side}.mid.attn_1.norm", channels)
        for projection in ("q", "k", "v", "proj_out"):
            conv(f"{side}.mid.attn_1.{projection}", channels, channels, 1)
        resnet(f"{side}.mid.block_2", channels, channels)

    conv("encoder.conv_in", 3, ch, 3)
    in_ch_mult = (1, *ch_mult)
    for level, mult in enumerate(ch_mult):
        block_in = ch * in_ch_mult[level]
        for j in range(res_blocks):
            resnet(f"encoder.down.{level}.block.{j}", block_in, ch * mult)
            block_in = ch * mult
        if level != len(ch_mult) - 1:
            conv(f"encoder.down.{level}.downsample.conv", block_in, block_in, 3)
    middle("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, 2 * z_channels, 3)

    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", z_channels, block_in, 3)
    middle("decoder", block_in)
    for level in reversed(range(len(ch_mult))):
        for j in range(res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{j}", block_in, ch * ch_mult[level])
            block_in = ch * ch_mult[level]
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, 3, 3)
    return shapes


# diffusers' AutoencoderKL names -> BFL's (the decoder's up blocks count from the other end: 4 levels)
AE_RENAMES: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (r"down_blocks\.(\d)\.resnets\.", r"down.\1.block."),
    (r"down_blocks\.(\d)\.downsamplers\.0\.", r"down.\1.downsample."),
    (r"up_blocks\.(\d)\.resnets\.", lambda m: f"up.{3 - int(m[1])}.block."),
    (r"up_blocks\.(\d)\.upsamplers\.0\.", lambda m: f"up.{3 - int(m[1])}.upsample."),
    (r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
    (r"mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
    (r"mid_block\.attentions\.0\.to_([qkv])\.", r"mid.attn_1.\1."),
    (r"mid_block\.attentions\.0\.to_out\.0\.", "mid.attn_1.proj_out."),
    (r"conv_shortcut", "nin_shortcut"),
    (r"conv_norm_out", "norm_out"),
]
BFL_ATTENTION_CONV = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")  # BFL's are 1x1 convolutions


def _bfl_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        for pattern, replacement in AE_RENAMES:
            name = re.sub(pattern, replacement, name)
        out[name] = tensor[:, :, None, None] if BFL_ATTENTION_CONV.search(name) else tensor
    return {k: v.contiguous() for k, v in out.items()}


def _randomized(model: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Every tensor random (norms too), so a tensor that does not land keeps a different value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


@pytest.fixture(scope="module")
def flux_ae(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A random full-size Flux.1 autoencoder and its weights saved as BFL's ae.safetensors (float32)."""
    from diffusers import AutoencoderKL

    source = _randomized(AutoencoderKL(**flux.AE_CONFIG), seed=1)
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    save_file(_bfl_layout(source.state_dict()), str(path))
    return source, path


def test_the_renames_give_exactly_bfls_autoencoder_tensors(flux_ae):
    from safetensors import safe_open

    with safe_open(str(flux_ae[1]), framework="pt") as f:
        stored = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (a handle, not a dict)
    assert stored == _bfl_ae_shapes()
    assert not any("quant_conv" in key for key in stored)


def test_bfls_ae_file_loads_every_tensor_with_fluxs_latent_scale_and_shift(flux_ae):
    source, path = flux_ae
    loaded = flux._load_ae(str(path))
    expected, got = source.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    # BFL's AutoEncoderParams for dev and schnell: scale_factor 0.3611, shift_factor 0.1159
    assert (loaded.config.scaling_factor, loaded.config.shift_factor) == (0.3611, 0.1159)
    assert (flux.FLUX.latent_scale, flux.FLUX.latent_shift) == (0.3611, 0.1159)


def test_an_sd_vae_given_as_ae_names_the_tensor_whose_shape_differs(flux_ae, tmp_path):
    """SD 1.x's VAE: the same layout with 4 latent channels (and quant convolutions), stored in fp16."""
    source, _ = flux_ae
    sd_vae = {k: v.half() for k, v in _bfl_layout(source.state_dict()).items()}
    sd_vae["encoder.conv_out.weight"], sd_vae["encoder.conv_out.bias"] = torch.zeros(8, 512, 3, 3), torch.zeros(8)
    sd_vae["decoder.conv_in.weight"] = torch.zeros(512, 4, 3, 3)
    sd_vae["quant_conv.weight"], sd_vae["post_quant_conv.weight"] = torch.zeros(8, 8, 1, 1), torch.zeros(4, 4, 1, 1)
    path = tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"
    save_file(sd_vae, str(path))
    with pytest.raises(ModelError, match=r"ae = .*vae-ft-mse.*: encoder\.conv_out\.weight .*\(8, 512, 3, 3\)"):
        flux._load_ae(str(path))


# ---------------------------------------------------------------------------------------------------
# clip_l.safetensors

CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
CLIP_EOS = 49407  # CLIP's tokenizer: <|startoftext|> 49406, <|endoftext|> 49407; 49408 tokens, 77 positions


def _clip_l_file_keys(layers: int) -> set[str]:
    """ComfyUI's CLIPTextModel (comfy/clip_model.py): text_model.{embeddings, encoder.layers, final_layer_norm}
    and text_projection."""
    keys = {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"}
    keys |= {"text_projection.weight", "text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"}
    parts = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]
    parts += ["layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"]
    for i in range(layers):
        keys |= {f"text_model.encoder.layers.{i}.{part}.{leaf}" for part in parts for leaf in ("weight", "bias")}
    return keys


def _clip(config: dict[str, int]) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**config))


def _clip_l_file(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as clip_l.safetensors stores them (fp16), with the int64 position ids that files
    saved by older transformers carry."""
    width = model.config.hidden_size
    state = {f"text_model.{k}": v.half() for k, v in model.state_dict().items()}
    state["text_projection.weight"] = torch.eye(width, dtype=torch.float16)
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return state


def _clip_ids() -> torch.Tensor:
    ids = torch.full((2, 77), CLIP_EOS)
    ids[:, 0] = 49406
    ids[0, 1:4] = torch.tensor([320, 1125, 539])
    ids[1, 1:7] = torch.tensor([2368, 530, 320, 3086, 267, 1929])
    return ids


@pytest.fixture(scope="module")
def clip_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    source = _randomized(_clip(CLIP_TINY), seed=2).eval()
    source.half().float()  # the file is fp16: the reference holds exactly what it stores
    path = tmp_path_factory.mktemp("clip") / "clip_l.safetensors"
    state = _clip_l_file(source)
    assert set(state) - {"text_model.embeddings.position_ids"} == _clip_l_file_keys(CLIP_TINY["num_hidden_layers"])
    save_file(state, str(path))
    return source, path


def test_comfys_clip_l_file_loads_into_the_same_text_model(clip_tiny):
    source, path = clip_tiny
    loaded = flux._load_encoder(str(path), torch.float32, lambda: _clip(CLIP_TINY), "clip_l")
    ids = _clip_ids()
    with torch.no_grad():
        want, got = source(ids), loaded.eval()(ids)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=0, atol=0)


def test_a_loaded_clip_l_moves_like_any_module(clip_tiny):
    """The trainer moves each text encoder with ``encoder.to(device, dtype)``: nothing may stay on meta."""
    loaded = flux._load_encoder(str(clip_tiny[1]), torch.float32, lambda: _clip(CLIP_TINY), "clip_l")
    loaded.to("cpu", torch.bfloat16)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    with torch.no_grad():
        assert loaded(_clip_ids()).pooler_output.dtype == torch.bfloat16


def _meta_state(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape in shapes.items()}


def _clip_l_shape(key: str) -> tuple[int, ...]:
    """CLIP ViT-L/14's text tower (ComfyUI's comfy/sd1_clip_config.json, openai/clip-vit-large-patch14's): width
    768, MLP 3072, 49408 tokens, 77 positions."""
    named = {"token_embedding.weight": (49408, 768), "position_embedding.weight": (77, 768)}
    named |= {"fc1.weight": (3072, 768), "fc1.bias": (3072,), "fc2.weight": (768, 3072)}
    leaf = ".".join(key.split(".")[-2:])
    if leaf in named:
        return named[leaf]
    return (768, 768) if key.endswith("proj.weight") else (768,)


def test_the_full_clip_l_builder_takes_every_tensor_of_the_real_file(monkeypatch):
    """The real file's 12-layer key set and shapes, as meta tensors (no data), through ``_load_clip_l``."""
    shapes = {key: _clip_l_shape(key) for key in _clip_l_file_keys(12)}
    monkeypatch.setattr(flux, "_read_state", lambda path: _meta_state(shapes, torch.float16))
    loaded = flux._load_clip_l("clip_l.safetensors", torch.bfloat16)
    assert loaded.config.hidden_act == "quick_gelu" and loaded.config.eos_token_id == CLIP_EOS
    assert sum(p.numel() for p in loaded.parameters()) == 123_060_480  # CLIP-L's text tower


# ---------------------------------------------------------------------------------------------------
# t5xxl_fp16.safetensors / t5xxl_fp8_e4m3fn.safetensors

T5_TINY = dict(
    vocab_size=128,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    is_encoder_decoder=False,
    use_cache=False,
)


def _t5_file_keys(layers: int) -> set[str]:
    """ComfyUI's T5 (comfy/text_encoders/t5.py): shared, then encoder.block.{i}.layer.{0 attention, 1 gated
    feed-forward}, the relative position bias in block 0 only, encoder.final_layer_norm."""
    keys = {"shared.weight", "encoder.final_layer_norm.weight"}
    keys.add("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    for i in range(layers):
        block = f"encoder.block.{i}.layer"
        keys |= {f"{block}.0.SelfAttention.{p}.weight" for p in "qkvo"} | {f"{block}.0.layer_norm.weight"}
        keys |= {f"{block}.1.DenseReluDense.{p}.weight" for p in ("wi_0", "wi_1", "wo")}
        keys.add(f"{block}.1.layer_norm.weight")
    return keys


def _t5(config: dict[str, object]) -> T5EncoderModel:
    return T5EncoderModel(T5Config(**config))


def _t5_file(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {k: v.to(dtype) for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert set(state) == _t5_file_keys(len(model.encoder.block))
    return state


def _rounded(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(dtype).float())
    return model


def _t5_source(seed: int = 3) -> nn.Module:
    model = _randomized(_t5(T5_TINY), seed=seed, std=0.2).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layer_norm" in name:
                parameter.add_(1.0)  # T5's RMS norm scales sit near 1
    return model


def _t5_run(model: nn.Module) -> torch.Tensor:
    ids = torch.tensor([[37, 1782, 3, 9, 1], [100, 2, 1, 0, 0]]) % T5_TINY["vocab_size"]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_a_16_bit_t5xxl_file_with_only_shared_weight_loads_into_the_same_encoder(tmp_path, stored):
    source = _rounded(_t5_source(), stored)
    path = tmp_path / "t5xxl_fp16.safetensors"
    save_file(_t5_file(source, stored), str(path))
    loaded = flux._load_encoder(str(path), torch.float32, lambda: _t5(T5_TINY), "t5xxl")
    assert torch.equal(loaded.get_input_embeddings().weight, source.shared.weight)
    torch.testing.assert_close(_t5_run(loaded), _t5_run(source), rtol=0, atol=0)


def test_the_fp8_t5xxl_file_loads_widened_with_fp8s_rounding_only(tmp_path):
    source = _t5_source()
    path = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    save_file(_t5_file(source, FP8), str(path))
    loaded = flux._load_encoder(str(path), torch.float32, lambda: _t5(T5_TINY), "t5xxl")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for name, parameter in source.named_parameters():  # e4m3: 3 mantissa bits, subnormals 2^-9 apart
        torch.testing.assert_close(loaded.get_parameter(name), parameter, rtol=2**-4, atol=2**-10)
    torch.testing.assert_close(_t5_run(loaded), _t5_run(_rounded(_t5_source(), FP8)), rtol=0, atol=0)

    in_bf16 = flux._load_encoder(str(path), torch.bfloat16, lambda: _t5(T5_TINY), "t5xxl")
    for name, parameter in in_bf16.named_parameters():  # every e4m3 value is exact in bfloat16
        assert parameter.dtype == torch.bfloat16 and torch.equal(parameter.float(), loaded.get_parameter(name)), name


def test_the_full_t5xxl_builder_takes_every_tensor_of_the_real_file(monkeypatch):
    """T5 v1.1 XXL's encoder (kohya's T5_CONFIG_JSON: d_model 4096, d_ff 10240, 64 heads of 64, 24 blocks, 32128
    tokens, 32 relative buckets), as meta tensors in float8 like t5xxl_fp8_e4m3fn.safetensors."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key in _t5_file_keys(24):
        if key == "shared.weight":
            shapes[key] = (32128, 4096)
        elif "relative_attention_bias" in key:
            shapes[key] = (32, 64)
        elif "wi_" in key:
            shapes[key] = (10240, 4096)
        elif ".wo." in key:
            shapes[key] = (4096, 10240)
        else:
            shapes[key] = (4096, 4096) if "SelfAttention" in key else (4096,)
    monkeypatch.setattr(flux, "_read_state", lambda path: _meta_state(shapes, FP8))
    loaded = flux._load_t5xxl("t5xxl_fp8_e4m3fn.safetensors", torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in loaded.parameters()) == 4_762_310_656  # T5-XXL's encoder, embedding once


def test_comfys_scaled_fp8_t5xxl_is_refused_by_name(tmp_path):
    """t5xxl_fp8_e4m3fn_scaled.safetensors keeps a scale per weight that kohya's loader would drop silently."""
    state = _t5_file(_t5_source(), FP8)
    state["scaled_fp8"] = torch.zeros(0, dtype=FP8)
    state["encoder.block.0.layer.0.SelfAttention.q.scale_weight"] = torch.tensor(0.01)
    path = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError, match=r"t5xxl = .*_scaled\.safetensors: .*scaled_fp8"):
        flux._load_encoder(str(path), torch.bfloat16, lambda: _t5(T5_TINY), "t5xxl")


# ---------------------------------------------------------------------------------------------------
# The wrong file


@pytest.fixture(scope="module")
def t5_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("t5") / "t5xxl_fp16.safetensors"
    save_file(_t5_file(_t5_source(), torch.float16), str(path))
    return path


def test_the_ae_file_given_as_t5xxl_names_the_missing_embedding(flux_ae):
    with pytest.raises(ModelError, match=r"t5xxl = .*ae\.safetensors: .*shared\.weight"):
        flux._load_encoder(str(flux_ae[1]), torch.bfloat16, lambda: _t5(T5_TINY), "t5xxl")


def test_the_t5xxl_file_given_as_clip_l_names_a_missing_tensor(t5_file):
    with pytest.raises(ModelError, match=r"clip_l = .*t5xxl_fp16\.safetensors: .*token_embedding\.weight"):
        flux._load_encoder(str(t5_file), torch.bfloat16, lambda: _clip(CLIP_TINY), "clip_l")


def test_the_clip_l_file_given_as_ae_names_a_missing_tensor(clip_tiny):
    with pytest.raises(ModelError, match=r"ae = .*clip_l\.safetensors: .*encoder\.conv_in\.weight"):
        flux._load_ae(str(clip_tiny[1]))


def test_a_wider_clip_given_as_clip_l_names_the_tensor_and_both_shapes(tmp_path):
    """CLIP-G's file has CLIP-L's key names with other widths (here a tiny one of width 48 for one of 32)."""
    path = tmp_path / "clip_g.safetensors"
    save_file(_clip_l_file(_clip({**CLIP_TINY, "hidden_size": 48, "projection_dim": 48})), str(path))
    with pytest.raises(ModelError, match=r"clip_l = .*clip_g\.safetensors: .*token_embedding\.weight .*\(49408, 48\)"):
        flux._load_encoder(str(path), torch.bfloat16, lambda: _clip(CLIP_TINY), "clip_l")
