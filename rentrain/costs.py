"""What a job costs on an offer: (training time + setup overhead) x the offer's all-in $/h.

Every number below carries its source and kind:
- "published": a figure someone reported, with the reference (mostly 2023 kohya reports, collected in
  the project's trainer research notes, TRAINER.md §6);
- "derived": computed from a published figure of the same GPU at other settings (the rule is in the source);
- "scaled": derived from a published figure of the reference GPU by bf16 tensor TFLOPS (rule below);
- "measured": measured by rentrain's own benchmark (bench/train_speed.py; the H200 and H100 rows);
- "assumed": an engineering guess, stated as such.

To replace a number after a benchmark, edit the one row in SPEED_TABLE (kind "measured", source = the
benchmark run). Nothing else needs to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from providers.base import Offer

if TYPE_CHECKING:
    from remote.config import TrainConfig
    from rentrain.dataset_check import DatasetReport

ModelFamily = Literal["sd15", "sdxl", "tiny"]
SpeedKind = Literal["published", "derived", "scaled", "measured", "assumed"]


@dataclass(frozen=True)
class Figure:
    value: float
    kind: SpeedKind
    source: str


# Reference settings per family: the step times in SPEED_TABLE are for these; other settings are scaled.
REFERENCE_RESOLUTION: dict[ModelFamily, int] = {"sd15": 512, "sdxl": 1024, "tiny": 64}

# ------------------------------------------------------------------------------------------------------
# The speed table: seconds per optimizer step, LoRA, bf16/fp16, latents cached, no gradient checkpointing.
# Key: (GPU model, family, batch size). One row per number.
# ------------------------------------------------------------------------------------------------------
_SD15_3090TI = (
    "derived from kohya-ss/sd-scripts#326 (RTX 3090 Ti, SD1.5 LoRA 768x768 batch 3, ~1.11 it/s = 0.90 s/step): "
    "x (512/768)^2 pixels = 0.40 s at batch 3, then the batch rule below"
)
SPEED_TABLE: dict[tuple[str, ModelFamily, int], Figure] = {
    ("RTX 3090 Ti", "sd15", 1): Figure(0.20, "derived", _SD15_3090TI),
    ("RTX 3090 Ti", "sd15", 2): Figure(0.30, "derived", _SD15_3090TI),
    ("RTX 3090 Ti", "sd15", 4): Figure(0.50, "derived", _SD15_3090TI),
    ("RTX 3090 Ti", "sdxl", 1): Figure(
        1.12, "published", "kohya-ss/sd-scripts#827: RTX 3090 Ti, SDXL LoRA 1024x1024 batch 1, 1.12 s/it (2023-09)"
    ),
    ("RTX 3090", "sdxl", 1): Figure(
        1.23, "published", "bmaltais/kohya_ss#1288: RTX 3090, SDXL LoRA 1024x1024, 1.23 s/it"
    ),
    ("RTX 4090", "sdxl", 1): Figure(
        1.17,
        "published",
        "bmaltais/kohya_ss#1288: RTX 4090, SDXL LoRA 1024x1024 bf16, 1.13-1.21 s/it (2023-09, Windows; the same "
        "thread reports Windows drivers of the time slowing the 4090, so a Linux benchmark should replace this)",
    ),
    ("RTX 3060", "sdxl", 1): Figure(2.4, "published", "bmaltais/kohya_ss#1288: RTX 3060, SDXL LoRA, 2.4 s/it"),
    ("H200", "sd15", 4): Figure(
        0.0385,
        "measured",
        "bench/RESULTS.md 2026-11-29 (fourth session): H200, this trainer (CUDA graphs, bf16, fused LoRA layers, "
        "channels_last GroupNorm kernels, overlapped steps), full-size SD 1.5, 512px batch 4, UNet + TE LoRA dim "
        "32, AdamW: 38.5 ms/step (median step interval)",
    ),
    ("H100 SXM", "sd15", 4): Figure(
        0.0401,
        "measured",
        "bench/RESULTS.md 2026-12-05 (fifth session): H100 80GB HBM3, this trainer with the locked versions "
        "(constraints.txt), full-size SD 1.5, 512px batch 4, UNet + TE LoRA dim 32, AdamW: 40.1 ms/step (median)",
    ),
    ("H100 SXM", "sdxl", 2): Figure(
        0.1199,
        "measured",
        "bench/RESULTS.md 2026-12-05 (fifth session): H100 80GB HBM3, this trainer with the locked versions "
        "(constraints.txt), full-size SDXL, 1024px batch 2, UNet LoRA dim 32, AdamW: 119.9 ms/step (median)",
    ),
    ("H200", "sdxl", 2): Figure(
        0.1138,
        "measured",
        "bench/RESULTS.md 2026-11-29 (fourth session): H200, this trainer (CUDA graphs, bf16, fused LoRA layers, "
        "channels_last GroupNorm kernels, overlapped steps), full-size SDXL, 1024px batch 2, UNet LoRA dim 32, "
        "AdamW: 113.8 ms/step (median step interval)",
    ),
}

# The GPU whose rows are scaled to GPUs without a row of their own.
REFERENCE_GPU = "RTX 3090 Ti"

# Dense 16-bit (fp16/bf16) tensor TFLOPS from NVIDIA's architecture whitepapers and datasheets
# (datasheets quote sparse figures: halved here). GeForce cards are listed at their FP16-accumulate rate
# (their FP32-accumulate rate is half): at the FP32-accumulate rate an RTX A5000 would out-rank a 3090,
# which is not what SD users see. Recalled from those documents, not re-read in this repo's stored sources.
BF16_TFLOPS: dict[str, Figure] = {
    "RTX 3090": Figure(142.0, "published", "NVIDIA Ampere GA102 whitepaper, RTX 3090"),
    "RTX 3090 Ti": Figure(160.0, "scaled", "RTX 3090's 142 x SMs x boost clock (84 x 1.86 GHz vs 82 x 1.695 GHz)"),
    "RTX 4090": Figure(330.3, "published", "NVIDIA Ada Lovelace whitepaper, RTX 4090"),
    "RTX 5090": Figure(419.0, "published", "NVIDIA Blackwell GB202 whitepaper, RTX 5090"),
    "RTX A5000": Figure(111.1, "published", "NVIDIA RTX A5000 datasheet (222.2 sparse)"),
    "RTX A6000": Figure(154.8, "published", "NVIDIA RTX A6000 datasheet (309.7 sparse)"),
    "RTX 6000 Ada": Figure(364.2, "published", "NVIDIA RTX 6000 Ada datasheet (1457 FP8 sparse / 4)"),
    "RTX 5000 Ada": Figure(261.0, "published", "NVIDIA RTX 5000 Ada datasheet (1044 FP8 sparse / 4)"),
    "A10": Figure(125.0, "published", "NVIDIA A10 datasheet (250 sparse)"),
    "A30": Figure(165.0, "published", "NVIDIA A30 datasheet (330 sparse)"),
    "A40": Figure(149.7, "published", "NVIDIA A40 datasheet (299.4 sparse)"),
    "L4": Figure(121.0, "published", "NVIDIA L4 datasheet (242 sparse)"),
    "L40": Figure(181.0, "published", "NVIDIA L40 datasheet (362 sparse)"),
    "L40S": Figure(362.0, "published", "NVIDIA L40S datasheet (733 sparse)"),
    "A100 PCIe": Figure(312.0, "published", "NVIDIA A100 datasheet"),
    "A100 SXM": Figure(312.0, "published", "NVIDIA A100 datasheet"),
    "H100 PCIe": Figure(756.0, "published", "NVIDIA H100 datasheet (PCIe)"),
    "H100 SXM": Figure(989.0, "published", "NVIDIA H100 datasheet (SXM)"),
    "H100 NVL": Figure(835.0, "published", "NVIDIA H100 NVL datasheet"),
    "H200": Figure(989.0, "published", "NVIDIA H200 datasheet"),
}

# Step time ~ (reference TFLOPS / GPU TFLOPS) ** TFLOPS_EXPONENT. Below 1 because a LoRA step at small
# batch does not saturate the tensor cores: the 4090 / 3090 Ti SDXL pair above differs far less than
# their TFLOPS do.
TFLOPS_EXPONENT = Figure(
    0.5, "assumed", "sub-linear scaling; the published 4090 vs 3090 Ti SDXL pair shows ~1x, TFLOPS 2x"
)

# Step time at batch b, from the batch-1 time: t1 x (1 + (b - 1) x marginal).
BATCH_MARGINAL: dict[ModelFamily, Figure] = {
    "sd15": Figure(0.5, "assumed", "each extra 512px image costs half a batch-1 step (small images underuse the GPU)"),
    "sdxl": Figure(
        0.22, "published", "bmaltais/kohya_ss#1288: RTX 4090 SDXL batch 8 at 3 s/it vs batch 1 at ~1.17 s/it"
    ),
    "tiny": Figure(0.1, "assumed", "a tiny UNet is launch-overhead bound"),
}

TINY_SECONDS_PER_STEP = Figure(
    0.05, "assumed", "builtin tiny models: a few ms of GPU work per step; dominated by Python overhead"
)
GRADIENT_CHECKPOINTING_FACTOR = Figure(1.3, "assumed", "recomputes the forward pass in backward: roughly +30%")

# ------------------------------------------------------------------------------------------------------
# Several GPUs (`--gpus N`): data parallel (DDP under `accelerate launch`), each rank its own batch.
# A step then trains N x batch_size samples, so an epoch has ceil(batches / (N x accumulation)) steps
# (kohya's count under accelerate), and each step takes the single-GPU step time / efficiency: the gradient
# all-reduce, and every rank waiting for the slowest. Job time ~ single-GPU time / (N x efficiency).
#
# ASSUMED, NOT MEASURED: rentrain has had no multi-GPU machine to measure on. The figures follow what
# published DDP scaling reports show for models whose gradients are small next to their compute (a LoRA's
# are tens of MB for SD 1.5, a few hundred for SDXL at dim 32): near-linear on NVLink/NVSwitch boards,
# somewhat less over PCIe. Replace a row
# with kind "measured" after a benchmark, as for SPEED_TABLE. Counts between the rows interpolate linearly.
# ------------------------------------------------------------------------------------------------------
Interconnect = Literal["pcie", "nvlink"]

# SXM boards: every GPU of the machine on NVLink / NVSwitch. Every other card (GeForce, RTX workstation,
# PCIe datacenter cards) counts as PCIe.
NVLINK_GPUS: frozenset[str] = frozenset({"A100 SXM", "H100 SXM", "H200"})

_PCIE_RISK = (
    "consumer cards often run without GPU peer-to-peer on rented multi-GPU hosts (NCCL then copies through "
    "host memory: cortwave.github.io/posts/multi-gpu saw 4x RTX 4090 DDP barely match one card for a 1.7B "
    "model); LoRA gradients are far smaller, hence a modest loss here"
)
DATA_PARALLEL_EFFICIENCY: dict[Interconnect, dict[int, Figure]] = {
    "pcie": {
        2: Figure(
            0.90, "assumed", f"DDP over PCIe, 2 ranks: all-reduce + slowest-rank wait ~10% of a step; {_PCIE_RISK}"
        ),
        4: Figure(0.85, "assumed", f"DDP over PCIe, 4 ranks: ~15% of a step; {_PCIE_RISK}"),
        8: Figure(0.80, "assumed", f"DDP over PCIe, 8 ranks (often two PCIe switches or sockets): ~20%; {_PCIE_RISK}"),
    },
    "nvlink": {
        2: Figure(0.95, "assumed", "DDP on an NVLink/NVSwitch (SXM) board, 2 ranks: the all-reduce is near free"),
        4: Figure(0.93, "assumed", "DDP on an NVLink/NVSwitch (SXM) board, 4 ranks"),
        8: Figure(
            0.90, "assumed", "DDP on an NVLink/NVSwitch (SXM) board, 8 ranks: the slowest-rank wait grows with N"
        ),
    },
}

# ------------------------------------------------------------------------------------------------------
# Setup overhead: billed at the same rate as training.
# ------------------------------------------------------------------------------------------------------
OVERHEAD: dict[str, Figure] = {
    "boot_s": Figure(300.0, "published", "Vast hello-world.mdx: an instance boots in 1-5 min (upper end taken)"),
    "bootstrap_s": Figure(180.0, "assumed", "installing the trainer's Python dependencies on a fresh image"),
    "cache_s_per_image": Figure(0.15, "assumed", "VAE-encoding one image to latents, once"),
    "finish_s": Figure(60.0, "assumed", "final upload check, result download and destroy"),
    "default_download_mbps": Figure(
        500.0, "assumed", "used when the provider publishes no bandwidth (RunPod); Vast offers carry inet_down"
    ),
    "max_effective_download_mbps": Figure(2000.0, "assumed", "model hubs rarely serve one file faster"),
    "user_upload_mbps": Figure(40.0, "assumed", "a typical home uplink, for the dataset and a local base model"),
}

# Base model download sizes, GB.
MODEL_DOWNLOAD_GB: dict[ModelFamily, Figure] = {
    "sd15": Figure(2.1, "published", "runwayml v1-5-pruned-emaonly fp16 safetensors, ~2.1 GB"),
    "sdxl": Figure(6.9, "published", "stabilityai sd_xl_base_1.0.safetensors, 6.94 GB"),
    "tiny": Figure(0.0, "published", "builtin: generated on the instance"),
}

SECONDS_PER_HOUR = 3600.0


class SpeedEstimate(BaseModel):
    seconds_per_step: float
    kind: SpeedKind
    source: str


class ScalingEstimate(BaseModel):
    gpus: int
    interconnect: Interconnect
    efficiency: float
    kind: SpeedKind | None  # None for one GPU: nothing is scaled
    source: str


class JobProfile(BaseModel):
    """What the cost depends on, taken from the config and the dataset."""

    family: ModelFamily
    steps: int  # optimizer steps on one GPU
    # Set when max_train_epochs fixes the length: with N GPUs an epoch then has fewer steps (steps_on).
    # Unset when max_train_steps does: the step count stays and each step trains N x batch_size samples.
    epochs: int | None = None
    batches_per_epoch: int | None = None
    batch_size: int = 1
    resolution: tuple[int, int] = (512, 512)
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    network_dim: int = 32
    trains_text_encoder: bool = False
    bytes_per_value: int = 2  # of the frozen model and activations: 4 without mixed precision
    images: int = 0
    dataset_bytes: int = 0
    local_model_bytes: int = 0  # uploaded from the user's machine instead of downloaded on the instance


class JobEstimate(BaseModel):
    steps: int
    seconds_per_step: float  # with several GPUs: the one-GPU step time / the scaling efficiency
    speed_kind: SpeedKind
    speed_source: str
    gpus: int = 1
    scaling: ScalingEstimate | None = None  # several GPUs only
    train_hours: float
    overhead_hours: float
    total_hours: float
    price_per_hour: float
    cost_usd: float


def guess_model_family(model: str, sdxl: bool | None) -> ModelFamily:
    """From the config: `sdxl` if set, else the model reference (an SDXL checkpoint nearly always says 'xl')."""
    if model.startswith("builtin:tiny"):
        return "tiny"
    if sdxl is not None:
        return "sdxl" if sdxl else "sd15"
    name = Path(model).name.lower() if not model.startswith("https://") else model.lower()
    return "sdxl" if ("xl" in name or "pony" in name or "illustrious" in name) else "sd15"


def seconds_per_step(gpu_model: str, profile: JobProfile) -> SpeedEstimate | None:
    """None when nothing is known about this GPU (no row, no TFLOPS figure)."""
    batch1 = _batch1_or_row(gpu_model, profile)
    if batch1 is None:
        return None
    seconds, kind, source = batch1
    pixels = profile.resolution[0] * profile.resolution[1]
    reference = REFERENCE_RESOLUTION[profile.family] ** 2
    if profile.family != "tiny" and pixels != reference:
        seconds *= pixels / reference
        source += f"; x {pixels / reference:.2f} for {profile.resolution[0]}x{profile.resolution[1]} pixels"
        kind = _derived(kind)
    if profile.gradient_checkpointing:
        seconds *= GRADIENT_CHECKPOINTING_FACTOR.value
        source += f"; x {GRADIENT_CHECKPOINTING_FACTOR.value} gradient checkpointing"
        kind = _derived(kind)
    if profile.gradient_accumulation_steps > 1:
        seconds *= profile.gradient_accumulation_steps
        source += f"; x {profile.gradient_accumulation_steps} accumulated batches per step"
    return SpeedEstimate(seconds_per_step=seconds, kind=kind, source=source)


def _batch1_or_row(gpu_model: str, profile: JobProfile) -> tuple[float, SpeedKind, str] | None:
    family, batch = profile.family, profile.batch_size
    if family == "tiny":
        return _at_batch(TINY_SECONDS_PER_STEP.value, family, batch), "assumed", TINY_SECONDS_PER_STEP.source
    own = _batch_from_rows(gpu_model, family, batch)
    if own is not None:
        return own
    ref = _batch_from_rows(REFERENCE_GPU, family, batch)
    gpu_tflops, ref_tflops = BF16_TFLOPS.get(gpu_model), BF16_TFLOPS[REFERENCE_GPU]
    if ref is None or gpu_tflops is None:
        return None
    factor = (ref_tflops.value / gpu_tflops.value) ** TFLOPS_EXPONENT.value
    source = (
        f"scaled from {REFERENCE_GPU} by bf16 TFLOPS ({ref_tflops.value:g} -> {gpu_tflops.value:g}, "
        f"^{TFLOPS_EXPONENT.value:g}): {ref[2]}"
    )
    return ref[0] * factor, "scaled", source


def _batch_from_rows(gpu_model: str, family: ModelFamily, batch: int) -> tuple[float, SpeedKind, str] | None:
    """This GPU's own rows at another batch size: interpolated, or from batch 1 by the batch rule."""
    rows = sorted((b, fig) for (g, f, b), fig in SPEED_TABLE.items() if g == gpu_model and f == family)
    if not rows:
        return None
    exact = SPEED_TABLE.get((gpu_model, family, batch))
    if exact is not None:
        return exact.value, exact.kind, exact.source
    below = [(b, fig) for b, fig in rows if b < batch]
    above = [(b, fig) for b, fig in rows if b > batch]
    if below and above:
        (b0, f0), (b1, f1) = below[-1], above[0]
        value = f0.value + (f1.value - f0.value) * (batch - b0) / (b1 - b0)
        return value, _derived(f0.kind), f"{f0.source}; interpolated to batch {batch}"
    nearest_b, nearest = below[-1] if below else above[0]
    t1 = nearest.value / (1 + (nearest_b - 1) * BATCH_MARGINAL[family].value)
    return _at_batch(t1, family, batch), _derived(nearest.kind), f"{nearest.source}; batch rule to batch {batch}"


