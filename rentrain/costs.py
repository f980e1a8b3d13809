"""What a job costs on an offer: (training time + setup overhead) x the offer's all-in $/h.

Training time per step comes from rentrain's own trainer (docs/costs.md has the model, its sources and a table):
- "measured": the trainer's median step interval on that GPU at exactly those settings (MEASURED_STEPS, from
  bench/train_speed.py runs recorded in bench/RESULTS.md);
- "modelled": the step's counted work (rentrain.step_work: FLOPs and bytes moved) on the GPU's datasheet figures
  (rentrain.gpu_specs), at the tensor and bandwidth efficiency calibrated on the measured steps, scaled for the
  GPU's class (EFFICIENCY);
- "assumed": the built-in tiny models, which no model covers.
Every step time comes with a range (low, high): the measurements' spread, or the model's uncertainty for that
class of GPU.

Other figures carry their kind and source: "published" (a document says so), "derived" (a stated rule applied
to a published or measured figure), "measured" (rentrain's benchmarks) or "assumed" (an engineering guess).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, computed_field

from providers.base import Offer
from rentrain.figures import Figure, FigureKind
from rentrain.gpu_specs import EfficiencyClass, GpuSpec, spec_for
from rentrain.setup_time import bandwidth_usd, setup_seconds, transfer_gb
from rentrain.step_work import Work, step_work

if TYPE_CHECKING:
    from remote.config import TrainConfig
    from rentrain.dataset_check import DatasetReport
    from rentrain.history import HistorySpeed, JobHistory

ModelFamily = Literal["sd15", "sdxl", "tiny"]
EstimateKind = Literal["measured", "modelled", "assumed"]
# Estimates recorded in a ledger before the speed model said "published", "derived" or "scaled".
RecordedKind = EstimateKind | Literal["published", "derived", "scaled"]


# ------------------------------------------------------------------------------------------------------
# The trainer's measured steps: the data the model is calibrated on. Each is the median step interval of
# bench/train_speed.py (LoRA dim 32, bf16, AdamW, latents cached), recorded in bench/RESULTS.md. Add a row
# after a benchmark: the fit uses every row, and a job at exactly a row's settings on its GPU gets the figure.
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeasuredStep:
    gpu_model: str
    family: ModelFamily
    resolution: int
    batch_size: int
    trains_text_encoder: bool
    seconds: float
    source: str

    @property
    def work(self) -> Work:
        return step_work(self.family, self.resolution**2, self.batch_size, MEASURED_RANK, self.trains_text_encoder)


MEASURED_RANK = 32
_H200 = (
    "bench/RESULTS.md 2026-11-29 (fourth session): H200, CUDA graphs, bf16, fused LoRA layers, channels_last "
    "GroupNorm kernels, overlapped steps"
)
_H100 = "bench/RESULTS.md 2026-12-05 ({}): H100 80GB HBM3, the locked versions (constraints.txt)"
MEASURED_STEPS: tuple[MeasuredStep, ...] = (
    MeasuredStep("H200", "sd15", 512, 4, True, 0.0385, f"{_H200}; SD 1.5 512px b4, UNet + TE: 38.5 ms (after review)"),
    MeasuredStep("H200", "sd15", 512, 4, False, 0.0351, f"{_H200}; SD 1.5 512px b4, UNet only: 35.1 ms"),
    MeasuredStep("H200", "sdxl", 1024, 2, False, 0.1138, f"{_H200}; SDXL 1024px b2, UNet: 113.8 ms"),
    MeasuredStep(
        "H100 SXM",
        "sd15",
        512,
        4,
        True,
        0.0401,
        _H100.format("fifth session") + "; SD 1.5 512px b4, UNet + TE: 40.1 ms",
    ),
    MeasuredStep(
        "H100 SXM", "sdxl", 1024, 2, False, 0.1199, _H100.format("fifth session") + "; SDXL 1024px b2, UNet: 119.9 ms"
    ),
    MeasuredStep(
        "H100 SXM",
        "sd15",
        512,
        1,
        True,
        0.0196,
        _H100.format("sixth session") + "; SD 1.5 512px b1, UNet + TE: 19.6 ms",
    ),
    MeasuredStep(
        "H100 SXM",
        "sd15",
        768,
        2,
        True,
        0.0547,
        _H100.format("sixth session") + "; SD 1.5 768px b2, UNet + TE: 54.7 ms",
    ),
    MeasuredStep(
        "H100 SXM", "sdxl", 1024, 2, False, 0.1201, _H100.format("sixth session") + "; SDXL 1024px b2, UNet: 120.1 ms"
    ),
    MeasuredStep(
        "H100 SXM", "sdxl", 1024, 1, False, 0.0775, _H100.format("sixth session") + "; SDXL 1024px b1, UNet: 77.5 ms"
    ),
)
MEASURED_SPREAD = Figure(
    0.05,
    "measured",
    "bench/RESULTS.md: the same case measured 38.2 and 38.5 ms (SD 1.5) on two H200 machines, 119.9 and 120.1 ms "
    "(SDXL) on two H100 machines; +-5% also covers another machine of the kind",
)

# ------------------------------------------------------------------------------------------------------
# The model: step = FLOPs / (tensor rate x tensor fraction) + bytes / (bandwidth x bandwidth factor)
#                   + kernels x kernel cost
# Fitted on MEASURED_STEPS: a tensor fraction per family, one bandwidth factor and one kernel cost. The
# tensor fraction is multiplied by the GPU class's efficiency factor (EFFICIENCY). See docs/costs.md.
# ------------------------------------------------------------------------------------------------------
MAX_TENSOR_FRACTION = Figure(
    0.85, "assumed", "no card keeps its tensor cores busier than this over a whole step of many kernels"
)
FP32_TENSOR_RATE = Figure(
    0.5, "published", "the TF32 dense rate is half the bf16 one in every datasheet of rentrain.gpu_specs"
)
FP32_UNCERTAINTY = Figure(
    2.0,
    "assumed",
    "mixed_precision = 'no' is modelled at the TF32 rate with twice the bytes; products PyTorch runs without "
    "TF32 use the slower CUDA cores, so the range's high end is doubled",
)


@dataclass(frozen=True)
class Efficiency:
    """A GPU class's tensor fraction relative to the calibrated Hopper one: central, low and high."""

    factor: float
    low: float
    high: float
    kind: FigureKind
    source: str


