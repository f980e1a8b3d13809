"""What a model family implements (``ModelFamily``), and what the rest of the trainer may ask of it.

The trainer never asks which family a model is: it asks the model's family object (``get_family(name)``)
to load the weights, encode captions, give the noise schedule and training target, name the LoRA modules,
build the sampling pipeline and write the base model's metadata. The plain facts the planner and the
client need (memory, sizes) are in facts.py, importable without torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypedDict

import torch
from torch import nn

from .facts import FamilyFacts, family_facts

if TYPE_CHECKING:
    from remote.config import TrainConfig

    from ..data import ImageRecord
    from ..models import ModelBundle


OMIT = object()  # a metadata value that removes its key (base_model_metadata)


class ModelError(Exception):
    """The base model cannot be used as configured. The message says what was found."""


class Components(TypedDict):
    """A loaded pipeline's trainable-model parts (diffusers' classes, whose decorated ``.to`` mypy cannot follow)."""

    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]


class LoRATarget(NamedTuple):
    """One kohya LoRA module: its name (``lora_unet_...``), the layers it adapts (one; or the layers that one
    fused Linear of kohya's model is in diffusers' model, which then share the LoRA's down projection), and
    whether it is a 3x3 convolution (conv_dim)."""

    name: str
    modules: tuple[nn.Module, ...]
    conv3: bool


class Objective(Protocol):
    """The noise schedule and what the denoiser learns to predict (kohya's DDPM with an epsilon or v target,
    ddpm.py; Flux.1's rectified flow, flux_flow.py)."""

    num_timesteps: int

    def sample_timesteps(self, shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """One timestep per sample of latents of ``shape``, drawn from ``generator``."""
        ...

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def loss_prediction(self, prediction: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser's output as the loss compares it with ``target`` (kohya's model_prediction_type)."""
        ...

    def min_snr_weight(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor: ...

    def sampling_scheduler(self) -> Any: ...


class ModelFamily(ABC):
    """One model family: everything about it that differs from the others. One module per family
    (sd.py: SD 1.x and 2.x; sdxl.py), registered by name in facts.py."""

    text_encoder_lora = True  # whether kohya's network for this family can adapt the text encoders here
    latent_shift = 0.0  # subtracted from the VAE's latents before the scale (Flux's AE: 0.1159)
    sample_guidance = 7.0  # the samples' guidance scale when the config sets none
    cudnn_attention = True  # whether attention may run on cuDNN's fused kernel (run_setup.choose_attention_kernels)
    # whether fp16 runs throughout, without autocast: the frozen model's activations stay within fp16's range
    # (SD's UNets and CLIP encoders, as fp16 inference runs them; bench/fast_path_check.py --fp16 compares it)
    fp16_throughout = True

    def __init__(self, name: str):
        self.facts: FamilyFacts = family_facts(name)

    @property
    def name(self) -> str:
        return self.facts.name

    def checkpoint_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        """The denoiser's blocks that gradient checkpointing wraps, in the order they run, when they are alike
        enough for the memory plan to leave the last few of them unchecked (FamilyProfile.checkpoint_blocks);
        empty: checkpointing is all or nothing."""
        return []

    def configure(self, cfg: TrainConfig) -> ModelFamily:
        """This family with the run's family-specific options (Flux: its flow-matching keys). The SD families
        have none: themselves."""
        return self

    # --- loading --------------------------------------------------------------------------------------

    @abstractmethod
    def load_diffusers(self, reference: str, dtype: torch.dtype, device: torch.device | None) -> Components:
        """From a diffusers folder or hub id; the denoiser and text encoders in ``dtype``, on a GPU ``device``
        directly."""

    @abstractmethod
    def load_single_file(
        self, path: Path, dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> Components:
        """From one original-layout checkpoint (.safetensors / .ckpt); ``dtype`` and a GPU ``device`` as for
        ``load_diffusers``, where the family can use them."""

    def model_info(self, parts: Components) -> dict[str, object]:
        """Facts of the loaded model that the LoRA file's metadata names (Flux: dev or schnell), for
        ``base_model_metadata``'s ``info``. None by default."""
        return {}

    @abstractmethod
    def build_tiny(self) -> Components:
        """The built-in tiny model of this family (tiny.py); families without one raise ValueError."""

    @property
    @abstractmethod
    def latent_scale(self) -> float:
        """kohya's latent scale, fixed by family (a separate VAE file's own config may carry another's)."""

    # --- text -----------------------------------------------------------------------------------------

    @abstractmethod
    def tokenize(
        self, tokenizers: Sequence[Any], captions: list[str], max_token_length: int | None
    ) -> list[torch.Tensor]:
        """One id tensor per tokenizer, [B, chunks, tokens]."""

    @abstractmethod
    def encode(
        self, text_encoders: Sequence[Any], ids: list[torch.Tensor], clip_skip: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context [B, T, C], pooled [B, P] or None), as kohya computes them. These are what the trainer
        caches when the text encoders are frozen."""

    def text_conditions(self, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-caption conditions besides the encoders' outputs that the token ids give (Flux: the T5 attention
        mask), batch-first host tensors; cached with the encoders' outputs. None by default."""
        return {}

    # --- training -------------------------------------------------------------------------------------

    @abstractmethod
    def objective(self, v_prediction: bool) -> Objective:
        """The noise schedule and the training target."""

    def step_conditions(self, records: Sequence[ImageRecord], flips: Sequence[bool]) -> dict[str, torch.Tensor]:
        """Per-sample conditioning besides the text that a batch's images give (SDXL's size and crop ids),
        as host tensors; they reach ``predict`` in ``conditions``. None by default."""
        return {}

    @abstractmethod
    def predict(
        self,
        unet: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor | None,
        conditions: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The denoiser's prediction for ``noisy`` (inputs already in the compute dtype); ``conditions`` holds
        what ``step_conditions`` and ``text_conditions`` gave."""

    # --- LoRA -----------------------------------------------------------------------------------------

    @property
    @abstractmethod
    def lora_parents(self) -> tuple[str, ...]:
        """Class names of the denoiser's modules whose Linear and 1x1-conv layers get LoRA."""

    @property
    @abstractmethod
    def lora_conv_parents(self) -> tuple[str, ...]:
        """Class names whose Conv2d layers also get LoRA when a conv_dim is set."""

    @property
    @abstractmethod
    def text_lora_parents(self) -> tuple[str, ...]:
        """Class names of the text encoders' modules whose Linear layers get LoRA."""

    @abstractmethod
    def kohya_unet_namer(self, unet: torch.nn.Module) -> Callable[[str], str]:
        """Maps a denoiser module path (diffusers' names) to the path kohya's key names use."""

    def lora_targets(self, unet: nn.Module, conv_dim: int | None) -> list[LoRATarget]:
        """kohya's denoiser LoRA modules, in kohya's order: every Linear and 1x1 conv inside a ``lora_parents``
        module, and with ``conv_dim`` every conv inside a ``lora_conv_parents`` module; one layer each."""
        parents = self.lora_parents + (self.lora_conv_parents if conv_dim else ())
        kohya_path = self.kohya_unet_namer(unet)
        found: list[LoRATarget] = []
        seen: set[int] = set()
        for parent_name, parent in unet.named_modules():
            if parent.__class__.__name__ not in parents:
                continue
            for child_name, child in parent.named_modules():
                is_linear = isinstance(child, nn.Linear)
                is_conv = isinstance(child, nn.Conv2d)
                if not (is_linear or is_conv) or id(child) in seen:
                    continue
                is_1x1 = is_conv and tuple(child.kernel_size) == (1, 1)
                if is_conv and not is_1x1 and not conv_dim:
                    continue
                seen.add(id(child))
                path = kohya_path(_module_path(parent_name, child_name))
                found.append(LoRATarget("lora_unet_" + path.replace(".", "_"), (child,), is_conv and not is_1x1))
        return found

    # --- sampling and export --------------------------------------------------------------------------

    @abstractmethod
    def sampling_pipeline(self, bundle: ModelBundle, scheduler: Any) -> Any:
        """A diffusers pipeline over the bundle's (LoRA-hooked) modules."""

    @abstractmethod
    def pipeline_embeds(
        self,
        context: torch.Tensor,
        pooled: torch.Tensor | None,
        conditions: dict[str, torch.Tensor],
        size: tuple[int, int],
    ) -> dict[str, Any]:
        """The pipeline's prompt-embedding arguments for a [prompt, negative] pair encoded by ``encode`` (with its
        ``text_conditions``), for images of ``size`` (width, height)."""

    def latents_for_decoding(self, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The pipeline's latent output as the VAE decodes it: unscaled (and unshifted, unpacked)."""
        return latents / self.latent_scale + self.latent_shift

    @abstractmethod
    def base_model_metadata(self, v_prediction: bool, info: Mapping[str, object] | None = None) -> dict[str, object]:
        """The LoRA file's keys that describe the base model (ss_v2, ss_base_model_version, modelspec.*); they
        replace build_metadata's, and a value ``OMIT`` removes the key. ``info``: the run's, with ``model_info``."""


def _module_path(parent_name: str, child_name: str) -> str:
    path = f"{parent_name}.{child_name}" if child_name else parent_name
    # diffusers' Downsample2D registers one conv as both Conv2d_0 and conv; kohya's UNet calls it conv.
    if path.endswith("Conv2d_0"):
        path = path[: -len("Conv2d_0")] + "conv"
    return path