def _derived(kind: SpeedKind) -> SpeedKind:
    """A published or measured figure moved to other settings by a rule is no longer the figure itself."""
    return "derived" if kind in ("published", "measured") else kind


def _at_batch(t1: float, family: ModelFamily, batch: int) -> float:
    return t1 * (1 + (batch - 1) * BATCH_MARGINAL[family].value)


def overhead_seconds(profile: JobProfile, download_mbps: float | None) -> dict[str, float]:
    """Each part of the setup and teardown time, in seconds."""
    mbps = min(download_mbps or OVERHEAD["default_download_mbps"].value, OVERHEAD["max_effective_download_mbps"].value)
    uplink = OVERHEAD["user_upload_mbps"].value
    model_gb = 0.0 if profile.local_model_bytes else MODEL_DOWNLOAD_GB[profile.family].value
    return {
        "boot": OVERHEAD["boot_s"].value,
        "bootstrap": OVERHEAD["bootstrap_s"].value,
        "model_download": model_gb * 8000 / mbps,
        "upload": (profile.dataset_bytes + profile.local_model_bytes) * 8 / (uplink * 1e6),
        "latent_cache": profile.images * OVERHEAD["cache_s_per_image"].value,
        "finish": OVERHEAD["finish_s"].value,
    }


def interconnect_of(gpu_model: str) -> Interconnect:
    return "nvlink" if gpu_model in NVLINK_GPUS else "pcie"


