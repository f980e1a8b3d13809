"""What a job's report says, read from disk: its ledger record, transitions and instances, its events.jsonl,
the samples and the final LoRA file fetched home, and its dataset as the config names it now."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from remote.config import ConfigError, load_config
from remote.events import EVENTS_FILE, DoneEvent, ErrorEvent, SampleEvent, StartEvent, StepEvent, read_events
from rentrain.costs import JobEstimate
from rentrain.dataset_check import DatasetReport, inspect_dataset
from rentrain.ledger import InstanceRecord, JobRecord, JobRun, Ledger, Transition

# Each state a job passes through belongs to one phase of its time and money ("planned" and "closed" to none).
PHASE_OF_STATE: dict[str, str] = {
    "intent_recorded": "provision",
    "creating": "provision",
    "waiting_ssh": "provision",
    "syncing": "setup",
    "watchdog": "setup",
    "bootstrapping": "setup",
    "training": "training",
    "following": "training",
    "fetching": "fetch",
    "destroying": "teardown",
}
PHASES = ("provision", "setup", "training", "fetch", "teardown")


@dataclass(frozen=True)
class PhaseCost:
    name: str
    seconds: float
    usd: float


@dataclass
class RunEvents:
    """The trainer's events as fetched home; a resumed run's repeated steps keep their newest values."""

    start: StartEvent | None = None
    steps: list[StepEvent] = field(default_factory=list)
    samples: list[SampleEvent] = field(default_factory=list)
    done: DoneEvent | None = None
    errors: list[ErrorEvent] = field(default_factory=list)
    problem: str | None = None  # why events.jsonl could not be read


@dataclass(frozen=True)
class EstimateCheck:
    """A job's estimate against what it cost and measured. `actual_usd`: what the provider billed (the ledger's
    rate x its own billed seconds) plus the bandwidth at the offer's $/GB."""

    estimated_usd: float | None
    actual_usd: float
    bandwidth_usd: float | None  # None: the job recorded no measurements
    error_pct: float | None  # of the actual against the estimate; None without both, or before the job succeeded
    estimated_seconds_per_step: float | None
    measured_seconds_per_step: float | None
    speed_error_pct: float | None


@dataclass(frozen=True)
class FinalFile:
    path: Path
    size: int | None  # None: not on disk
    sha256: str | None  # computed from the file
    expected_sha256: str | None  # what the trainer reported


@dataclass(frozen=True)
class DatasetNow:
    report: DatasetReport | None
    problem: str | None  # why the config or its dataset could not be read


def billed_between(instance: InstanceRecord, start: float, end: float, now: float) -> float:
    """USD the instance billed between `start` and `end` (billing as InstanceRecord.cost counts it)."""
    if not instance.instance_id:
        return 0.0
    billed_until = instance.ended_at if instance.ended_at is not None else now
    overlap = min(end, billed_until) - max(start, instance.created_at)
    return max(0.0, overlap) * instance.usd_per_hour / 3600


def phase_costs(
    transitions: Sequence[Transition], instances: Sequence[InstanceRecord], now: float | None = None
) -> list[PhaseCost]:
    """Seconds and USD per phase: each state lasts until the next transition (an open job's last until now)."""
    now = time.time() if now is None else now
    seconds = dict.fromkeys(PHASES, 0.0)
    usd = dict.fromkeys(PHASES, 0.0)
    for index, current in enumerate(transitions):
        phase = PHASE_OF_STATE.get(current.to_state)
        if phase is None:
            continue
        end = transitions[index + 1].at if index + 1 < len(transitions) else now
        seconds[phase] += max(0.0, end - current.at)
        usd[phase] += sum(billed_between(instance, current.at, end, now) for instance in instances)
    return [PhaseCost(name, seconds[name], usd[name]) for name in PHASES]


