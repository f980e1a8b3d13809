"""A ledger and output folders as real runs leave them: transitions at known times, an instance at a known
price, the trainer's events.jsonl, sample grid PNGs and a final LoRA file."""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from remote.events import (
    CheckpointEvent,
    DoneEvent,
    ErrorEvent,
    Event,
    EventWriter,
    SampleEvent,
    StartEvent,
    StepEvent,
)
from rentrain import ledger as ledger_module
from rentrain.costs import JobEstimate
from rentrain.ledger import InstanceRecord, JobRecord, JobState, Ledger, QueueRecord
from tests.foundation.helpers import TUTORIAL_CONFIG, make_dataset, write_config

T0 = 1_800_000_000.0
USD_PER_HOUR = 3.6  # $0.001 a second: a phase's dollars are its billed seconds / 1000
STEPS = 20
# (state, seconds after T0) of a job that ran once, on one instance created at T0 + 10 and ended at T0 + 2060
RUN_MOVES: list[tuple[JobState, float]] = [
    ("intent_recorded", 10),
    ("syncing", 70),  # provision: 60 s
    ("watchdog", 100),
    ("bootstrapping", 130),
    ("training", 190),  # setup: 120 s
    ("following", 200),
    ("fetching", 1990),  # training: 1800 s
    ("destroying", 2050),  # fetch: 60 s
]
CLOSED_AT = 2080.0  # teardown: 30 s, of which 10 s billed
INSTANCE_CREATED, INSTANCE_ENDED = 10.0, 2060.0
ESTIMATE = JobEstimate(
    steps=STEPS,
    seconds_per_step=90.0,
    speed_kind="measured",
    speed_source="a test",
    train_hours=0.5,
    overhead_hours=0.1,
    total_hours=0.6,
    price_per_hour=USD_PER_HOUR,
    cost_usd=2.16,
)
# Each grid block's colour: the browser test finds them in its screenshot.
GRID_COLOURS = [(200, 30, 90), (30, 160, 70), (40, 60, 210), (240, 180, 20)]


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def grid_png(path: Path, shade: int = 0, size: tuple[int, int] = (320, 160)) -> bytes:
    """A small 'sample grid': four columns of distinct colours, as a PNG; returns its bytes."""
    image = Image.new("RGB", size, "white")
    width = size[0] // len(GRID_COLOURS)
    for column, (r, g, b) in enumerate(GRID_COLOURS):
        image.paste((r, g, (b + shade) % 256), (column * width, 20, (column + 1) * width - 4, size[1]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


@dataclass
class RunFiles:
    output_dir: Path
    grids: list[bytes]  # the PNG bytes of each sample, in event order
    lora: Path | None
    lora_sha256: str | None


def _emit(output_dir: Path, events: list[Event]) -> None:
    writer = EventWriter(output_dir / "events.jsonl", stream=io.StringIO())
    for event in events:
        writer.emit(event)


def write_run_output(
    output_dir: Path, sample_names: list[str], finished: bool = True, error: str = "", nan_from: int | None = None
) -> RunFiles:
    """events.jsonl, the samples fetched home and (finished) the final LoRA, as the trainer and fetch leave them.
    ``nan_from``: the loss is NaN from this step on (a training that diverged)."""
    remote = "/workspace/rentrain/job/output"
    events: list[Event] = [
        StartEvent(
            total_steps=STEPS,
            epochs=2,
            steps_per_epoch=STEPS // 2,
            samples_per_epoch=20,
            batch_size=2,
            model_family="sd15",
            model="runwayml/stable-diffusion-v1-5",
            device="cuda:0 (NVIDIA H100 80GB HBM3)",
            dtype="bfloat16",
        )
    ]
    grids = []
    for step in range(1, STEPS + 1):
        events.append(
            StepEvent(
                step=step,
                total_steps=STEPS,
                epoch=1 + (step - 1) // 10,
                loss=math.nan if nan_from is not None and step >= nan_from else 0.2 - step * 0.005,
                lr=1e-4 * step / STEPS,
                seconds_per_step=0.5,
                samples_per_second=4.0,
            )
        )
        if step % 10 == 0:
            index = step // 10 - 1
            events.append(
                CheckpointEvent(path=f"{remote}/lora-{step}.safetensors", sha256="0" * 64, epoch=index + 1, step=step)
            )
            if index < len(sample_names):
                grids.append(grid_png(output_dir / "samples" / sample_names[index], shade=index * 5))
                events.append(
                    SampleEvent(
                        path=f"{remote}/samples/{sample_names[index]}", epoch=index + 1, step=step, final=step == STEPS
                    )
                )
    lora, digest = None, None
    if finished:
        lora = output_dir / "my_lora.safetensors"
        lora.write_bytes(b"LoRA weights " * 1000)
        digest = hashlib.sha256(lora.read_bytes()).hexdigest()
        events.append(
            DoneEvent(path=f"{remote}/my_lora.safetensors", sha256=digest, step=STEPS, epoch=2, wall_seconds=1800.0)
        )
    if error:
        events.append(ErrorEvent(kind="internal", message=error))
    _emit(output_dir, events)
    return RunFiles(output_dir, grids, lora, digest)


def job_record(job_id: str, config_path: Path, output_dir: Path, created_at: float = T0) -> JobRecord:
    return JobRecord(
        id=job_id,
        created_at=created_at,
        config_path=str(config_path),
        provider="vast",
        label=f"rentrain-{job_id}",
        state="planned",
        output_dir=str(output_dir),
        estimate_json=ESTIMATE.model_dump_json(),
    )


def run_job(ledger: Ledger, job: JobRecord, start: float = T0, **closing: object) -> None:
    """Move a created job through RUN_MOVES (at `start` + seconds) on one instance, and close it."""
    clock = Clock(start)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ledger_module.time, "time", clock)
        for state, seconds in RUN_MOVES:
            clock.now = start + seconds
            ledger.transition(job.id, state)
            if state == "intent_recorded":
                ledger.add_instance(
                    InstanceRecord(
                        job_id=job.id,
                        provider="vast",
                        instance_id="i-1",
                        offer_id="7001",
                        gpu="H100 SXM",
                        usd_per_hour=USD_PER_HOUR,
                        created_at=start + INSTANCE_CREATED,
                    )
                )
        ledger.update_instance(job.id, "7001", start + INSTANCE_CREATED, ended_at=start + INSTANCE_ENDED)
        ledger.record_key_removed(job.id)
        clock.now = start + CLOSED_AT
        ledger.transition(job.id, "closed", **closing)


def skip_job(ledger: Ledger, job_id: str, reason: str, at: float) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ledger_module.time, "time", Clock(at))
        ledger.transition(job_id, "closed", outcome="skipped", error=reason)