def scaling_efficiency(gpu_model: str, gpus: int) -> ScalingEstimate:
    """The data-parallel efficiency of `gpus` cards of this model in one machine (1.0 for one card)."""
    return interconnect_efficiency(interconnect_of(gpu_model), gpus)


def interconnect_efficiency(interconnect: Interconnect, gpus: int) -> ScalingEstimate:
    """DATA_PARALLEL_EFFICIENCY's row for `gpus`, or the line between the rows around it."""
    if gpus == 1:
        return ScalingEstimate(
            gpus=1, interconnect=interconnect, efficiency=1.0, kind=None, source="one GPU: no scaling"
        )
    rows = DATA_PARALLEL_EFFICIENCY[interconnect]
    exact = rows.get(gpus)
    if exact is not None:
        return ScalingEstimate(
            gpus=gpus, interconnect=interconnect, efficiency=exact.value, kind=exact.kind, source=exact.source
        )
    counts = sorted(rows)
    below = max((c for c in counts if c < gpus), default=counts[0])
    above = min((c for c in counts if c > gpus), default=counts[-1])
    low, high = rows[below], rows[above]
    value = low.value + (high.value - low.value) * (gpus - below) / (above - below) if above != below else low.value
    source = f"interpolated between the {below}- and {above}-GPU rows: {low.source}"
    return ScalingEstimate(
        gpus=gpus, interconnect=interconnect, efficiency=value, kind=_derived(low.kind), source=source
    )