_DIFFUSERS = (
    "the diffusers PyTorch 2.0 benchmark (huggingface.co/docs/diffusers/optimization/torch2.0; the same SD 1.5 "
    "code on each card), run through this model (docs/costs.md, 'Cards we did not measure')"
)
EFFICIENCY: dict[EfficiencyClass, Efficiency] = {
    "hopper": Efficiency(
        1.0,
        0.9,
        1.1,
        "assumed",
        "the fraction itself is fitted on the H100 SXM and H200 runs (MEASURED_STEPS, within 6% of each); +-10% "
        "at other settings and on the other Hopper cards is assumed",
    ),
    "datacenter": Efficiency(
        1.0,
        0.75,
        1.3,
        "assumed",
        "A100 / A30, not run with this trainer: assumed to keep their tensor cores as busy as the Hopper cards "
        f"(the A100 keeps 27-44% of its rate in {_DIFFUSERS}; the Hopper cards 33-41% here)",
    ),
    "pro": Efficiency(
        0.85,
        0.6,
        1.15,
        "derived",
        f"full-rate tensor cores under a low power limit: the A10 keeps 0.8-0.9x the A100's fraction in "
        f"{_DIFFUSERS}; the other workstation and PCIe cards are assumed alike",
    ),
    "geforce": Efficiency(
        1.9,
        1.4,
        2.5,
        "derived",
        f"GeForce cards keep about twice the A100's fraction of their float32-accumulate tensor rate: RTX 3090, "
        f"3090 Ti and 4090 1.6-2.4x in {_DIFFUSERS}",
    ),
}


@dataclass(frozen=True)
class Calibration:
    tensor_fraction: dict[str, float]  # per family, of the datasheet dense bf16 rate, on Hopper
    bandwidth_factor: float  # counted bytes moved per second / datasheet bandwidth
    kernel_seconds: float  # per kernel: the launch gap and a small kernel's least duration
    error: tuple[float, ...]  # per MEASURED_STEPS row: modelled / measured - 1


