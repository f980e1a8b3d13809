"""The work of one training step of rentrain's own trainer: FLOPs, bytes moved and kernels, counted from the
full-size models without a GPU, and scaled to a job's settings by the rules below (docs/costs.md).

The counts come from

    HF_HUB_OFFLINE=1 USE_HUB_KERNELS=NO python bench/step_work.py --constants

(bench/RESULTS.md, "Step work, counted"): the trainer's LoRA (kohya's module set, fused layers) on the
real SD 1.5 / SDXL architectures, one bf16 step's forward, loss, backward and AdamW update, attention as one
flash kernel each way. FLOPs are the matrix products', convolutions' and attention's (FlopCounterMode);
bytes are every other kernel's reads and writes, and the optimizer's.

Scaling, with p = the job's pixels / the reference pixels and r = LoRA dim - the reference dim:
- per sample: the UNet's products x p, its self-attention x p^2 (tokens squared), the LoRA's extra x r x p,
  the text encoders' part (77 tokens, any resolution) when they are trained;
- per step, whatever the batch: the fixed part (LoRA weights, optimizer, frozen weights' layout) + r's share,
  and the text encoders' fixed part when they are trained;
- a step is fixed + batch x per sample; kernels likewise (launches do not depend on pixels).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Work:
    flop: float
    bytes: float
    kernels: float


@dataclass(frozen=True)
class FamilyWork:
    """Counted at the reference settings, with the parts that change with the settings (per LoRA dim unit,
    per sample, the text encoders')."""

    reference_pixels: int
    reference_batch: int
    reference_rank: int
    reference_trains_text_encoder: bool
    kernels: float
    kernels_per_sample: float
    text_encoder_kernels: float
    fixed_flop: float
    fixed_bytes: float
    sample_flop: float  # the UNet's (and, where the reference trains them, the text encoders') non-attention
    sample_attention_flop: float
    sample_bytes: float
    rank_fixed_bytes: float
    rank_sample_flop: float
    rank_sample_bytes: float
    text_encoder_fixed_flop: float
    text_encoder_fixed_bytes: float
    text_encoder_sample_flop: float
    text_encoder_sample_bytes: float


FAMILY_WORK: dict[str, FamilyWork] = {
    # SD 1.5 512px, batch 4, UNet + text encoder LoRA, dim 32 (bench/train_speed.py's "sd15" case)
    "sd15": FamilyWork(
        reference_pixels=262144,
        reference_batch=4,
        reference_rank=32,
        reference_trains_text_encoder=True,
        kernels=3479,
        kernels_per_sample=15,
        text_encoder_kernels=923,
        fixed_flop=0,
        fixed_bytes=7.656e08,
        sample_flop=1.387e12,
        sample_attention_flop=4.419e11,
        sample_bytes=6.905e09,
        rank_fixed_bytes=2.713e07,
        rank_sample_flop=7.262e08,
        rank_sample_bytes=2.211e06,
        text_encoder_fixed_flop=0,
        text_encoder_fixed_bytes=3.22e08,
        text_encoder_sample_flop=3.042e10,
        text_encoder_sample_bytes=2.574e08,
    ),
    # SDXL 1024px, batch 2, UNet LoRA, dim 32 (bench/train_speed.py's "sdxl" case)
    "sdxl": FamilyWork(
        reference_pixels=1048576,
        reference_batch=2,
        reference_rank=32,
        reference_trains_text_encoder=False,
        kernels=8034,
        kernels_per_sample=22,
        text_encoder_kernels=3327,
        fixed_flop=0,
        fixed_bytes=3.564e09,
        sample_flop=1.191e13,
        sample_attention_flop=2.744e12,
        sample_bytes=4.79e10,
        rank_fixed_bytes=1.218e08,
        rank_sample_flop=5.69e09,
        rank_sample_bytes=7.036e06,
        text_encoder_fixed_flop=0,
        text_encoder_fixed_bytes=1.549e09,
        text_encoder_sample_flop=4.274e11,
        text_encoder_sample_bytes=1.654e09,
    ),
}


def step_work(family: str, pixels: int, batch: int, rank: int, trains_text_encoder: bool) -> Work:
    """One optimizer step's work (one micro-batch of ``batch`` samples) at these settings."""
    w = FAMILY_WORK[family]
    p = pixels / w.reference_pixels
    r = rank - w.reference_rank
    te_in_reference = 1.0 if w.reference_trains_text_encoder else 0.0
    te = 1.0 if trains_text_encoder else 0.0
    unet_flop = w.sample_flop - te_in_reference * w.text_encoder_sample_flop
    unet_bytes = w.sample_bytes - te_in_reference * w.text_encoder_sample_bytes
    sample_flop = (
        unet_flop * p + w.sample_attention_flop * p * p + r * w.rank_sample_flop * p + te * w.text_encoder_sample_flop
    )
    sample_bytes = unet_bytes * p + r * w.rank_sample_bytes * p + te * w.text_encoder_sample_bytes
    te_change = te - te_in_reference
    fixed_flop = w.fixed_flop + te_change * w.text_encoder_fixed_flop
    fixed_bytes = w.fixed_bytes + r * w.rank_fixed_bytes + te_change * w.text_encoder_fixed_bytes
    kernels = w.kernels + te_change * w.text_encoder_kernels + batch * w.kernels_per_sample
    return Work(flop=fixed_flop + batch * sample_flop, bytes=fixed_bytes + batch * sample_bytes, kernels=kernels)
