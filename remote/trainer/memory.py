"""Fitting a run into the GPU it has: the fastest setting whose estimated peak memory fits the card.

The knobs, all of which train the same function: run each batch as several micro-batches (the batch's
inputs and random draws are made once and sliced; each slice's loss is weighted by its share of the batch,
so the gradient is the batch's), recompute activations in the backward pass (gradient checkpointing: on
where the card needs it, off where the configuration asked for it and the card holds the activations, or off
for as many of the denoiser's last blocks as the card holds where the family's blocks are alike), and,
as a last resort, 8-bit AdamW state (AdamW8bit instead of AdamW). Batches, steps and the learning-rate
schedule stay as configured. Text-encoder outputs are cached whenever the text encoders are not trained.

Estimates are measured for SD 1.x/2.x and SDXL (bench/RESULTS.md, "Memory planning") on an H200, for Flux.1 on
an H100 (families/facts.py): a run's peak is the weights it keeps on the GPU, the LoRA with its gradients and optimizer
state, and activations proportional to the micro-batch's pixels. Step-time costs come from the same
measurements. Estimates err on the high side, and configured checkpointing is only turned off where the
activations without it were measured. The settings between the measured ones (micro-batches, Flux.1's blocks
left unchecked) are interpolated, not measured one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .families.facts import FAMILIES, FamilyProfile

if TYPE_CHECKING:
    from remote.config import TrainConfig

GIB = 2**30
# Outside what torch allocates: the CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation.
HEADROOM_GIB = 1.5
# A setting between two measured ones that no run has measured itself (Flux.1 with some blocks unchecked) keeps
# this much more room, so that a 24 GiB card plans at most 22 GiB of it.
INTERPOLATED_MARGIN_GIB = 0.5


# Per family, measured (families/facts.py holds them, with the rest of each family's plain facts).
PROFILES: dict[str, FamilyProfile] = {name: facts.memory for name, facts in FAMILIES.items()}


@dataclass(frozen=True)
class Setting:
    batch: int  # the configured batch size (images per batch); never changed
    micro_batch: int  # images per forward/backward; batch when not split
    checkpointing: bool
    adam_8bit: bool = False
    # with checkpointing: how many of the denoiser's last blocks run without it (Footprint.blocks)
    plain_blocks: int = 0

    @property
    def micro_batches(self) -> int:
        return len(part_sizes(self.batch, self.micro_batch))

    @property
    def largest_part(self) -> int:
        return max(part_sizes(self.batch, self.micro_batch))


def part_sizes(batch: int, micro_batch: int | None) -> list[int]:
    """A batch as the fewest parts of at most ``micro_batch`` images, as even as possible (4 by 3: 2 + 2,
    not 3 + 1: the same number of parts, a smaller peak, one shape to capture)."""
    if not micro_batch or micro_batch >= batch:
        return [batch]
    parts = math.ceil(batch / micro_batch)
    base, extra = divmod(batch, parts)
    return [base + 1] * extra + [base] * (parts - extra)


@dataclass(frozen=True)
class Plan:
    setting: Setting
    estimate_gib: float
    budget_gib: float
    relative_time: float  # step time against the configured setting (1.0: as configured)
    fits: bool

    def describe(self, configured: Setting) -> str:
        s = self.setting
        head = f"memory: estimated peak {self.estimate_gib:.1f} GiB of a {self.budget_gib:.1f} GiB budget"
        if not self.fits:
            head += " (it may not fit: this is the smallest setting)"
        if s == configured:
            return f"{head}; settings as configured"
        why = "faster" if self.relative_time < 1 else "to fit"
        return f"{head}; {why}: {', '.join(self.changes(configured))} (step time x{self.relative_time:.2f}, estimated)"

    def changes(self, configured: Setting, short: bool = False) -> list[str]:
        s, changes = self.setting, []
        if s.micro_batch != configured.micro_batch:
            changes.append(
                f"{s.micro_batches} micro-batches"
                if short
                else f"each batch of {s.batch} runs as {s.micro_batches} "
                f"micro-batches of up to {s.largest_part} (same batches, random draws and gradient)"
            )
        but = f" but for the last {s.plain_blocks} blocks" if s.plain_blocks else ""
        if s.checkpointing and not configured.checkpointing:
            changes.append(("gradient checkpointing" if short else "gradient checkpointing on") + but)
        elif s.checkpointing and s.plain_blocks:
            changes.append(
                f"no checkpointing of the last {s.plain_blocks} blocks"
                if short
                else f"gradient checkpointing off for the last {s.plain_blocks} blocks (the card holds their "
                "activations)"
            )
        if configured.checkpointing and not s.checkpointing:
            changes.append(
                "no gradient checkpointing" if short else "gradient checkpointing off (the card holds the activations)"
            )
        if s.adam_8bit and not configured.adam_8bit:
            changes.append("8-bit AdamW state")
        return changes


@dataclass(frozen=True)
class Footprint:
    """What a run keeps on the GPU besides activations."""

    family: str
    weights_gib: float  # frozen weights resident during the step (UNet, and trained text encoders)
    lora_params: int
    pixels: int  # the largest bucket's pixels (width x height)
    activation_scale: float = 1.0  # 2.0 for fp32 activations; the profiles are bf16
    # the denoiser's blocks that checkpointing wraps, alike enough that the activations and the recompute of k of
    # them are k / blocks of the whole (FamilyProfile.checkpoint_blocks); 0: checkpointing is all or nothing
    blocks: int = 0


def lora_gib(params: int, adam_8bit: bool) -> float:
    """fp32 weights and gradients, the compute-dtype copies of both, and AdamW's two moments."""
    optimizer = 2 if adam_8bit else 8
    return params * (4 + 4 + 2 + 2 + optimizer) / GIB