def modelled_seconds(spec: GpuSpec, work: Work, tensor_fraction: float, cal: Calibration) -> float:
    """The model's step time: tensor work + other kernels' memory traffic + a fixed cost per kernel."""
    fraction = min(tensor_fraction, MAX_TENSOR_FRACTION.value)
    return (
        work.flop / (spec.bf16_tflops * 1e12 * fraction)
        + work.bytes / (spec.bandwidth_gbs * 1e9 * cal.bandwidth_factor)
        + work.kernels * cal.kernel_seconds
    )


@cache
def calibration() -> Calibration:
    """The fit of the model to MEASURED_STEPS. The step time is linear in 1 / tensor fraction (per family),
    1 / bandwidth factor and the kernel cost, so these come from weighted linear least squares (each row
    weighted by 1 / its time: relative errors)."""
    families = sorted({m.family for m in MEASURED_STEPS})
    rows, targets = [], []
    for m in MEASURED_STEPS:
        spec, work = _spec(m.gpu_model), m.work
        tensor = [work.flop / (spec.bf16_tflops * 1e12) if f == m.family else 0.0 for f in families]
        rows.append([x / m.seconds for x in (*tensor, work.bytes / (spec.bandwidth_gbs * 1e9), work.kernels)])
        targets.append(1.0)
    *inverse_fractions, inverse_bandwidth, kernel = _least_squares(rows, targets)
    assert min(*inverse_fractions, inverse_bandwidth, kernel) > 0, "MEASURED_STEPS give a model with a negative term"
    fitted = Calibration(
        tensor_fraction={f: 1 / x for f, x in zip(families, inverse_fractions, strict=True)},
        bandwidth_factor=1 / inverse_bandwidth,
        kernel_seconds=kernel,
        error=(),
    )
    errors = tuple(
        modelled_seconds(_spec(m.gpu_model), m.work, fitted.tensor_fraction[m.family], fitted) / m.seconds - 1
        for m in MEASURED_STEPS
    )
    return Calibration(fitted.tensor_fraction, fitted.bandwidth_factor, fitted.kernel_seconds, errors)


def _least_squares(rows: list[list[float]], targets: list[float]) -> list[float]:
    """x minimising |rows x - targets|: the normal equations, by Gaussian elimination with partial pivoting."""
    n = len(rows[0])
    a = [
        [sum(r[i] * r[j] for r in rows) for j in range(n)] + [sum(r[i] * t for r, t in zip(rows, targets, strict=True))]
        for i in range(n)
    ]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                ratio = a[r][col] / a[col][col]
                a[r] = [x - ratio * y for x, y in zip(a[r], a[col], strict=True)]
    return [a[i][n] / a[i][i] for i in range(n)]


def _spec(gpu_model: str) -> GpuSpec:
    spec = spec_for(gpu_model)
    assert spec is not None, f"MEASURED_STEPS names {gpu_model}, which rentrain.gpu_specs lacks"
    return spec


TINY_SECONDS_PER_STEP = Figure(
    0.05, "assumed", "builtin tiny models: a few ms of GPU work per step; dominated by Python overhead"
)
TINY_BATCH_MARGINAL = Figure(0.1, "assumed", "each extra image adds a tenth: a tiny UNet is launch-overhead bound")
TINY_RANGE = Figure(2.0, "assumed", "the tiny models' step time within half to twice the figure")

# ------------------------------------------------------------------------------------------------------
# Several GPUs (`--gpus N`): data parallel (DDP under `accelerate launch`), each rank its own batch.
# A step then trains N x batch_size samples, so an epoch has ceil(batches / (N x accumulation)) steps
# (kohya's count under accelerate), and each step takes the single-GPU step time / efficiency: the gradient
# all-reduce, and every rank waiting for the slowest. Job time ~ single-GPU time / (N x efficiency).
#
# ASSUMED, NOT MEASURED: rentrain has had no multi-GPU machine to measure on. The figures follow what
# published DDP scaling reports show for models whose gradients are small next to their compute (a LoRA's
# are tens of MB for SD 1.5, a few hundred for SDXL at dim 32): near-linear on NVLink/NVSwitch boards,
# somewhat less over PCIe. Replace a row with kind "measured" after a benchmark. Counts between the rows
# interpolate linearly.
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

