"""Flux.1's names: kohya's LoRA module names (sd-scripts ``networks/lora_flux.py``, which names the layers of
BFL's original model) over diffusers' FluxTransformer2DModel, and the original (BFL) checkpoint layout read
into diffusers' module layout.

kohya's LoRA wraps every Linear of BFL's DoubleStreamBlock and SingleStreamBlock. Some of those are one fused
Linear in BFL's model and several in diffusers': a double block's ``img_attn.qkv`` is diffusers' to_q, to_k and
to_v; a single block's ``linear1`` is to_q, to_k, to_v and proj_mlp. Such a group gets ONE LoRA whose down
projection is shared by its members and whose up projection is the members' ups stacked, which is exactly
kohya's LoRA of the fused layer (lora.py). The same correspondence is diffusers' own
(``lora_conversion_utils._convert_kohya_flux_lora_to_diffusers``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch

NUM_DOUBLE_BLOCKS = 19  # FLUX.1 [dev] and [schnell]
NUM_SINGLE_BLOCKS = 38

# kohya's module (BFL's name inside a block) -> the diffusers layers it covers (inside the block), in kohya's order
DOUBLE_BLOCK_TARGETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_mod.lin", ("norm1.linear",)),
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("img_mlp.0", ("ff.net.0.proj",)),
    ("img_mlp.2", ("ff.net.2",)),
    ("txt_mod.lin", ("norm1_context.linear",)),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("txt_attn.proj", ("attn.to_add_out",)),
    ("txt_mlp.0", ("ff_context.net.0.proj",)),
    ("txt_mlp.2", ("ff_context.net.2",)),
)
SINGLE_BLOCK_TARGETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
    ("modulation.lin", ("norm.linear",)),
)
DIFFUSERS_BLOCKS = {
    "transformer_blocks": ("double_blocks", DOUBLE_BLOCK_TARGETS),
    "single_transformer_blocks": ("single_blocks", SINGLE_BLOCK_TARGETS),
}


def kohya_path(diffusers_path: str) -> str:
    """A diffusers layer path -> the BFL path kohya names its LoRA after ("transformer_blocks.3.attn.to_k" ->
    "double_blocks.3.img_attn.qkv"). ValueError for a layer outside kohya's targets."""
    m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", diffusers_path)
    if m:
        block, targets = DIFFUSERS_BLOCKS[m[1]]
        for name, members in targets:
            if m[3] in members:
                return f"{block}.{m[2]}.{name}"
    raise ValueError(f"no kohya Flux name for transformer layer {diffusers_path!r}")


def block_selection(chosen: Iterable[int] | None, total: int, key: str) -> list[bool]:
    """Which of ``total`` blocks get LoRA: ``chosen`` (the config's train_*_block_indices, kohya's syntax parsed
    there), every block when None. ValueError for an index this model does not have."""
    if chosen is None:
        return [True] * total
    indices = set(chosen)
    bad = sorted(i for i in indices if not 0 <= i < total)
    if bad:
        raise ValueError(f"{key}: block {bad[0]} does not exist (this model has blocks 0-{total - 1})")
    return [i in indices for i in range(total)]


# ---------------------------------------------------------------------------------------------------
# The original (BFL) checkpoint layout -> diffusers' FluxTransformer2DModel


ORIGINAL_PREFIXES = ("model.diffusion_model.",)  # ComfyUI's full checkpoints nest the model under this prefix
_TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_DOUBLE_PLAIN = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE_PLAIN = {
    "linear2": "proj_out",
    "modulation.lin": "norm.linear",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}


def is_original_layout(keys: Sequence[str]) -> bool:
    return any(_strip(k).startswith("double_blocks.") for k in keys)


def _strip(key: str) -> str:
    for prefix in ORIGINAL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def original_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL's flux1-*.safetensors keys -> FluxTransformer2DModel's. Fused layers are split (qkv into q, k, v;
    a single block's linear1 into q, k, v and the MLP's input); the final modulation's (shift, scale) halves
    swap into diffusers' (scale, shift). ValueError naming a key that has no place."""
    source = {_strip(k): v for k, v in state.items()}
    inner = source["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        stem, _, leaf = key.rpartition(".")
        if stem in _TOP_LEVEL:
            out[f"{_TOP_LEVEL[stem]}.{leaf}"] = value
        elif stem == "final_layer.adaLN_modulation.1":
            shift, scale = value.chunk(2, dim=0)
            out[f"norm_out.linear.{leaf}"] = torch.cat([scale, shift], dim=0)
        elif key.startswith("double_blocks."):
            out.update(_double_block(key, value))
        elif key.startswith("single_blocks."):
            out.update(_single_block(key, value, inner))
        else:
            raise ValueError(f"unexpected key {key!r} in a Flux.1 checkpoint")
    return out


def _double_block(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    _, index, rest = key.split(".", 2)
    block = f"transformer_blocks.{index}"
    for original, target in _DOUBLE_PLAIN.items():
        if rest == original or rest.startswith(original + "."):
            return {f"{block}.{target}{rest[len(original) :]}": value}
    m = re.match(r"(img|txt)_attn\.qkv\.(weight|bias)$", rest)
    if m:
        names = ("to_q", "to_k", "to_v") if m[1] == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
        return {f"{block}.attn.{n}.{m[2]}": part for n, part in zip(names, value.chunk(3, dim=0), strict=True)}
    raise ValueError(f"unexpected key {key!r} in a Flux.1 checkpoint")


def _single_block(key: str, value: torch.Tensor, inner: int) -> dict[str, torch.Tensor]:
    _, index, rest = key.split(".", 2)
    block = f"single_transformer_blocks.{index}"
    for original, target in _SINGLE_PLAIN.items():
        if rest == original or rest.startswith(original + "."):
            return {f"{block}.{target}{rest[len(original) :]}": value}
    m = re.match(r"linear1\.(weight|bias)$", rest)
    if m:
        sizes = [inner, inner, inner, value.shape[0] - 3 * inner]
        names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        return {f"{block}.{n}.{m[1]}": part for n, part in zip(names, value.split(sizes, dim=0), strict=True)}
    raise ValueError(f"unexpected key {key!r} in a Flux.1 checkpoint")


def transformer_config(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """FluxTransformer2DModel's config read from a diffusers-layout state dict's shapes. The rotary axes are
    BFL's split of the head width, (1/8, 7/16, 7/16): (16, 56, 56) for FLUX.1's 128."""
    inner, in_channels = state["x_embedder.weight"].shape
    head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]

    def count(prefix: str) -> int:
        return 1 + max(int(k.split(".")[1]) for k in state if k.startswith(prefix + "."))

    return {
        "patch_size": 1,
        "in_channels": int(in_channels),
        "num_layers": count("transformer_blocks"),
        "num_single_layers": count("single_transformer_blocks"),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(inner // head_dim),
        "joint_attention_dim": int(state["context_embedder.weight"].shape[1]),
        "pooled_projection_dim": int(state["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in state,
        "axes_dims_rope": (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16),
    }
