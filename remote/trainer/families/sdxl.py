"""SDXL (``sdxl``): a larger UNet conditioned on two CLIP text encoders (their penultimate hidden states
concatenated) plus the second encoder's pooled embedding and the image's size and crop (``time_ids``).
kohya names its LoRA modules after SGM's blocks (input_blocks / middle_block / output_blocks), with the
resnet and sampler layers renamed to their SGM spelling (TRAINER.md §1.2, §1.7)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import clip
from .base import Components, ModelFamily
from .ddpm import DDPMObjective
from .sd import UNET_CONV_LORA_PARENTS, UNET_LORA_PARENTS

if TYPE_CHECKING:
    from ..data import ImageRecord
    from ..models import ModelBundle


class StableDiffusionXL(ModelFamily):
    latent_scale = 0.13025
    lora_parents = UNET_LORA_PARENTS
    lora_conv_parents = UNET_CONV_LORA_PARENTS
    text_lora_parents = clip.CLIP_LORA_PARENTS

    def load_diffusers(self, reference: str, dtype: torch.dtype, device: torch.device | None) -> Components:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        place: dict[str, Any] = {"device_map": str(device)} if device is not None and device.type == "cuda" else {}
        unet = UNet2DConditionModel.from_pretrained(reference, subfolder="unet", torch_dtype=dtype, **place)
        vae = AutoencoderKL.from_pretrained(reference, subfolder="vae", torch_dtype=torch.float32, **place)
        first = CLIPTextModel.from_pretrained(reference, subfolder="text_encoder", torch_dtype=dtype, **place)
        second = CLIPTextModelWithProjection.from_pretrained(
            reference, subfolder="text_encoder_2", torch_dtype=dtype, **place
        )
        tokenizers = [
            CLIPTokenizer.from_pretrained(reference, subfolder="tokenizer"),
            CLIPTokenizer.from_pretrained(reference, subfolder="tokenizer_2"),
        ]
        return {"unet": unet, "vae": vae, "text_encoders": [first, second], "tokenizers": tokenizers}

    def load_single_file(
        self, path: Path, dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> Components:
        """diffusers' from_single_file (configs from the hub, see sd.py)."""
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_single_file(str(path))
        return {
            "unet": pipe.unet,
            "vae": pipe.vae,
            "text_encoders": [pipe.text_encoder, pipe.text_encoder_2],
            "tokenizers": [pipe.tokenizer, pipe.tokenizer_2],
        }

    def build_tiny(self) -> Components:
        from ..tiny import build_components

        unet = {
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "transformer_layers_per_block": (1, 2),
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "cross_attention_dim": 64,
        }
        return build_components(unet, self.latent_scale, second_text_encoder=True)

    def tokenize(
        self, tokenizers: Sequence[Any], captions: list[str], max_token_length: int | None
    ) -> list[torch.Tensor]:
        return clip.tokenize(tokenizers, captions, max_token_length)

    def encode(
        self, text_encoders: Sequence[Any], ids: list[torch.Tensor], clip_skip: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The penultimate hidden state of both encoders without the final norm, concatenated; pooled = text
        encoder 2's projected EOS state. clip_skip is ignored, as kohya does for SDXL."""
        device = next(text_encoders[0].parameters()).device
        batch, chunks = ids[0].shape[:2]
        h1, _ = clip.hidden_states(text_encoders[0], clip.flat_ids(ids[0], device), 2, final_norm=False)
        h2, out2 = clip.hidden_states(text_encoders[1], clip.flat_ids(ids[1], device), 2, final_norm=False)
        pooled = out2.text_embeds.view(batch, chunks, -1)[:, 0]
        context = torch.cat([clip.merge_chunks(h1, chunks), clip.merge_chunks(h2.to(h1.dtype), chunks)], dim=-1)
        return context, pooled

    def objective(self, v_prediction: bool) -> DDPMObjective:
        return DDPMObjective(v_prediction)

    def step_conditions(self, records: Sequence[ImageRecord], flips: Sequence[bool]) -> dict[str, torch.Tensor]:
        """time_ids: each image's original size, its crop's top-left (mirrored when flipped) and its bucket."""
        original = [(r.original_size[1], r.original_size[0]) for r in records]
        crops = []
        for r, f in zip(records, flips, strict=True):
            left, top, right, _ = r.crop_ltrb
            crops.append((int(top), int(r.bucket[0] - right if f else left)))
        target = [(r.bucket[1], r.bucket[0]) for r in records]
        return {"time_ids": time_ids(original, crops, target)}

    def predict(
        self,
        unet: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor | None,
        conditions: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        assert pooled is not None, "SDXL's second text encoder gives the pooled embedding"
        added = {"text_embeds": pooled.to(noisy.dtype), "time_ids": conditions["time_ids"]}
        return unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample

    def kohya_unet_namer(self, unet: nn.Module) -> Callable[[str], str]:
        layers_per_block = _layers_per_block(unet)
        up_has_attention = _up_blocks_with_attention(unet)
        return lambda path: diffusers_to_sgm(path, layers_per_block, up_has_attention)

    def sampling_pipeline(self, bundle: ModelBundle, scheduler: Any) -> Any:
        # from its module: diffusers' top-level names read as stand-ins to a type checker
        from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=bundle.vae,
            text_encoder=bundle.text_encoders[0],
            text_encoder_2=bundle.text_encoders[1],
            tokenizer=bundle.tokenizers[0],
            tokenizer_2=bundle.tokenizers[1],
            unet=bundle.unet,
            scheduler=scheduler,
        )

    def pipeline_embeds(
        self,
        context: torch.Tensor,
        pooled: torch.Tensor | None,
        conditions: dict[str, torch.Tensor],
        size: tuple[int, int],
    ) -> dict[str, Any]:
        assert pooled is not None, "SDXL's second text encoder gives the pooled embedding"
        return {
            "prompt_embeds": context[:1],
            "negative_prompt_embeds": context[1:],
            "pooled_prompt_embeds": pooled[:1],
            "negative_pooled_prompt_embeds": pooled[1:],
        }

    def base_model_metadata(self, v_prediction: bool, info: Mapping[str, object] | None = None) -> dict[str, object]:
        return {
            "ss_v2": False,
            "ss_base_model_version": "sdxl_base_v1-0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        }


def time_ids(original_hw, crop_top_left, target_hw) -> torch.Tensor:
    """[B, 6] = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample, as diffusers wants."""
    rows = [list(o) + list(c) + list(t) for o, c, t in zip(original_hw, crop_top_left, target_hw, strict=True)]
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# kohya's SGM names


def _sgm_resnet_inner(rest: str) -> str:
    return (
        rest.replace("conv1", "in_layers.2", 1)
        .replace("time_emb_proj", "emb_layers.1", 1)
        .replace("conv2", "out_layers.3", 1)
        .replace("conv_shortcut", "skip_connection", 1)
    )


def diffusers_to_sgm(path: str, layers_per_block: int, up_has_attention: dict[int, bool] | None = None) -> str:
    """A diffusers UNet module path -> the SGM/LDM path kohya's SDXL UNet uses (TRAINER.md §1.2)."""
    n = layers_per_block + 1
    m = re.match(r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)$", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        inner = 1 if kind == "attentions" else 0
        if kind == "resnets":
            rest = _sgm_resnet_inner(rest)
        return f"input_blocks.{i * n + j + 1}.{inner}.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", path)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op"
    m = re.match(r"mid_block\.attentions\.0\.(.*)$", path)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.*)$", path)
    if m:
        return f"middle_block.{0 if m[1] == '0' else 2}.{_sgm_resnet_inner(m[2])}"
    m = re.match(r"up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)$", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        inner = 1 if kind == "attentions" else 0
        if kind == "resnets":
            rest = _sgm_resnet_inner(rest)
        return f"output_blocks.{i * n + j}.{inner}.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", path)
    if m:
        i = int(m[1])
        has_attention = (up_has_attention or {}).get(i, False)
        return f"output_blocks.{i * n + n - 1}.{2 if has_attention else 1}.conv"
    raise ValueError(f"no SGM name for UNet module {path!r}")


def _layers_per_block(unet: nn.Module) -> int:
    config = getattr(unet, "config", None)
    value = getattr(config, "layers_per_block", 2) if config is not None else 2
    if isinstance(value, (list, tuple)):
        value = value[0]
    return int(value)


def _up_blocks_with_attention(unet: nn.Module) -> dict[int, bool]:
    blocks = getattr(unet, "up_blocks", None)
    if blocks is None:
        return {}
    return {i: getattr(block, "attentions", None) is not None for i, block in enumerate(blocks)}


SDXL = StableDiffusionXL("sdxl")
IMPLEMENTATIONS: dict[str, ModelFamily] = {"sdxl": SDXL}