SECONDS_PER_HOUR = 3600.0
MODELLED_SETUP = "modelled from the offer's figures and the job's sizes (docs/costs.md)"
HISTORY_SPREAD = Figure(
    0.10, "assumed", "hosts of one GPU model differ in clocks, cooling and CPU: the step time within ±10%"
)


class SpeedEstimate(BaseModel):
    seconds_per_step: float
    low: float  # the range the step time is expected in
    high: float
    kind: EstimateKind
    source: str


class ScalingEstimate(BaseModel):
    gpus: int
    interconnect: Interconnect
    efficiency: float
    kind: FigureKind | None  # None for one GPU: nothing is scaled
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
    checkpoints: int = 1  # LoRA files saved, the final one included: each comes home with its training state
    save_bytes_per_value: int = 4  # of the saved LoRA: 2 with save_precision fp16 / bf16
    sample_grids: int = 0
    sample_images: int = 0  # images in all the job's sample grids
    sample_steps: int = 20  # sampler steps per sample image


class JobEstimate(BaseModel):
    steps: int
    seconds_per_step: float  # with several GPUs: the one-GPU step time / the scaling efficiency
    # the step time's range (None in estimates recorded before ranges: the point alone)
    seconds_per_step_low: float | None = None
    seconds_per_step_high: float | None = None
    speed_kind: RecordedKind
    speed_source: str
    gpus: int = 1
    scaling: ScalingEstimate | None = None  # several GPUs only
    train_hours: float
    overhead_hours: float  # the sum of setup_seconds, in hours
    total_hours: float
    price_per_hour: float
    cost_usd: float  # gpu_usd + bandwidth_usd + storage_usd
    # The parts (docs/costs.md, "Setup, transfer and storage"). Estimates recorded before them have none:
    # their cost_usd was the hours at price_per_hour alone.
    setup_seconds: dict[str, float] = Field(default_factory=dict)  # per phase (rentrain.setup_time)
    setup_source: str = MODELLED_SETUP  # or the user's own jobs (rentrain.history)
    transfer_gb: dict[str, float] = Field(default_factory=dict)  # per phase: in, except the fetch (out)
    gpu_usd: float | None = None  # total_hours at price_per_hour: the GPUs and the disk while the instance runs
    bandwidth_usd: float = 0.0  # transfer_gb at the offer's $/GB in and out
    # Storage beyond price_per_hour: none, as a job ends by destroy and the disk bills only while the instance
    # exists (inside price_per_hour while it runs). storage_usd_per_hour is what a stopped instance would bill.
    storage_usd: float = 0.0
    storage_usd_per_hour: float | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_hours_low(self) -> float:
        return self.total_hours - self.train_hours * (1 - self._ratio(self.seconds_per_step_low))

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_hours_high(self) -> float:
        return self.total_hours - self.train_hours * (1 - self._ratio(self.seconds_per_step_high))

    @computed_field  # type: ignore[prop-decorator]
    @property
    def cost_low_usd(self) -> float:
        """The cost with training at the range's fast end (setup, bandwidth and storage as estimated)."""
        return self._cost_at(self.total_hours_low)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def cost_high_usd(self) -> float:
        return self._cost_at(self.total_hours_high)

    def _cost_at(self, hours: float) -> float:
        """cost_usd with its time part scaled from total_hours to ``hours``."""
        if not self.total_hours:
            return self.cost_usd
        time_usd = self.cost_usd if self.gpu_usd is None else self.gpu_usd
        return self.cost_usd - time_usd * (1 - hours / self.total_hours)

    def _ratio(self, bound: float | None) -> float:
        return 1.0 if bound is None or not self.seconds_per_step else bound / self.seconds_per_step


def guess_model_family(model: str, sdxl: bool | None) -> ModelFamily:
    """From the config: `sdxl` if set, else the model reference (an SDXL checkpoint nearly always says 'xl')."""
    if model.startswith("builtin:tiny"):
        return "tiny"
    if sdxl is not None:
        return "sdxl" if sdxl else "sd15"
    name = Path(model).name.lower() if not model.startswith("https://") else model.lower()
    return "sdxl" if ("xl" in name or "pony" in name or "illustrious" in name) else "sd15"


