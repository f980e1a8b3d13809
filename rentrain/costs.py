"""The estimate of a job on an offer: its training time (rentrain.speed_model, or the user's own jobs:
rentrain.history) and its setup phases (rentrain.setup_time) at the offer's hourly price, plus the bandwidth
and storage the provider bills beside it. docs/costs.md has the rules."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, computed_field

from providers.base import Offer
from rentrain.figures import Figure
from rentrain.gpu_specs import GPU_SPECS
from rentrain.history import PER_IMAGE_PHASES, PER_SAMPLE_PHASES
from rentrain.job_profile import JobProfile, steps_on
from rentrain.setup_time import bandwidth_usd, setup_seconds, transfer_gb
from rentrain.speed_model import (
    RecordedKind,
    ScalingEstimate,
    memory_fit,
    scaling_efficiency,
    seconds_per_step,
    with_memory_plan,
)

if TYPE_CHECKING:
    from rentrain.history import HistorySetup, HistorySpeed, JobHistory


SECONDS_PER_HOUR = 3600.0
MODELLED_SETUP = "modelled from the offer's figures and the job's sizes (docs/costs.md)"
HISTORY_SPREAD = Figure(
    0.10, "assumed", "hosts of one GPU model differ in clocks, cooling and CPU: the step time within ±10%"
)


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


def estimate_job(profile: JobProfile, offer: Offer, history: JobHistory | None = None) -> JobEstimate | None:
    """Training on all the offer's GPUs (one data-parallel rank each) plus the setup phases, at its all-in rate,
    plus bandwidth. The user's own jobs (`history`) give the step time and the setup where they measured this GPU
    (and settings, and provider and family), the models the rest. None when the GPU's speed is unknown or the job
    does not fit its memory even with memory planning."""
    training = training_estimate(profile, offer, history)
    if training is None:
        return None
    per_image = seconds_per_image(profile, training.seconds_per_step * _scaling(training))  # one GPU samples
    modelled = setup_seconds(profile, offer, per_image)
    measured = history.setup(offer.provider, offer.gpu_model, profile.model_key) if history else None
    if measured is None:
        return with_setup(training, modelled, transfer_gb(profile), offer)
    source = f"measured: the median of your {_jobs(measured.runs)} on {offer.provider} {offer.gpu_model}"
    transfer = {**transfer_gb(profile), **measured.transfer_gb}  # the image and the installs stay modelled
    return with_setup(training, _scaled_setup(measured, modelled, profile), transfer, offer, source)


def _scaled_setup(measured: HistorySetup, modelled: dict[str, float], profile: JobProfile) -> dict[str, float]:
    """The measured phases, those that grow with the job at the measured rate for this job's images and sample
    images (the model's figure where no earlier job had any)."""
    seconds = dict(measured.seconds)
    for phases, count in ((PER_IMAGE_PHASES, profile.images), (PER_SAMPLE_PHASES, profile.sample_images)):
        for name in phases:
            rate = measured.per_unit.get(name)
            seconds[name] = rate * count if rate is not None else modelled.get(name, 0.0)
    return seconds


def _jobs(count: int) -> str:
    return f"{count} job" + ("s" if count != 1 else "")


def _planned_alike(profile: JobProfile, offer: Offer, fit: tuple[float, str]) -> bool:
    """Whether the trainer plans these settings on this offer's card as on every card of its model (each memory
    size the GPU table knows): the history's runs ran on one of them, and ran the same setting."""
    sizes = {spec.vram_gb for spec in GPU_SPECS if spec.model == offer.gpu_model}
    return all(memory_fit(profile, size) == fit for size in sizes)


def training_estimate(profile: JobProfile, offer: Offer, history: JobHistory | None = None) -> JobEstimate | None:
    """The training part alone: steps and step time on the offer's GPUs; no setup and no money yet
    (with_setup adds them)."""
    fit = memory_fit(profile, offer.vram_gb)
    if fit is None:
        return None
    known = history.speed(offer.gpu_model, profile, offer.gpu_count) if history else None
    if known is not None and _planned_alike(profile, offer, fit):  # as the earlier runs of these settings ran
        return _from_history(profile, offer, known)
    speed = seconds_per_step(offer.gpu_model, profile, offer.vram_gb)
    if speed is None:
        return None
    speed = with_memory_plan(speed, fit)
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