def steps_per_epoch(batches_per_epoch: int, gpus: int, gradient_accumulation_steps: int = 1) -> int:
    """Optimizer steps per epoch with `gpus` data-parallel ranks: ceil(batches / ranks / accumulation), as
    kohya counts under accelerate (each rank gets ceil(batches / ranks) batches, the last ones padded)."""
    return math.ceil(batches_per_epoch / (gpus * gradient_accumulation_steps))


def steps_on(profile: JobProfile, gpus: int) -> int:
    """The job's optimizer steps with `gpus` ranks: fewer per epoch when epochs fix the length."""
    if gpus == 1 or profile.epochs is None or profile.batches_per_epoch is None:
        return profile.steps
    return profile.epochs * steps_per_epoch(profile.batches_per_epoch, gpus, profile.gradient_accumulation_steps)


def memory_fit(profile: JobProfile, vram_gb: float | None) -> tuple[float, str] | None:
    """(step-time factor, note) of the trainer's memory planning on a card of ``vram_gb`` (remote/trainer/
    memory.py: micro-batches or checkpointing where the batch does not fit); None when nothing fits."""
    from remote.trainer.memory import Setting, budget_from_device, footprint_for, plan_memory

    if profile.family not in ("sd15", "sdxl") or not vram_gb:
        return 1.0, ""
    pixels = profile.resolution[0] * profile.resolution[1]
    footprint = footprint_for(
        profile.family, pixels, profile.network_dim, profile.trains_text_encoder, profile.bytes_per_value
    )
    configured = Setting(profile.batch_size, profile.batch_size, profile.gradient_checkpointing)
    plan = plan_memory(footprint, configured, budget_from_device(int(vram_gb * 2**30)), allow_8bit=False)
    if not plan.fits:
        return None
    if plan.setting == configured:
        return 1.0, ""
    how = " and ".join(plan.changes(configured, short=True))
    return plan.relative_time, f"; x {plan.relative_time:.2f} to fit {vram_gb:g} GB ({how}, memory planning)"


