"""What the user's own finished jobs measured, as figures for the next estimate: the step time on a GPU at given
settings, and the seconds of each setup phase on a provider's GPU for a model family. Each figure says how many
jobs it rests on. The measurements are the ledger's `job_runs` (rentrain.ledger JobRun), written as jobs close.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

from pydantic import BaseModel

from rentrain.ledger import JobRun, Ledger, default_ledger_path

if TYPE_CHECKING:  # rentrain.costs may import this module to prefer these figures
    from rentrain.job_profile import JobProfile

# The first steps of each trainer start are warm-up (CUDA kernels chosen, allocator grown, caches filled): the
# median leaves out the first WARM_UP_FRACTION of the steps that start runs, or WARM_UP_MIN_STEPS, whichever is more.
WARM_UP_FRACTION = 0.1
WARM_UP_MIN_STEPS = 5
BYTES_PER_GB = 1e9  # the providers' $/GB are per decimal gigabyte


# The phases of a record that follow one another on the instance's bill (rentrain.job_phases.meter): with the
# steps at the measured step time they add up to the billed seconds. The client's "training" span is the steps,
# train_extra and the trainer's phases inside it; upload, bootstrap and model_download run inside "prepare".
BILLED_PHASES = (
    "image_pull",
    "prepare",
    "trainer_setup",
    "latent_cache",
    "text_cache",
    "samples",
    "train_extra",
    "fetch",
    "teardown",
    "other",
)


class HistorySpeed(BaseModel):
    """The median step time of the user's own runs on one GPU at one setting."""

    seconds_per_step: float
    runs: int  # how many jobs it rests on
    low: float  # the fastest and slowest of those runs' medians
    high: float


# Phases whose seconds grow with the job: a later job takes their rate, not their seconds.
PER_IMAGE_PHASES = ("latent_cache", "text_cache")  # per dataset image
PER_SAMPLE_PHASES = ("samples",)  # per sample image


class HistorySetup(BaseModel):
    """Each billed phase's median seconds over the user's own runs on one provider's GPU for one model family (a
    run without the phase counts it as 0 s); for the phases that grow with the job, the median seconds per image
    or per sample image instead (absent where no run had any)."""

    seconds: dict[str, float]
    per_unit: dict[str, float]
    transfer_gb: dict[str, float]  # the medians of what went up, what the instance downloaded, what came home
    runs: int  # how many jobs it rests on


class JobHistory:
    """The user's finished jobs' measurements, read once from the ledger for many estimates."""

    def __init__(self, runs: list[JobRun]):
        self.runs = runs

    @classmethod
    def of(cls, ledger: Ledger | None = None) -> JobHistory:
        """The default ledger's history; an empty one where there is no ledger yet (nothing is created)."""
        if ledger is None:
            path = default_ledger_path()
            if not path.exists():
                return cls([])
            ledger = Ledger(path)
        return cls(ledger.job_runs())

    def speed(self, gpu_model: str, profile: JobProfile, gpus: int = 1) -> HistorySpeed | None:
        """The median s/step of the runs on `gpus` x `gpu_model` at the profile's settings; None without any."""
        key = settings_key(profile)
        medians = [
            run.seconds_per_step
            for run in self.runs
            if (run.gpu_model, run.gpu_count, run.settings_key) == (gpu_model, gpus, key)
            and run.seconds_per_step is not None
        ]
        if not medians:
            return None
        return HistorySpeed(
            seconds_per_step=statistics.median(medians), runs=len(medians), low=min(medians), high=max(medians)
        )

    def setup(self, provider: str, gpu_model: str, family: str) -> HistorySetup | None:
        """Per billed phase, the median seconds of the runs on `provider`'s `gpu_model` for the model `family` whose
        client saw the whole setup (it created the instance)."""
        matching = [
            run
            for run in self.runs
            if (run.provider, run.gpu_model, run.family) == (provider, gpu_model, family)
            and "image_pull" in run.phases  # not a queue's later job, nor a client that attached: whole setups only
        ]
        if not matching:
            return None
        return HistorySetup(
            seconds={name: statistics.median(run.phases.get(name, 0.0) for run in matching) for name in BILLED_PHASES},
            per_unit=_per_unit(matching),
            transfer_gb={
                "upload": statistics.median(run.bytes_up for run in matching) / BYTES_PER_GB,
                "model_download": statistics.median(run.model_download_bytes for run in matching) / BYTES_PER_GB,
                "fetch": statistics.median(run.bytes_down for run in matching) / BYTES_PER_GB,
            },
            runs=len(matching),
        )


def settings_key(profile: JobProfile) -> str:
    """The settings that change the step time, as one stable string: two jobs with the same key on the same GPU
    take the same time per step."""
    width, height = profile.resolution
    parts = [
        profile.model_key,
        f"{width}x{height}",
        f"batch{profile.batch_size}",
        f"rank{profile.network_dim}",
        f"te{int(profile.trains_text_encoder)}",
        f"bytes{profile.bytes_per_value}",
        f"ckpt{int(profile.gradient_checkpointing)}",
        f"accum{profile.gradient_accumulation_steps}",
    ]
    if profile.fp8_base:
        parts.append("fp8")
    if not profile.fit_memory:
        parts.append("as-configured")  # the memory planner off: the card's plan does not apply
    return "/".join(parts)


def warm_up_steps(steps_in_run: int) -> int:
    """How many of a trainer start's first steps are warm-up, for a start that runs `steps_in_run` steps."""
    return max(WARM_UP_MIN_STEPS, math.ceil(WARM_UP_FRACTION * steps_in_run))


def after_warm_up(step: int, total_steps: int, resumed_from_step: int = 0) -> bool:
    """Whether step `step` (1-based, numbered over the whole job) of a start that resumed after
    `resumed_from_step` and runs to `total_steps` is past that start's warm-up."""
    return step - resumed_from_step > warm_up_steps(total_steps - resumed_from_step)


def _per_unit(runs: list[JobRun]) -> dict[str, float]:
    """The median seconds per dataset image (PER_IMAGE_PHASES) and per sample image (PER_SAMPLE_PHASES) over the
    runs that had any."""
    rates: dict[str, float] = {}
    for phases, units in ((PER_IMAGE_PHASES, "images"), (PER_SAMPLE_PHASES, "sample_images")):
        counted = [run for run in runs if getattr(run, units) > 0]
        for name in phases:
            if counted:
                rates[name] = statistics.median(run.phases.get(name, 0.0) / getattr(run, units) for run in counted)
    return rates
