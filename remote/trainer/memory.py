"""Fitting a run into the GPU it has: the fastest setting whose estimated peak memory fits the card.

The knobs, all of which train the same function: split each batch into micro-batches with gradient
accumulation (the same gradient: each micro-batch's loss is divided by the accumulation), recompute
activations in the backward pass (gradient checkpointing), and, as a last resort, 8-bit AdamW state
(AdamW8bit instead of AdamW). Text-encoder outputs are cached whenever the text encoders are not trained.

Estimates are measured, not derived (bench/RESULTS.md, "Memory planning"): a run's peak is the weights it
keeps on the GPU, the LoRA with its gradients and optimizer state, and activations proportional to the
micro-batch's pixels. Step-time costs come from the same measurements. Estimates err on the high side; a
run that fits its estimate has been measured to fit.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
# Outside what torch allocates: the CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation.
HEADROOM_GIB = 1.5


@dataclass(frozen=True)
class FamilyProfile:
    """Measured on an H200 with bf16 and CUDA graphs (bench/RESULTS.md): peak activation memory per sample
    of ``reference_pixels``, and the step time of a micro-batch of m such samples, ``overhead + m * per_sample``."""

    reference_pixels: int
    activation_gib: float
    checkpointed_gib: float
    overhead_ms: float
    per_sample_ms: float
    checkpointing_factor: float


PROFILES = {
    # SD 1.5 512px: b4 6.14 GiB / 59.4 ms; b2 4.08-4.25 GiB / 32.6-35.0 ms; b4 checkpointed 3.27 GiB / 94.3 ms
    "sd15": FamilyProfile(512 * 512, 1.04, 0.28, 5.7, 13.4, 1.59),
    # SDXL 1024px: b2 19.44 GiB / 134.6 ms; b1 12.36 GiB / 86.9 ms; b2 checkpointed 7.88 GiB / 184.4 ms
    "sdxl": FamilyProfile(1024 * 1024, 6.60, 0.80, 39.2, 47.7, 1.37),
}
PROFILES["sd2"] = PROFILES["sd15"]  # same UNet layout; scaled by pixels (768px runs cost 2.25x of 512px)


@dataclass(frozen=True)
class Setting:
    micro_batch: int
    accumulation: int  # total batches per optimizer step (the configured accumulation times the split)
    checkpointing: bool
    adam_8bit: bool = False


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
        changes = []
        if s.micro_batch != configured.micro_batch:
            changes.append(
                f"batch {configured.micro_batch} split into {s.accumulation // configured.accumulation} micro-batches "
                f"of {s.micro_batch} (gradient_accumulation_steps {configured.accumulation} -> {s.accumulation}; same images per step)"
            )
        if s.checkpointing and not configured.checkpointing:
            changes.append("gradient checkpointing on")
        if s.adam_8bit and not configured.adam_8bit:
            changes.append("8-bit AdamW state")
        return f"{head}; to fit: {', '.join(changes)} (step time x{self.relative_time:.2f}, estimated)"


@dataclass(frozen=True)
class Footprint:
    """What a run keeps on the GPU besides activations."""

    family: str
    weights_gib: float  # frozen weights resident during the step (UNet, and trained text encoders)
    lora_params: int
    pixels: int  # the largest bucket's pixels (width x height)
    activation_scale: float = 1.0  # 2.0 for fp32 activations; the profiles are bf16


def lora_gib(params: int, adam_8bit: bool) -> float:
    """fp32 weights and gradients, the compute-dtype copies of both, and AdamW's two moments."""
    optimizer = 2 if adam_8bit else 8
    return params * (4 + 4 + 2 + 2 + optimizer) / GIB


def estimate_gib(footprint: Footprint, setting: Setting) -> float:
    profile = PROFILES[footprint.family]
    per_sample = profile.checkpointed_gib if setting.checkpointing else profile.activation_gib
    activations = per_sample * setting.micro_batch * footprint.pixels / profile.reference_pixels * footprint.activation_scale
    return footprint.weights_gib + lora_gib(footprint.lora_params, setting.adam_8bit) + activations


def step_cost(footprint: Footprint, setting: Setting) -> float:
    """Relative time of one optimizer step (accumulation x micro-batch time)."""
    profile = PROFILES[footprint.family]
    scale = footprint.pixels / profile.reference_pixels
    micro = profile.overhead_ms + profile.per_sample_ms * scale * setting.micro_batch
    return setting.accumulation * micro * (profile.checkpointing_factor if setting.checkpointing else 1.0)


def candidates(configured: Setting, allow_8bit: bool, micro_batch: int | None = None) -> list[Setting]:
    """Every setting that trains the same images per step: micro-batches that divide the batch, with and
    without checkpointing (configured checkpointing stays on), then the same with 8-bit AdamW."""
    batch = configured.micro_batch
    sizes = [micro_batch] if micro_batch else [m for m in range(batch, 0, -1) if batch % m == 0]
    found = []
    for adam_8bit in (False, True) if allow_8bit and not configured.adam_8bit else (configured.adam_8bit,):
        for size in sizes:
            for checkpointing in (configured.checkpointing, True):
                setting = Setting(size, configured.accumulation * (batch // size), checkpointing, adam_8bit)
                if setting not in found:
                    found.append(setting)
    return found


def plan_memory(
    footprint: Footprint,
    configured: Setting,
    budget_gib: float,
    allow_8bit: bool,
    micro_batch: int | None = None,
) -> Plan:
    """The fastest setting estimated to fit ``budget_gib``; 8-bit AdamW only when nothing else fits. With
    ``micro_batch`` (a resumed run's), only that split is considered. When nothing fits, the smallest."""
    base = step_cost(footprint, configured)
    options = candidates(configured, allow_8bit, micro_batch)
    fitting = [s for s in options if estimate_gib(footprint, s) <= budget_gib]
    if fitting:
        plain = [s for s in fitting if s.adam_8bit == configured.adam_8bit] or fitting
        best = min(plain, key=lambda s: step_cost(footprint, s))
    else:
        best = min(options, key=lambda s: estimate_gib(footprint, s))
    return Plan(best, estimate_gib(footprint, best), budget_gib, step_cost(footprint, best) / base, bool(fitting))


def budget_from_device(total_bytes: int, fraction: float = 1.0) -> float:
    """What a run may plan for on a card of ``total_bytes`` (capped to ``fraction`` of it)."""
    return total_bytes * fraction / GIB - HEADROOM_GIB


def configured_setting(cfg) -> Setting:
    return Setting(cfg.batch_size, cfg.gradient_accumulation_steps, cfg.gradient_checkpointing, cfg.optimizer_type.lower() == "adamw8bit")


def fit_config(cfg, footprint: Footprint, budget_gib: float, resumed_micro_batch: int | None = None):
    """(the config with the planned setting applied, the plan's one-line description)."""
    configured = configured_setting(cfg)
    micro_batch = resumed_micro_batch if resumed_micro_batch and cfg.batch_size % resumed_micro_batch == 0 else None
    plan = plan_memory(footprint, configured, budget_gib, cfg.optimizer_type.lower() == "adamw", micro_batch)
    s = plan.setting
    update = {
        "batch_size": s.micro_batch,
        "gradient_accumulation_steps": s.accumulation,
        "gradient_checkpointing": s.checkpointing,
    }
    if s.adam_8bit and not configured.adam_8bit:
        update["optimizer_type"] = "AdamW8bit"
    return cfg.model_copy(update=update), plan.describe(configured)
