"""How long one training step of rentrain's own trainer takes on a GPU: measured where rentrain ran these
settings on that GPU, else modelled from the step's counted work and the GPU's datasheet (docs/costs.md has the
model, its sources and a table), and how several GPUs scale it.

Every step time comes with a range (low, high): the measurements' spread, or the model's uncertainty for that
class of GPU. Other figures carry their kind and source (rentrain.figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from remote.trainer.families import family_facts
from rentrain.figures import Figure, FigureKind
from rentrain.gpu_specs import EfficiencyClass, GpuSpec, spec_for
from rentrain.step_work import Work, step_work

if TYPE_CHECKING:
    from rentrain.job_profile import JobProfile

EstimateKind = Literal["measured", "modelled", "assumed"]
# Estimates recorded in a ledger before the speed model said "published", "derived" or "scaled".
RecordedKind = EstimateKind | Literal["published", "derived", "scaled"]


# ------------------------------------------------------------------------------------------------------
# The trainer's measured steps: the data the model is calibrated on. Each is the median step interval of
# bench/train_speed.py (LoRA dim 32, bf16, AdamW, latents cached) or bench/flux_speed.py (kohya's Flux.1
# recipe: dim 16, 8-bit base, gradient checkpointing), recorded in bench/RESULTS.md. Add a row after a
# benchmark: the fit uses every row, and a job at exactly a row's settings on its GPU gets the figure.
# ------------------------------------------------------------------------------------------------------
MEASURED_RANK = 32


@dataclass(frozen=True)
class MeasuredStep:
    gpu_model: str
    case: str  # bench/train_speed.py's case: a family's speed_case (remote.trainer.families)
    resolution: int
    batch_size: int
    trains_text_encoder: bool
    seconds: float
    source: str
    rank: int = MEASURED_RANK
    fp8_base: bool = False
    checkpointed: bool = False

    @property
    def work(self) -> Work:
        return step_work(
            self.case, self.resolution**2, self.batch_size, self.rank, self.trains_text_encoder, self.fp8_base
        )

    @property
    def plain_seconds(self) -> float:
        """The step without gradient checkpointing: what the model's terms describe (checkpointing is a factor
        applied after, rentrain.speed_model.checkpointing_factor)."""
        return self.seconds / checkpointing_factor(self.case) if self.checkpointed else self.seconds


_H200 = (
    "bench/RESULTS.md 2026-11-29 (fourth session): H200, CUDA graphs, bf16, fused LoRA layers, channels_last "
    "GroupNorm kernels, overlapped steps"
)
_H100 = "bench/RESULTS.md {}: H100 80GB HBM3, the locked versions (constraints.txt)"
_FIFTH, _SIXTH = (_H100.format(f"2026-12-05 ({n} session)") for n in ("fifth", "sixth"))
_ELEVENTH = _H100.format("2026-12-06 (eleventh session)")


def _flux_h100(resolution: int, seconds: float, checkpointed: bool) -> MeasuredStep:
    """bench/flux_speed.py's run of kohya's Flux.1 recipe (dim 16, 8-bit base) on the H100: checkpointed under a
    24 GiB cap, or without checkpointing and cap."""
    how = "checkpointed, 24 GiB cap" if checkpointed else "not checkpointed"
    source = f"Flux.1 [dev] {resolution}px b1, dim 16, 8-bit base, {how}: {seconds * 1000:.1f} ms"
    return MeasuredStep(
        "H100 SXM",
        "flux",
        resolution,
        1,
        False,
        seconds,
        f"{_ELEVENTH}; {source}",
        rank=16,
        fp8_base=True,
        checkpointed=checkpointed,
    )


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
        _FIFTH + "; SD 1.5 512px b4, UNet + TE: 40.1 ms",
    ),
    MeasuredStep("H100 SXM", "sdxl", 1024, 2, False, 0.1199, _FIFTH + "; SDXL 1024px b2, UNet: 119.9 ms"),
    MeasuredStep(
        "H100 SXM",
        "sd15",
        512,
        1,
        True,
        0.0196,
        _SIXTH + "; SD 1.5 512px b1, UNet + TE: 19.6 ms",
    ),
    MeasuredStep(
        "H100 SXM",
        "sd15",
        768,
        2,
        True,
        0.0547,
        _SIXTH + "; SD 1.5 768px b2, UNet + TE: 54.7 ms",
    ),
    MeasuredStep("H100 SXM", "sdxl", 1024, 2, False, 0.1201, _SIXTH + "; SDXL 1024px b2, UNet: 120.1 ms"),
    MeasuredStep("H100 SXM", "sdxl", 1024, 1, False, 0.0775, _SIXTH + "; SDXL 1024px b1, UNet: 77.5 ms"),
    MeasuredStep("H100 SXM", "sd15", 512, 4, True, 0.0400, _ELEVENTH + "; SD 1.5 512px b4, UNet + TE: 40.0 ms"),
    MeasuredStep("H100 SXM", "sdxl", 1024, 2, False, 0.1199, _ELEVENTH + "; SDXL 1024px b2, UNet: 119.9 ms"),
    *(
        _flux_h100(px, seconds, checkpointed)
        for px, seconds, checkpointed in (
            (1024, 0.7330, True),
            (512, 0.2638, True),
            (1024, 0.5293, False),
            (512, 0.1854, False),
        )
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
        "the fraction itself is fitted on the H100 SXM and H200 runs (MEASURED_STEPS, within 7% of each); +-10% "
        "at other settings and on the other Hopper cards is assumed",
    ),
    "datacenter": Efficiency(
        1.0,
        0.75,
        1.3,
        "assumed",
        "A100 / A30, not run with this trainer: assumed to keep their tensor cores as busy as the Hopper cards "
        f"(the A100 keeps 30-50% of its rate in {_DIFFUSERS}; the Hopper cards 36-47% here)",
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


def modelled_seconds(
    spec: GpuSpec, work: Work, tensor_fraction: float, cal: Calibration, ceiling: float = MAX_TENSOR_FRACTION.value
) -> float:
    """The model's step time: tensor work + other kernels' memory traffic + a fixed cost per kernel. The tensor
    fraction is held under ``ceiling``: MAX_TENSOR_FRACTION, or the datasheet rate itself for a range's fast end."""
    fraction = min(tensor_fraction, ceiling)
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
    families = sorted({m.case for m in MEASURED_STEPS})
    rows, targets = [], []
    for m in MEASURED_STEPS:
        spec, work = _spec(m.gpu_model), m.work
        tensor = [work.flop / (spec.bf16_tflops * 1e12) if f == m.case else 0.0 for f in families]
        rows.append([x / m.plain_seconds for x in (*tensor, work.bytes / (spec.bandwidth_gbs * 1e9), work.kernels)])
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
        modelled_seconds(_spec(m.gpu_model), m.work, fitted.tensor_fraction[m.case], fitted) / m.plain_seconds - 1
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