def dataset_config(folder: Path, images: int = 3) -> Path:
    """A config whose dataset has `images` captioned images."""
    make_dataset(folder / "dataset", [(512, 512)] * images)
    return write_config(folder, TUTORIAL_CONFIG)


def new_job(tmp_path: Path, job_id: str) -> JobRecord:
    """A planned job with its config and dataset on disk."""
    return job_record(job_id, dataset_config(tmp_path / "configs" / job_id), tmp_path / "outputs" / job_id)


def finish_succeeded(ledger: Ledger, job: JobRecord, start: float = T0) -> RunFiles:
    """Run a created job to success: its events, two sample grids and the LoRA file at home."""
    files = write_run_output(Path(job.output_dir), ["sample-e1-s10.png", "sample-e2-s20.png"])
    run_job(ledger, job, start, outcome="succeeded", result_path=str(files.lora), result_sha256=files.lora_sha256)
    return files


def succeeded_job(ledger: Ledger, tmp_path: Path, job_id: str = "job-a1") -> RunFiles:
    job = new_job(tmp_path, job_id)
    ledger.create_job(job)
    return finish_succeeded(ledger, job)


def queue_of(ledger: Ledger, tmp_path: Path, jobs: list[JobRecord], max_cost: float | None = 5.0) -> QueueRecord:
    queue = QueueRecord(
        id="q-night1",
        created_at=T0,
        provider="vast",
        max_cost=max_cost,
        deadline=T0 + 8 * 3600,
        report_path=str(tmp_path / "outputs" / "queue-night1" / "report.html"),
    )
    ledger.create_queue(queue, jobs)
    return queue


@dataclass
class NightQueue:
    queue: QueueRecord
    first: RunFiles  # succeeded
    second: RunFiles  # failed after its first checkpoint


HOSTILE_ERROR = "trainer died: <script>alert('x')</script>"


def night_queue(ledger: Ledger, tmp_path: Path) -> NightQueue:
    """Three jobs under one budget: the first succeeds, the second fails, the third is skipped for the budget."""
    jobs = [new_job(tmp_path, f"job-q{n}") for n in (1, 2, 3)]
    queue = queue_of(ledger, tmp_path, jobs)
    first = finish_succeeded(ledger, jobs[0], T0)
    second = write_run_output(Path(jobs[1].output_dir), ["sample-e1-s10.png"], finished=False, error=HOSTILE_ERROR)
    run_job(ledger, jobs[1], T0 + 3000, outcome="failed", error=HOSTILE_ERROR)
    skip_job(ledger, jobs[2].id, "skipped: budget ($5.00) would be crossed", T0 + 6000)
    return NightQueue(queue, first, second)
