"""What a model family implements (``ModelFamily``), and what the rest of the trainer may ask of it.

The trainer never asks which family a model is: it asks the model's family object (``get_family(name)``)
to load the weights, encode captions, give the noise schedule and training target, name the LoRA modules,
build the sampling pipeline and write the base model's metadata. The plain facts the planner and the
client need (memory, sizes) are in facts.py, importable without torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

import torch

from .facts import FamilyFacts, family_facts

if TYPE_CHECKING:
    from ..data import ImageRecord
    from ..models import ModelBundle


class ModelError(Exception):
    """The base model cannot be used as configured. The message says what was found."""


class Components(TypedDict):
    """A loaded pipeline's trainable-model parts (diffusers' classes, whose decorated ``.to`` mypy cannot follow)."""

    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]


class Objective(Protocol):
    """The noise schedule and what the denoiser learns to predict (kohya's DDPM with an epsilon or v target;
    later flow matching)."""

    num_timesteps: int

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def min_snr_weight(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor: ...

    def sampling_scheduler(self) -> Any: ...


class ModelFamily(ABC):
    """One model family: everything about it that differs from the others. One module per family
    (sd.py: SD 1.x and 2.x; sdxl.py), registered by name in facts.py."""

    def __init__(self, name: str):
        self.facts: FamilyFacts = family_facts(name)

    @property
    def name(self) -> str:
        return self.facts.name

    # --- loading --------------------------------------------------------------------------------------

    @abstractmethod
    def load_diffusers(self, reference: str, dtype: torch.dtype, device: torch.device | None) -> Components:
        """From a diffusers folder or hub id; the denoiser and text encoders in ``dtype``, on a GPU ``device``
        directly."""

    @abstractmethod
    def load_single_file(self, path: Path) -> Components:
        """From one original-layout checkpoint (.safetensors / .ckpt)."""

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

    # --- training -------------------------------------------------------------------------------------

    @abstractmethod
    def objective(self, v_prediction: bool) -> Objective:
        """The noise schedule and the training target."""

    def step_conditions(self, records: Sequence[ImageRecord], flips: Sequence[bool]) -> dict[str, torch.Tensor]:
        """Per-sample conditioning besides the text that a batch's images give (SDXL's size and crop ids),
        as host tensors named after ``StepInputs`` fields. None by default."""
        return {}

    @abstractmethod
    def predict(
        self,
        unet: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor | None,
        time_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """The denoiser's prediction for ``noisy`` (inputs already in the compute dtype)."""

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

    # --- sampling and export --------------------------------------------------------------------------

    @abstractmethod
    def sampling_pipeline(self, bundle: ModelBundle, scheduler: Any) -> Any:
        """A diffusers pipeline over the bundle's (LoRA-hooked) modules."""

    @abstractmethod
    def pipeline_embeds(self, context: torch.Tensor, pooled: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The pipeline's prompt-embedding arguments for a [prompt, negative] pair encoded by ``encode``."""

    @abstractmethod
    def base_model_metadata(self, v_prediction: bool) -> dict[str, object]:
        """The LoRA file's keys that describe the base model (ss_v2, ss_base_model_version, modelspec.*)."""