def seconds_per_step(gpu_model: str, profile: JobProfile, vram_gb: float | None = None) -> SpeedEstimate | None:
    """One GPU's step time and its range: measured where rentrain ran these settings on this GPU, else modelled.
    ``vram_gb`` picks the row of a model sold with several memory sizes (A100 40/80 GB). None when the GPU has
    no row in rentrain.gpu_specs."""
    if profile.builtin_tiny:
        speed = _tiny(profile)
    else:
        spec = spec_for(gpu_model, vram_gb)
        case = family_facts(profile.family).speed_case
        if spec is None or case is None:
            return None
        speed = _measured(spec, profile, case) or modelled_step(spec, profile, case)
    factors = []
    if profile.gradient_checkpointing:
        factor = checkpointing_factor(profile.family)
        factors.append((factor, f"x {factor:.2f} gradient checkpointing ({CHECKPOINTING_SOURCE})"))
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


CHECKPOINTING_SOURCE = (
    "the family's factor in remote/trainer/families/facts.py: measured on the H200 for SD 1.5 and SDXL, on the "
    "H100 for Flux.1"
)


def checkpointing_factor(family: str) -> float:
    """The trainer's step-time factor of gradient checkpointing (remote.trainer.families: measured on the H200 for
    SD 1.5 and SDXL, on the H100 for Flux.1)."""
    return family_facts(family).checkpointing_factor


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