def read_run_events(output_dir: Path) -> RunEvents:
    path = output_dir / EVENTS_FILE
    run = RunEvents()
    if not path.is_file():
        run.problem = f"no {EVENTS_FILE} in {output_dir}: the trainer never started, or nothing was fetched"
        return run
    try:
        events = read_events(path)
    except (OSError, UnicodeDecodeError) as exc:
        run.problem = f"{path} cannot be read: {exc}"
        return run
    steps: dict[int, StepEvent] = {}
    for event in events:
        if isinstance(event, StartEvent):
            run.start = event
        elif isinstance(event, StepEvent):
            steps[event.step] = event
        elif isinstance(event, SampleEvent):
            run.samples.append(event)
        elif isinstance(event, DoneEvent):
            run.done = event
        elif isinstance(event, ErrorEvent):
            run.errors.append(event)
    run.steps = [steps[step] for step in sorted(steps)]
    return run


def local_sample(job: JobRecord, sample: SampleEvent) -> Path:
    """Where the fetch put a sample grid the trainer wrote on the instance."""
    return Path(job.output_dir) / "samples" / Path(sample.path).name


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def final_file(job: JobRecord, done: DoneEvent | None) -> FinalFile | None:
    """The LoRA file home, measured now; None when the job recorded no result."""
    if not job.result_path:
        return None
    path = Path(job.result_path)
    expected = done.sha256 if done is not None else job.result_sha256
    if not path.is_file():
        return FinalFile(path, None, None, expected)
    return FinalFile(path, path.stat().st_size, file_sha256(path), expected)


def estimate_of(job: JobRecord) -> JobEstimate | None:
    """The estimate the job was planned with; None when there was none (or it cannot be read)."""
    if job.estimate_json.strip() in ("", "{}"):
        return None
    try:
        return JobEstimate.model_validate_json(job.estimate_json)
    except ValidationError:
        return None


def error_pct(estimated: float | None, actual: float | None) -> float | None:
    """How far the actual is from the estimate, in % of the estimate (+: it cost or took more)."""
    if estimated is None or actual is None or estimated <= 0:
        return None
    return (actual - estimated) / estimated * 100


def estimate_check(job: JobRecord, run: JobRun | None, billed_usd: float) -> EstimateCheck:
    """The job's estimate beside what it cost (`billed_usd`: Ledger.job_cost) and, once it trained, measured. The
    cost's error only for a job that succeeded: one that failed or is still running did not do the work estimated."""
    estimate = estimate_of(job)
    bandwidth = run.bandwidth_usd if run is not None else None
    actual = billed_usd + (bandwidth or 0.0)
    estimated_usd = estimate.cost_usd if estimate is not None else None
    estimated_speed = estimate.seconds_per_step if estimate is not None else None
    measured_speed = run.seconds_per_step if run is not None else None
    return EstimateCheck(
        estimated_usd=estimated_usd,
        actual_usd=actual,
        bandwidth_usd=bandwidth,
        error_pct=error_pct(estimated_usd, actual) if job.outcome == "succeeded" else None,
        estimated_seconds_per_step=estimated_speed,
        measured_seconds_per_step=measured_speed,
        speed_error_pct=error_pct(estimated_speed, measured_speed),
    )


def job_check(ledger: Ledger, job: JobRecord) -> EstimateCheck:
    """estimate_check of a job from the ledger: its cost now and its recorded measurements, if any."""
    runs = ledger.job_runs(job.id)
    return estimate_check(job, runs[0] if runs else None, ledger.job_cost(job.id))


def dataset_now(config_path: str) -> DatasetNow:
    """The dataset the config names, inspected as it is on disk now."""
    try:
        report = inspect_dataset(load_config(config_path).train)
    except ConfigError as exc:
        more = f" (and {len(exc.issues) - 1} more)" if len(exc.issues) > 1 else ""
        return DatasetNow(None, f"{exc.path}: {exc.issues[0]}{more}" if exc.issues else str(exc))
    except (OSError, ValueError) as exc:
        return DatasetNow(None, f"{config_path}: {exc}")
    return DatasetNow(report, None)
