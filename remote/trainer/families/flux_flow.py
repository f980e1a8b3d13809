"""Flux.1's training objective, rectified flow as kohya trains it (sd-scripts ``library/flux_train_utils.py``,
``get_noisy_model_input_and_timesteps`` and ``apply_model_prediction_type``; ``flux_train_network.py``,
``get_noise_pred_and_target``), and the 2x2 latent patches the transformer reads (``library/flux_utils.py``).

With sigma in [0, 1] (the noise level) and timestep t = 1000 sigma:

    noisy  = (1 - sigma) * latents + sigma * noise
    target = noise - latents                                      (the velocity d noisy / d sigma)

The formulas of each sampling mode and prediction type are in docs/trainer.md, "Flux.1".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

TimestepSampling = Literal["sigma", "uniform", "sigmoid", "shift", "flux_shift"]
PredictionType = Literal["raw", "additive", "sigma_scaled"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
PREDICTION_TYPES: tuple[str, ...] = ("raw", "additive", "sigma_scaled")
NUM_TIMESTEPS = 1000

# BFL's resolution-dependent shift (flux/sampling.py get_lin_function, kohya's copy): mu grows linearly with
# the number of image tokens, from 0.5 at 256 tokens to 1.15 at 4096.
BASE_SHIFT, MAX_SHIFT, BASE_SEQ_LEN, MAX_SEQ_LEN = 0.5, 1.15, 256, 4096


def shift_mu(image_tokens: int) -> float:
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return slope * image_tokens + (BASE_SHIFT - slope * BASE_SEQ_LEN)


def time_shift(mu: float, sigma: torch.Tensor) -> torch.Tensor:
    """BFL's time_shift with exponent 1: e^mu / (e^mu + (1 / sigma - 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def discrete_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shift (FlowMatchEulerDiscreteScheduler): shift * sigma / (1 + (shift - 1) * sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(
    mode: str,
    batch: int,
    latent_hw: tuple[int, int],
    generator: torch.Generator,
    device: torch.device,
    sigmoid_scale: float = 1.0,
    shift: float = 3.0,
) -> torch.Tensor:
    """One noise level per sample, as kohya draws it for ``timestep_sampling = mode`` (float32, in (0, 1])."""
    if mode == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if mode == "sigma":
        # kohya: an index into FlowMatchEulerDiscreteScheduler(1000, shift)'s sigmas, uniformly (weighting_scheme
        # "uniform"): sigma_i = shifted((1000 - i) / 1000), i = floor(1000 u)
        index = (torch.rand(batch, generator=generator, device=device) * NUM_TIMESTEPS).long()
        return discrete_shift((NUM_TIMESTEPS - index).float() / NUM_TIMESTEPS, shift)
    if mode not in ("sigmoid", "shift", "flux_shift"):
        raise ValueError(f"timestep_sampling {mode!r}: expected one of {', '.join(TIMESTEP_SAMPLINGS)}")
    sigmas = torch.sigmoid(sigmoid_scale * torch.randn(batch, generator=generator, device=device))
    if mode == "shift":
        return discrete_shift(sigmas, shift)
    if mode == "flux_shift":
        height, width = latent_hw
        return time_shift(shift_mu((height // 2) * (width // 2)), sigmas)
    return sigmas


@dataclass(frozen=True)
class FlowMatchObjective:
    """The ``Objective`` of Flux.1 (families/base.py). Timesteps are 1000 sigma, as kohya passes them on."""

    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "sigma_scaled"
    dynamic_shifting: bool = True  # the sampler's: [dev] shifts its schedule with the image size, [schnell] not

    num_timesteps = NUM_TIMESTEPS

    def sample_timesteps(self, shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        sigmas = sample_sigmas(
            self.timestep_sampling,
            shape[0],
            (shape[-2], shape[-1]),
            generator,
            device,
            self.sigmoid_scale,
            self.discrete_flow_shift,
        )
        return sigmas * NUM_TIMESTEPS

    @staticmethod
    def sigmas(timesteps: torch.Tensor) -> torch.Tensor:
        return (timesteps.float() / NUM_TIMESTEPS).view(-1, 1, 1, 1)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas(timesteps)
        return (1.0 - sigmas) * latents + sigmas * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def loss_prediction(self, prediction: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """kohya's apply_model_prediction_type: raw as is; additive + noisy; sigma_scaled -sigma * pred + noisy
        (then compared with the same target noise - latents: kohya's behaviour, kept for identical training)."""
        if self.model_prediction_type == "raw":
            return prediction
        if self.model_prediction_type == "additive":
            return prediction + noisy.to(prediction.dtype)
        if self.model_prediction_type == "sigma_scaled":
            sigmas = self.sigmas(timesteps).to(prediction.dtype)
            return prediction * (-sigmas) + noisy.to(prediction.dtype)
        raise ValueError(f"model_prediction_type {self.model_prediction_type!r}: expected one of {PREDICTION_TYPES}")

    def min_snr_weight(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """kohya applies no min-SNR weighting to Flux (its post_process_loss returns the loss unchanged)."""
        return torch.ones_like(timesteps, dtype=torch.float32)

    def sampling_scheduler(self) -> Any:
        """diffusers' Euler flow-matching sampler with FLUX.1's pipeline settings (the dev model's scheduler
        config: resolution-dependent shift from 0.5 at 256 tokens to 1.15 at 4096; schnell: no shift)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not self.dynamic_shifting:
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TIMESTEPS, shift=1.0)
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=NUM_TIMESTEPS,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=BASE_SHIFT,
            max_shift=MAX_SHIFT,
            base_image_seq_len=BASE_SEQ_LEN,
            max_image_seq_len=MAX_SEQ_LEN,
        )


# ---------------------------------------------------------------------------------------------------
# The transformer's view of the latents: 2x2 patches as tokens, and their positions


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 2h, 2w] -> [B, h*w, C*4]: each 2x2 patch one token, channels outer, then row, then column
    (kohya's ``b c (h ph) (w pw) -> b (h w) (c ph pw)``; diffusers' FluxPipeline._pack_latents)."""
    b, c, height, width = latents.shape
    x = latents.view(b, c, height // 2, 2, width // 2, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (height // 2) * (width // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for latents of ``height`` x ``width``."""
    b, _, packed_channels = tokens.shape
    c = packed_channels // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """[h*w, 3] position ids of the packed tokens of latents ``height`` x ``width``: (0, row, column)."""
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3)


def text_ids(tokens: int, device: torch.device | None = None) -> torch.Tensor:
    """[T, 3] zeros: the text tokens all sit at position 0 (BFL's and kohya's txt_ids)."""
    return torch.zeros(tokens, 3, device=device)