def _measured(spec: GpuSpec, profile: JobProfile, case: str) -> SpeedEstimate | None:
    """The measured step of the family's benchmark `case` at exactly these settings on this GPU, the mean where
    it was measured more than once, without checkpointing (seconds_per_step applies checkpointing and
    accumulation after: a row measured with checkpointing gives back its own figure)."""
    width, height = profile.resolution
    if width != height or profile.bytes_per_value != 2:
        return None
    settings = (
        spec.model,
        case,
        width,
        profile.batch_size,
        profile.trains_text_encoder,
        profile.network_dim,
        profile.fp8_base,
        profile.gradient_checkpointing,
    )
    runs = [
        m
        for m in MEASURED_STEPS
        if (m.gpu_model, m.case, m.resolution, m.batch_size, m.trains_text_encoder, m.rank, m.fp8_base, m.checkpointed)
        == settings
    ]
    if not runs:
        return None
    seconds = sum(m.plain_seconds for m in runs) / len(runs)
    spread = MEASURED_SPREAD.value
    return SpeedEstimate(
        seconds_per_step=seconds,
        low=seconds * (1 - spread),
        high=seconds * (1 + spread),
        kind="measured",
        source=" and ".join(m.source for m in runs)
        + (
            "; measured with checkpointing, divided by its factor here and multiplied back below"
            if runs[0].checkpointed
            else ""
        ),
    )


def modelled_step(spec: GpuSpec, profile: JobProfile, case: str) -> SpeedEstimate:
    """The model's step time on this GPU for the family's benchmark `case` (never a measured figure), with its
    range."""
    work = step_work(
        case,
        profile.resolution[0] * profile.resolution[1],
        profile.batch_size,
        profile.network_dim,
        profile.trains_text_encoder,
        profile.fp8_base,
    )
    fp32 = profile.bytes_per_value == 4
    if fp32:
        work = Work(flop=work.flop / FP32_TENSOR_RATE.value, bytes=work.bytes * 2, kernels=work.kernels)
    cal = calibration()
    efficiency = EFFICIENCY[spec.efficiency_class]
    base = cal.tensor_fraction[case]

    def at(factor: float, ceiling: float = MAX_TENSOR_FRACTION.value) -> float:
        return modelled_seconds(spec, work, base * factor, cal, ceiling)

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
        seconds_per_step=at(efficiency.factor),
        low=at(efficiency.high, ceiling=1.0),  # the fast end may pass MAX_TENSOR_FRACTION, never the datasheet
        high=high,
        kind="modelled",
        source=source,
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


def with_memory_plan(speed: SpeedEstimate, fit: tuple[float, str]) -> SpeedEstimate:
    """``speed`` (the configured setting's) times the memory plan's factor (``memory_fit``). A planned setting
    other than the configured one was not measured as such: the figure is then modelled."""
    factor, note = fit
    if factor == 1.0:
        return speed
    return speed.model_copy(
        update={
            "seconds_per_step": speed.seconds_per_step * factor,
            "low": speed.low * factor,
            "high": speed.high * factor,
            "source": speed.source + note,
            "kind": "modelled" if speed.kind == "measured" else speed.kind,
        }
    )


def memory_fit(profile: JobProfile, vram_gb: float | None) -> tuple[float, str] | None:
    """(step-time factor, note) of the trainer's memory planning on a card of ``vram_gb`` (remote/trainer/
    memory.py: micro-batches or checkpointing where the batch does not fit, no checkpointing where the card holds
    the activations without it); None when nothing fits. With ``fit_memory`` off the run is as configured:
    (1.0, "") where that is estimated to fit, else None."""
    from remote.trainer.memory import Setting, budget_from_device, estimate_gib, footprint_for, plan_memory

    if profile.builtin_tiny or family_facts(profile.family).architecture is None or not vram_gb:
        return 1.0, ""
    pixels = profile.resolution[0] * profile.resolution[1]
    footprint = footprint_for(
        profile.family,
        pixels,
        profile.network_dim,
        profile.trains_text_encoder,
        profile.bytes_per_value,
        profile.fp8_base,
        profile.text_encoders_on_gpu or profile.trains_text_encoder,
    )
    configured = Setting(profile.batch_size, profile.batch_size, profile.gradient_checkpointing)
    budget = budget_from_device(int(vram_gb * 2**30))
    if not profile.fit_memory:
        return (1.0, "") if estimate_gib(footprint, configured) <= budget else None
    plan = plan_memory(footprint, configured, budget, allow_8bit=False)
    if not plan.fits:
        return None
    if plan.setting == configured:
        return 1.0, ""
    how = " and ".join(plan.changes(configured, short=True))
    why = "faster on" if plan.relative_time < 1 else "to fit"
    return plan.relative_time, f"; x {plan.relative_time:.2f} {why} {vram_gb:g} GB ({how}, memory planning)"