def seconds_per_step(gpu_model: str, profile: JobProfile, vram_gb: float | None = None) -> SpeedEstimate | None:
    """One GPU's step time and its range: measured where rentrain ran these settings on this GPU, else modelled.
    ``vram_gb`` picks the row of a model sold with several memory sizes (A100 40/80 GB). None when the GPU has
    no row in rentrain.gpu_specs."""
    if profile.family == "tiny":
        speed = _tiny(profile)
    else:
        spec = spec_for(gpu_model, vram_gb)
        if spec is None:
            return None
        speed = _measured(spec, profile) or modelled_step(spec, profile)
    factors = []
    if profile.gradient_checkpointing:
        factor = checkpointing_factor(profile.family)
        factors.append((factor, f"x {factor:.2f} gradient checkpointing (measured on the H200)"))
    if profile.gradient_accumulation_steps > 1:
        accumulation = profile.gradient_accumulation_steps
        factors.append((float(accumulation), f"x {accumulation} accumulated batches per step"))
    for factor, note in factors:
        speed = speed.model_copy(
            update={
                "seconds_per_step": speed.seconds_per_step * factor,
                "low": speed.low * factor,
                "high": speed.high * factor,
                "source": f"{speed.source}; {note}",
            }
        )
    return speed


def checkpointing_factor(family: ModelFamily) -> float:
    """The trainer's measured step-time factor of gradient checkpointing (remote.trainer.memory, from H200 runs);
    the tiny models take SD 1.5's (the same UNet layout)."""
    from remote.trainer.memory import PROFILES

    return PROFILES["sd15" if family == "tiny" else family].checkpointing_factor


def _tiny(profile: JobProfile) -> SpeedEstimate:
    seconds = TINY_SECONDS_PER_STEP.value * (1 + (profile.batch_size - 1) * TINY_BATCH_MARGINAL.value)
    spread = TINY_RANGE.value
    return SpeedEstimate(
        seconds_per_step=seconds,
        low=seconds / spread,
        high=seconds * spread,
        kind="assumed",
        source=f"{TINY_SECONDS_PER_STEP.source}; {TINY_BATCH_MARGINAL.source}",
    )


def _measured(spec: GpuSpec, profile: JobProfile) -> SpeedEstimate | None:
    """The measured step at exactly these settings on this GPU, the mean where it was measured more than once
    (checkpointing and accumulation are applied after)."""
    width, height = profile.resolution
    if width != height or profile.network_dim != MEASURED_RANK or profile.bytes_per_value != 2:
        return None
    runs = [
        m
        for m in MEASURED_STEPS
        if (m.gpu_model, m.family, m.resolution, m.batch_size, m.trains_text_encoder)
        == (spec.model, profile.family, width, profile.batch_size, profile.trains_text_encoder)
    ]
    if not runs:
        return None
    seconds = sum(m.seconds for m in runs) / len(runs)
    spread = MEASURED_SPREAD.value
    return SpeedEstimate(
        seconds_per_step=seconds,
        low=seconds * (1 - spread),
        high=seconds * (1 + spread),
        kind="measured",
        source=" and ".join(m.source for m in runs),
    )


def modelled_step(spec: GpuSpec, profile: JobProfile) -> SpeedEstimate:
    """The model's step time on this GPU (never a measured figure), with its range."""
    work = step_work(
        profile.family,
        profile.resolution[0] * profile.resolution[1],
        profile.batch_size,
        profile.network_dim,
        profile.trains_text_encoder,
    )
    fp32 = profile.bytes_per_value == 4
    if fp32:
        work = Work(flop=work.flop / FP32_TENSOR_RATE.value, bytes=work.bytes * 2, kernels=work.kernels)
    cal = calibration()
    efficiency = EFFICIENCY[spec.efficiency_class]
    base = cal.tensor_fraction[profile.family]

    def at(factor: float) -> float:
        return modelled_seconds(spec, work, base * factor, cal)

    high = at(efficiency.low) * (FP32_UNCERTAINTY.value if fp32 else 1.0)
    fraction = min(base * efficiency.factor, MAX_TENSOR_FRACTION.value)
    source = (
        f"modelled (docs/costs.md): {work.flop / 1e12:.2f} TFLOP and {work.bytes / 1e9:.1f} GB moved per step "
        f"(rentrain.step_work) on the {spec.model} ({spec.bf16_tflops:g} TFLOPS bf16, {spec.bandwidth_gbs:g} GB/s: "
        f"{spec.source}) at {fraction:.0%} of its tensor rate ({spec.efficiency_class} cards: {efficiency.source})"
    )
    if fp32:
        source += f"; {FP32_UNCERTAINTY.source}"
    return SpeedEstimate(
        seconds_per_step=at(efficiency.factor), low=at(efficiency.high), high=high, kind="modelled", source=source
    )


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
        gpus=gpus,
        interconnect=interconnect,
        efficiency=value,
        kind="derived" if low.kind in ("published", "measured") else low.kind,
        source=source,
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