def _checkpointed_share(footprint: Footprint, setting: Setting) -> float:
    """The share of the denoiser's blocks whose activations are recomputed: 1 with checkpointing on all of them."""
    if not setting.checkpointing:
        return 0.0
    return 1.0 - setting.plain_blocks / footprint.blocks if footprint.blocks else 1.0


def estimate_gib(footprint: Footprint, setting: Setting) -> float:
    profile = PROFILES[footprint.family]
    share = _checkpointed_share(footprint, setting)
    per_sample = share * profile.checkpointed_gib + (1 - share) * profile.activation_gib
    activations = per_sample * setting.largest_part * profile.scale(footprint.pixels) * footprint.activation_scale
    return footprint.weights_gib + lora_gib(footprint.lora_params, setting.adam_8bit) + activations


def step_cost(footprint: Footprint, setting: Setting) -> float:
    """Relative time of one batch (its micro-batches' times)."""
    profile = PROFILES[footprint.family]
    scale = profile.scale(footprint.pixels)
    sizes = part_sizes(setting.batch, setting.micro_batch)
    time = sum(profile.overhead_ms + profile.per_sample_ms * scale * size for size in sizes)
    return time * (1 + (profile.checkpointing_factor - 1) * _checkpointed_share(footprint, setting))


def candidates(
    configured: Setting, allow_8bit: bool, may_drop_checkpointing: bool = True, blocks: int = 0
) -> list[Setting]:
    """Every micro-batch size with and without checkpointing (whether or not the configuration asked for it:
    it only trades time for memory; configured checkpointing stays on unless ``may_drop_checkpointing``), and
    with it off for 1 to ``blocks`` - 1 of the last blocks where it may be dropped; then the same with 8-bit
    AdamW."""
    found = []
    keep = configured.checkpointing and not may_drop_checkpointing
    partial = range(blocks) if may_drop_checkpointing and blocks else range(1)
    for adam_8bit in (False, True) if allow_8bit and not configured.adam_8bit else (configured.adam_8bit,):
        sizes = {Setting(configured.batch, m, False).largest_part for m in range(1, configured.batch + 1)}
        for size in sorted(sizes, reverse=True):
            for checkpointing in (True,) if keep else (False, True):
                for plain_blocks in partial if checkpointing else (0,):
                    setting = Setting(configured.batch, size, checkpointing, adam_8bit, plain_blocks)
                    if setting not in found:
                        found.append(setting)
    return found


def _margin(setting: Setting) -> float:
    return INTERPOLATED_MARGIN_GIB if setting.plain_blocks else 0.0