def estimate_job(profile: JobProfile, offer: Offer) -> JobEstimate | None:
    """Training on all the offer's GPUs (one data-parallel rank each) plus overhead, at its all-in rate. None
    when the GPU's speed is unknown or the job does not fit its memory even with memory planning."""
    speed = seconds_per_step(offer.gpu_model, profile)
    fit = memory_fit(profile, offer.vram_gb)
    if speed is None or fit is None:
        return None
    factor, note = fit
    if factor != 1.0:
        speed = speed.model_copy(
            update={
                "seconds_per_step": speed.seconds_per_step * factor,
                "source": speed.source + note,
                "kind": _derived(speed.kind),
            }
        )
    gpus = offer.gpu_count
    scaling = scaling_efficiency(offer.gpu_model, gpus)
    step_seconds = speed.seconds_per_step / scaling.efficiency
    steps = steps_on(profile, gpus)
    train_h = steps * step_seconds / SECONDS_PER_HOUR
    overhead_h = sum(overhead_seconds(profile, offer.download_mbps).values()) / SECONDS_PER_HOUR
    total_h = train_h + overhead_h
    return JobEstimate(
        steps=steps,
        seconds_per_step=step_seconds,
        speed_kind=speed.kind,
        speed_source=speed.source,
        gpus=gpus,
        scaling=scaling if gpus > 1 else None,
        train_hours=train_h,
        overhead_hours=overhead_h,
        total_hours=total_h,
        price_per_hour=offer.price_per_hour,
        cost_usd=math.ceil(total_h * offer.price_per_hour * 1000) / 1000,
    )