def estimate_job(profile: JobProfile, offer: Offer, history: JobHistory | None = None) -> JobEstimate | None:
    """Training on all the offer's GPUs (one data-parallel rank each) plus the setup phases, at its all-in rate,
    plus bandwidth. The user's own jobs (`history`) give the step time and the setup where they measured this GPU
    (and settings, and provider and family), the models the rest. None when the GPU's speed is unknown or the job
    does not fit its memory even with memory planning."""
    training = training_estimate(profile, offer, history)
    if training is None:
        return None
    measured = history.setup(offer.provider, offer.gpu_model, profile.family) if history else None
    if measured is not None:
        source = f"measured: the median of your {_jobs(measured.runs)} on {offer.provider} {offer.gpu_model}"
        transfer = {**transfer_gb(profile), **measured.transfer_gb}  # the image and the installs stay modelled
        return with_setup(training, measured.seconds, transfer, offer, source)
    per_image = seconds_per_image(profile, training.seconds_per_step * _scaling(training))  # one GPU samples
    phases = setup_seconds(profile, offer, per_image)
    return with_setup(training, phases, transfer_gb(profile), offer)


def _jobs(count: int) -> str:
    return f"{count} job" + ("s" if count != 1 else "")


def training_estimate(profile: JobProfile, offer: Offer, history: JobHistory | None = None) -> JobEstimate | None:
    """The training part alone: steps and step time on the offer's GPUs; no setup and no money yet
    (with_setup adds them)."""
    known = history.speed(offer.gpu_model, profile, offer.gpu_count) if history else None
    if known is not None:
        return _from_history(profile, offer, known)
    speed = seconds_per_step(offer.gpu_model, profile, offer.vram_gb)
    fit = memory_fit(profile, offer.vram_gb)
    if speed is None or fit is None:
        return None
    factor, note = fit
    if factor != 1.0:  # the memory plan's factor comes from the H200 profiles: no longer a measured figure
        speed = speed.model_copy(
            update={
                "seconds_per_step": speed.seconds_per_step * factor,
                "low": speed.low * factor,
                "high": speed.high * factor,
                "source": speed.source + note,
                "kind": "modelled" if speed.kind == "measured" else speed.kind,
            }
        )
    gpus = offer.gpu_count
    scaling = scaling_efficiency(offer.gpu_model, gpus)
    step_seconds = speed.seconds_per_step / scaling.efficiency
    steps = steps_on(profile, gpus)
    train_h = steps * step_seconds / SECONDS_PER_HOUR
    return JobEstimate(
        steps=steps,
        seconds_per_step=step_seconds,
        seconds_per_step_low=speed.low / scaling.efficiency,
        seconds_per_step_high=speed.high / scaling.efficiency,
        speed_kind=speed.kind,
        speed_source=speed.source,
        gpus=gpus,
        scaling=scaling if gpus > 1 else None,
        train_hours=train_h,
        overhead_hours=0.0,
        total_hours=train_h,
        price_per_hour=offer.price_per_hour,
        cost_usd=0.0,
    )


