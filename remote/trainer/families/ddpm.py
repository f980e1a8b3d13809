"""kohya's training schedule for the SD families: DDPM with SD's betas (scaled_linear 0.00085..0.012, 1000
steps), an epsilon or v-prediction target, min-SNR weighting; DDIM with the same betas for samples."""

from __future__ import annotations

from typing import Any

import torch

BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


class DDPMObjective:
    """The ``Objective`` of SD 1.x/2.x and SDXL."""

    num_timesteps = 1000

    def __init__(self, v_prediction: bool):
        from diffusers import DDPMScheduler

        self.v_prediction = v_prediction
        # diffusers' scheduler, whose annotations want IntTensor timesteps
        self.scheduler: Any = DDPMScheduler(
            **BETAS, clip_sample=False, prediction_type="v_prediction" if v_prediction else "epsilon"
        )

    def sample_timesteps(self, shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Uniform integer timesteps in [0, 1000), as kohya draws them."""
        return torch.randint(0, self.num_timesteps, (shape[0],), generator=generator, device=device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.get_velocity(latents, noise, timesteps) if self.v_prediction else noise

    def loss_prediction(self, prediction: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return prediction

    def min_snr_weight(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """kohya's apply_snr_weight: min(SNR, gamma) / SNR, over SNR + 1 for the v target."""
        alphas = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = alphas / (1 - alphas)
        clipped = torch.clamp(snr, max=gamma)
        return clipped / (snr + 1) if self.v_prediction else clipped / snr

    def sampling_scheduler(self) -> Any:
        from diffusers import DDIMScheduler

        return DDIMScheduler(
            **BETAS,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction" if self.v_prediction else "epsilon",
        )