def profile_from_config(config_path: str | Path) -> JobProfile:
    """Read the config and count the dataset's steps exactly as the trainer will (rentrain.dataset_check)."""
    from remote.config import load_config
    from rentrain.dataset_check import inspect_dataset

    loaded = load_config(config_path)
    return profile_from_check(loaded.train, inspect_dataset(loaded.train))


def profile_from_check(train: TrainConfig, report: DatasetReport) -> JobProfile:
    """The cost profile of a config whose dataset was already inspected."""
    if report.step_plan is None:
        problems = "; ".join(str(f.message) for f in report.findings if f.severity == "error") or "no images found"
        raise ValueError(f"cannot count training steps: {problems}")
    images = sum(s.images for s in report.subsets)
    dataset_bytes = _folder_bytes(train.train_data_dir) + (
        _folder_bytes(train.reg_data_dir) if train.reg_data_dir else 0
    )
    model = train.pretrained_model_name_or_path
    local_model = Path(model)
    local_model_bytes = 0
    if local_model.is_absolute() and local_model.exists():
        local_model_bytes = local_model.stat().st_size if local_model.is_file() else _folder_bytes(local_model)
    plan = report.step_plan
    return JobProfile(
        family=guess_model_family(model, train.sdxl),
        steps=plan.total_steps,
        epochs=plan.epochs if train.max_train_epochs is not None else None,
        batches_per_epoch=plan.batches_per_epoch if train.max_train_epochs is not None else None,
        batch_size=train.batch_size,
        resolution=train.resolution,
        gradient_checkpointing=train.gradient_checkpointing,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        network_dim=train.network_dim,
        trains_text_encoder=train.trains_text_encoder,
        bytes_per_value=4 if train.mixed_precision == "no" else 2,
        images=images,
        dataset_bytes=dataset_bytes,
        local_model_bytes=local_model_bytes,
    )


def _folder_bytes(folder: Path | None) -> int:
    if folder is None or not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
