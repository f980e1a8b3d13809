"""SD 1.x (``sd15``) and SD 2.x (``sd2``): a UNet2DConditionModel conditioned on one CLIP text encoder (CLIP-L
for 1.x, OpenCLIP-H for 2.x), DDPM with an epsilon or v target. kohya names their LoRA modules after
diffusers' own block names (its SD UNet is diffusers-shaped)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import clip
from .base import Components, ModelFamily
from .ddpm import DDPMObjective

if TYPE_CHECKING:
    from ..models import ModelBundle

# kohya's UNet LoRA targets (TRAINER.md §1.1): every Linear and 1x1 conv in the transformer blocks, and with
# conv_dim every conv of the resnets and samplers. SDXL's UNet has the same classes.
UNET_LORA_PARENTS = ("Transformer2DModel",)
UNET_CONV_LORA_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


class StableDiffusion(ModelFamily):
    """SD 1.x and 2.x; they differ in facts (facts.py), metadata and the text encoder's width only."""

    latent_scale = 0.18215
    lora_parents = UNET_LORA_PARENTS
    lora_conv_parents = UNET_CONV_LORA_PARENTS
    text_lora_parents = clip.CLIP_LORA_PARENTS

    def __init__(self, name: str, v2: bool, base_model_version: str, architecture: str, architecture_v: str):
        super().__init__(name)
        self.v2 = v2
        self._versions = (base_model_version, base_model_version + "_v")
        self._architectures = (architecture, architecture_v)

    def load_diffusers(self, reference: str, dtype: torch.dtype, device: torch.device | None) -> Components:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        place: dict[str, Any] = {"device_map": str(device)} if device is not None and device.type == "cuda" else {}
        return {
            "unet": UNet2DConditionModel.from_pretrained(reference, subfolder="unet", torch_dtype=dtype, **place),
            "vae": AutoencoderKL.from_pretrained(reference, subfolder="vae", torch_dtype=torch.float32, **place),
            "text_encoders": [
                CLIPTextModel.from_pretrained(reference, subfolder="text_encoder", torch_dtype=dtype, **place)
            ],
            "tokenizers": [CLIPTokenizer.from_pretrained(reference, subfolder="tokenizer")],
        }

    def load_single_file(
        self, path: Path, dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> Components:
        """diffusers' from_single_file; it reads the architecture config from the hub (reachable on the rented
        machine). The prediction type is not taken from it: the training schedule follows the config."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None, requires_safety_checker=False)
        return {
            "unet": pipe.unet,
            "vae": pipe.vae,
            "text_encoders": [pipe.text_encoder],
            "tokenizers": [pipe.tokenizer],
        }

    def build_tiny(self) -> Components:
        from ..tiny import build_components

        if self.v2:
            raise ValueError(f"no tiny model for family {self.name!r}")
        unet = {"cross_attention_dim": 32, "attention_head_dim": 8}
        return build_components(unet, self.latent_scale, second_text_encoder=False)

    def tokenize(
        self, tokenizers: Sequence[Any], captions: list[str], max_token_length: int | None
    ) -> list[torch.Tensor]:
        return clip.tokenize(tokenizers, captions, max_token_length)

    def encode(
        self, text_encoders: Sequence[Any], ids: list[torch.Tensor], clip_skip: int | None
    ) -> tuple[torch.Tensor, None]:
        """last_hidden_state, or with clip_skip = k the k-th hidden state from the end passed through the
        final layer norm; no pooled embedding."""
        device = next(text_encoders[0].parameters()).device
        chunks = ids[0].shape[1]
        skip = clip_skip if clip_skip and clip_skip > 1 else None
        hidden, _ = clip.hidden_states(text_encoders[0], clip.flat_ids(ids[0], device), skip, final_norm=True)
        return clip.merge_chunks(hidden, chunks), None

    def objective(self, v_prediction: bool) -> DDPMObjective:
        return DDPMObjective(v_prediction)

    def predict(
        self,
        unet: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor | None,
        conditions: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        return unet(noisy, timesteps, encoder_hidden_states=context).sample

    def kohya_unet_namer(self, unet: torch.nn.Module) -> Callable[[str], str]:
        return lambda path: path

    def sampling_pipeline(self, bundle: ModelBundle, scheduler: Any) -> Any:
        # from its module: diffusers' top-level names read as stand-ins to a type checker
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=bundle.vae,
            text_encoder=bundle.text_encoders[0],
            tokenizer=bundle.tokenizers[0],
            unet=bundle.unet,
            scheduler=scheduler,
            # None: no safety checker (diffusers' documented way; its annotations omit None)
            safety_checker=None,  # type: ignore[arg-type]
            feature_extractor=None,  # type: ignore[arg-type]
            requires_safety_checker=False,
        )

    def pipeline_embeds(
        self,
        context: torch.Tensor,
        pooled: torch.Tensor | None,
        conditions: dict[str, torch.Tensor],
        size: tuple[int, int],
    ) -> dict[str, Any]:
        return {"prompt_embeds": context[:1], "negative_prompt_embeds": context[1:]}

    def base_model_metadata(self, v_prediction: bool, info: Mapping[str, object] | None = None) -> dict[str, object]:
        return {
            "ss_v2": self.v2,
            "ss_base_model_version": self._versions[v_prediction],
            "modelspec.architecture": self._architectures[v_prediction],
            "modelspec.implementation": "diffusers",
        }


SD15 = StableDiffusion("sd15", False, "sd_v1", "stable-diffusion-v1/lora", "stable-diffusion-v1/lora")
SD2 = StableDiffusion("sd2", True, "sd_v2", "stable-diffusion-v2-512/lora", "stable-diffusion-v2-768-v/lora")
IMPLEMENTATIONS: dict[str, ModelFamily] = {"sd15": SD15, "sd2": SD2}