def plan_memory(footprint: Footprint, configured: Setting, budget_gib: float, allow_8bit: bool) -> Plan:
    """The fastest setting estimated to fit ``budget_gib``; 8-bit AdamW only when nothing else fits. When
    nothing fits, the smallest."""
    base = step_cost(footprint, configured)
    measured = PROFILES[footprint.family].plain_activations_measured
    options = candidates(configured, allow_8bit, measured, footprint.blocks)
    fitting = [s for s in options if estimate_gib(footprint, s) + _margin(s) <= budget_gib]
    if fitting:
        plain = [s for s in fitting if s.adam_8bit == configured.adam_8bit] or fitting
        best = min(plain, key=lambda s: step_cost(footprint, s))
    else:
        best = min(options, key=lambda s: estimate_gib(footprint, s))
    return Plan(best, estimate_gib(footprint, best), budget_gib, step_cost(footprint, best) / base, bool(fitting))


def budget_from_device(total_bytes: int, fraction: float = 1.0) -> float:
    """What a run may plan for on a card of ``total_bytes`` (capped to ``fraction`` of it)."""
    return total_bytes * fraction / GIB - HEADROOM_GIB


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


class MemoryFit(NamedTuple):
    cfg: TrainConfig  # with checkpointing and the optimizer as planned
    micro_batch: int | None  # images per forward/backward, or None: batches are not split
    plain_blocks: int  # with checkpointing: how many of the denoiser's last blocks run without it
    description: str  # one line for the start event's choices


def fit_config(cfg: TrainConfig, footprint: Footprint, budget_gib: float, resuming: bool = False) -> MemoryFit:
    """The run's setting as planned. A resumed run keeps its optimizer (its saved state belongs to it)."""
    configured = Setting(
        cfg.batch_size, cfg.batch_size, cfg.gradient_checkpointing, cfg.optimizer_type.lower() == "adamw8bit"
    )
    allow_8bit = cfg.optimizer_type.lower() == "adamw" and not resuming and bitsandbytes_available()
    plan = plan_memory(footprint, configured, budget_gib, allow_8bit)
    s = plan.setting
    update: dict[str, object] = {"gradient_checkpointing": s.checkpointing}
    if s.adam_8bit and not configured.adam_8bit:
        update["optimizer_type"] = "AdamW8bit"
    micro_batch = s.micro_batch if s.micro_batch < s.batch else None
    return MemoryFit(cfg.model_copy(update=update), micro_batch, s.plain_blocks, plan.describe(configured))


# Parameter counts of the real architectures, for planning before a model is loaded, as the client's cost
# estimates do: (UNet, text encoder(s), LoRA parameters per unit of network_dim on the UNet, on the text encoders).
ARCHITECTURES: dict[str, tuple[int, int, int, int]] = {
    name: (a.unet_params, a.text_encoder_params, a.lora_unet_per_dim, a.lora_text_encoder_per_dim)
    for name, facts in FAMILIES.items()
    if (a := facts.architecture) is not None
}


def footprint_for(
    family: str,
    pixels: int,
    network_dim: int,
    trains_text_encoder: bool,
    bytes_per_value: int = 2,
    fp8_base: bool = False,
    text_on_gpu: bool | None = None,
) -> Footprint:
    """The footprint of a run on the standard architecture of ``family`` (one with counted parameters). With
    ``fp8_base`` the frozen denoiser's weights take one byte each (Flux.1: 11.1 GiB instead of 22.2).
    ``text_on_gpu``: the text encoders stay on the GPU (TrainConfig.text_encoders_on_gpu); by default only when
    they train."""
    unet, text, lora_unet, lora_text = ARCHITECTURES[family]
    resident_text = trains_text_encoder if text_on_gpu is None else text_on_gpu
    weights = unet * (1 if fp8_base else bytes_per_value) + (text * bytes_per_value if resident_text else 0)
    lora = network_dim * (lora_unet + (lora_text if trains_text_encoder else 0))
    blocks = PROFILES[family].checkpoint_blocks
    return Footprint(family, weights / GIB, lora, pixels, activation_scale=bytes_per_value / 2, blocks=blocks)
