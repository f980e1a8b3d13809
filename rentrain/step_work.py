"""The work of one training step of rentrain's own trainer: FLOPs, bytes moved and kernels, counted from the
full-size models without a GPU, and scaled to a job's settings by the rules below (docs/costs.md).

The counts come from

    HF_HUB_OFFLINE=1 USE_HUB_KERNELS=NO python bench/step_work.py --constants

(bench/RESULTS.md, "Step work, counted"): the trainer's LoRA (kohya's module set, fused layers) on the
real SD 1.5 / SDXL / Flux.1 architectures, one bf16 step's forward, loss, backward and AdamW update, attention
as one flash kernel each way, and Flux.1's rotary embedding and RMSNorms as the one kernel each way the trainer
runs on CUDA. FLOPs are the matrix products', convolutions' and attention's (FlopCounterMode); bytes are every
other kernel's reads and writes, and the optimizer's.

Scaling, with p = the job's tokens / the reference tokens and r = LoRA dim - the reference dim:
- tokens: a UNet's are its pixels (p = the pixel ratio); Flux.1's transformer reads one token per 16 x 16 pixels
  plus the 512 text tokens it attends over jointly, so 1024px has (64 x 64 + 512) tokens and 512px (32 x 32 + 512);
- per sample: the model's products x p, its self-attention x p^2 (tokens squared), the LoRA's extra x r x p,
  the text encoders' part (77 tokens, any resolution) when they are trained;
- per step, whatever the batch: the fixed part (LoRA weights, optimizer, frozen weights' layout) + r's share,
  and the text encoders' fixed part when they are trained;
- a step is fixed + batch x per sample; kernels likewise (launches do not depend on pixels);
- Flux.1 with fp8_base: each frozen Linear's weight is upcast to bf16 as it runs (remote/trainer/float8.py), in
  the forward and again in the backward pass: 3 bytes (1 read, 2 written) per weight and one kernel per Linear,
  each time. The products themselves still run in bf16, so the FLOPs do not change.

Flux.1's count: `python bench/step_work.py --family flux --constants`; `--flux` checks the token rule against
direct counts at 512 and 1024 px.
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
    text_tokens: int = 0  # tokens the model attends over besides the image's (Flux.1: T5's 512)
    pixels_per_token: int = 1  # a UNet's work is counted per pixel; Flux.1 has a token per 16 x 16 pixels
    frozen_linear_params: float = 0  # the frozen model's Linear weights, which fp8_base upcasts
    frozen_linears: int = 0

    def tokens(self, pixels: int) -> float:
        return pixels / self.pixels_per_token + self.text_tokens


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
    # Flux.1 [dev] 1024px, batch 2, transformer LoRA, dim 32: counted as the trainer runs it on CUDA (its rotary
    # kernel, PyTorch's fused RMSNorm), not measured (bench/step_work.py)
    "flux": FamilyWork(
        reference_pixels=1048576,
        reference_batch=2,
        reference_rank=32,
        reference_trains_text_encoder=False,
        kernels=7294,
        kernels_per_sample=114,
        text_encoder_kernels=2476,
        text_tokens=512,
        pixels_per_token=256,
        fixed_flop=0,
        fixed_bytes=-1.041e09,
        sample_flop=1.213e14,
        sample_attention_flop=5.205e13,
        sample_bytes=2.433e11,
        rank_fixed_bytes=1.34e08,
        rank_sample_flop=7.101e10,
        rank_sample_bytes=4.202e06,
        text_encoder_fixed_flop=0,
        text_encoder_fixed_bytes=2.199e09,
        text_encoder_sample_flop=4.88e12,
        text_encoder_sample_bytes=1.298e10,
        frozen_linear_params=1.19e10,
        frozen_linears=504,
    ),
}


# remote/trainer/float8.py's upcast on CUDA: one Triton kernel per Linear that reads the 8-bit codes and writes the
# bf16 weight once (1 byte read, 2 written), in place of the plain path's cast and row scale (7 bytes, three
# kernels); measured on the H100 (bench/RESULTS.md, the eleventh session).
FP8_UPCAST_BYTES_PER_PARAM = 3
FP8_KERNELS_PER_UPCAST = 1
FP8_UPCASTS_PER_STEP = 2  # forward and backward (checkpointing's recompute is in its step-time factor)


def step_work(
    family: str, pixels: int, batch: int, rank: int, trains_text_encoder: bool, fp8_base: bool = False
) -> Work:
    """One optimizer step's work (one micro-batch of ``batch`` samples) at these settings."""
    w = FAMILY_WORK[family]
    p = w.tokens(pixels) / w.tokens(w.reference_pixels)
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
    if fp8_base:
        fixed_bytes += FP8_UPCASTS_PER_STEP * FP8_UPCAST_BYTES_PER_PARAM * w.frozen_linear_params
        kernels += FP8_UPCASTS_PER_STEP * FP8_KERNELS_PER_UPCAST * w.frozen_linears
    return Work(flop=fixed_flop + batch * sample_flop, bytes=fixed_bytes + batch * sample_bytes, kernels=kernels)