def _from_history(profile: JobProfile, offer: Offer, known: HistorySpeed) -> JobEstimate:
    """The training part at the step time the user's own jobs measured on these GPUs at these settings: nothing
    modelled, scaled or planned (the trainer made the same choices then)."""
    spread = HISTORY_SPREAD.value
    steps = steps_on(profile, offer.gpu_count)
    train_h = steps * known.seconds_per_step / SECONDS_PER_HOUR
    return JobEstimate(
        steps=steps,
        seconds_per_step=known.seconds_per_step,
        seconds_per_step_low=known.low * (1 - spread),
        seconds_per_step_high=known.high * (1 + spread),
        speed_kind="measured",
        speed_source=f"the median of your {_jobs(known.runs)} on {offer.gpu_count} x {offer.gpu_model} at these "
        f"settings (after warm-up; range: their fastest and slowest, ±{spread:.0%} between hosts)",
        gpus=offer.gpu_count,
        train_hours=train_h,
        overhead_hours=0.0,
        total_hours=train_h,
        price_per_hour=offer.price_per_hour,
        cost_usd=0.0,
    )


def _scaling(estimate: JobEstimate) -> float:
    return estimate.scaling.efficiency if estimate.scaling else 1.0


def seconds_per_image(profile: JobProfile, step_seconds: float) -> float:
    """One image's share of a one-GPU training step: what the sample time follows (rentrain.setup_time)."""
    return step_seconds / (profile.batch_size * profile.gradient_accumulation_steps)


def with_setup(
    estimate: JobEstimate,
    setup: dict[str, float],
    transfer: dict[str, float],
    offer: Offer,
    setup_source: str = MODELLED_SETUP,
) -> JobEstimate:
    """The estimate with these setup phases (seconds) and transfers (GB) in its hours and money: its training
    hours plus the setup at the offer's price, plus the bandwidth. Storage beyond the price is none: a job
    ends by destroy (docs/costs.md)."""
    overhead_h = sum(setup.values()) / SECONDS_PER_HOUR
    total_h = estimate.train_hours + overhead_h
    gpu_usd = total_h * offer.price_per_hour
    bandwidth = bandwidth_usd(transfer, offer)
    storage = 0.0
    return estimate.model_copy(
        update={
            "overhead_hours": overhead_h,
            "total_hours": total_h,
            "setup_seconds": setup,
            "setup_source": setup_source,
            "transfer_gb": transfer,
            "gpu_usd": gpu_usd,
            "bandwidth_usd": bandwidth,
            "storage_usd": storage,
            "storage_usd_per_hour": offer.storage_usd_per_hour,
            "cost_usd": gpu_usd + bandwidth + storage,
        }
    )


def share_setup(estimate: JobEstimate, offer: Offer, shared: Collection[str], jobs: int) -> JobEstimate:
    """One of ``jobs`` jobs on one rental: the ``shared`` phases' seconds and transfers split equally."""

    def split(parts: dict[str, float]) -> dict[str, float]:
        return {phase: value / jobs if phase in shared else value for phase, value in parts.items()}

    return with_setup(
        estimate, split(estimate.setup_seconds), split(estimate.transfer_gb), offer, estimate.setup_source
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
    # the final file and grid, and those every n epochs or steps before the last (remote/trainer/loop.py)
    grids = (
        1
        + _before_last(plan.epochs, train.sample_every_n_epochs)
        + _before_last(plan.total_steps, train.sample_every_n_steps)
    )
    prompts = _prompt_count(train.sample_prompts)
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
        checkpoints=1
        + _before_last(plan.epochs, train.save_every_n_epochs)
        + _before_last(plan.total_steps, train.save_every_n_steps),
        save_bytes_per_value=4 if train.save_precision in (None, "float") else 2,
        sample_grids=grids if prompts else 0,
        sample_images=(grids if prompts else 0) * prompts * len(train.sample_seeds) * len(train.sample_weights),
        sample_steps=train.sample_steps,
    )


def _before_last(count: int, every: int | None) -> int:
    return (count - 1) // every if every else 0


def _prompt_count(prompts: list[str] | Path | None) -> int:
    """Sample prompts: a list, or a prompt file's lines that are neither blank nor comments."""
    if prompts is None:
        return 0
    if isinstance(prompts, Path):
        try:
            lines = prompts.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return 0  # the config check refuses a prompt file it cannot read
        return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))
    return len(prompts)


def _folder_bytes(folder: Path | None) -> int:
    if folder is None or not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
