"""The trainer's progress protocol: one JSON object per line on stdout and in <output_dir>/events.jsonl.

Standard library + pydantic only: the laptop CLI imports this module to read a remote run's events.

Every event has ``event`` (its kind) and ``time`` (Unix seconds). Kinds, in the order a run emits them:

- ``start``: total steps and epochs, model family, device, dtype, and whether the run resumed.
- ``step``: one per optimizer step (loss, learning rate, speed, GPU memory).
- ``epoch``: at the end of each epoch (mean loss of the epoch).
- ``checkpoint``: a LoRA file was written (path, sha256, epoch, step, resumable state folder).
- ``sample``: a sample grid PNG was written.
- ``done``: the final LoRA file (path, sha256) and the run's wall time.
- ``error``: the run failed; ``kind`` says how (config, model, data, out_of_memory, diverged, interrupted,
  internal).

Use :func:`parse_event` to turn a line back into the right model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal, TextIO

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

ModelFamily = Literal["sd15", "sd2", "sdxl", "flux"]
ErrorKind = Literal["config", "model", "data", "out_of_memory", "diverged", "interrupted", "internal"]


class _Event(BaseModel):
    # a loss that is NaN or infinite is written as the JSON string "NaN" / "Infinity", and read back as that
    # float (pydantic's default writes null, which a float field then refuses: the event would be lost)
    model_config = ConfigDict(extra="ignore", ser_json_inf_nan="strings")

    time: float = Field(default_factory=time.time, description="Unix time the event was written.")


class StartEvent(_Event):
    event: Literal["start"] = "start"
    total_steps: int = Field(description="Optimizer steps the whole run makes.")
    epochs: int
    steps_per_epoch: int
    samples_per_epoch: int = Field(description="Images x repeats per epoch (reg images included).")
    batch_size: int
    model_family: ModelFamily
    model: str = Field(description="The base model reference as configured.")
    device: str = Field(description="cuda:0, cpu, ... and the GPU name when there is one.")
    dtype: str = Field(description="Compute dtype of the frozen model: float32, float16 or bfloat16.")
    resumed_from_step: int = Field(0, description="0 for a fresh run, else the step the run resumed after.")
    trainable_parameters: int = 0
    output_dir: str = ""
    warnings: list[str] = Field(
        default_factory=list, description="Things the user should know, e.g. a model/config mismatch."
    )
    choices: list[str] = Field(
        default_factory=list, description="What the trainer chose for speed and memory, and why."
    )
    setup_seconds: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Seconds of set-up: setup (everything before caching), imports (diffusers' and transformers' model "
            "code, part of setup), load_weights (reading the model, part of setup), cache_latents, cache_text; "
            "latents_encoded is the number of images encoded."
        ),
    )
    setup_gpu_memory_gb: float | None = Field(
        None, description="Peak allocated GPU memory while loading and filling the caches; None on CPU."
    )


class StepEvent(_Event):
    event: Literal["step"] = "step"
    step: int = Field(description="Optimizer steps done so far (1-based).")
    total_steps: int
    epoch: int = Field(description="1-based epoch this step belongs to.")
    loss: float = Field(description="Mean loss of this optimizer step over its accumulated batches (may be NaN).")
    lr: float = Field(description="UNet learning rate after the step (text encoder LR when the UNet is not trained).")
    lr_text_encoder: float | None = None
    seconds_per_step: float
    samples_per_second: float
    gpu_memory_gb: float | None = Field(None, description="Peak allocated GPU memory so far; None on CPU.")


class EpochEvent(_Event):
    event: Literal["epoch"] = "epoch"
    epoch: int
    step: int
    mean_loss: float


class CheckpointEvent(_Event):
    event: Literal["checkpoint"] = "checkpoint"
    path: str
    sha256: str
    epoch: int
    step: int
    state_dir: str | None = Field(None, description="Folder with the resumable training state (--resume it).")


class SampleEvent(_Event):
    event: Literal["sample"] = "sample"
    path: str
    epoch: int
    step: int
    final: bool = False


class DoneEvent(_Event):
    event: Literal["done"] = "done"
    path: str
    sha256: str
    step: int
    epoch: int
    wall_seconds: float
    final_loss: float | None = None
    state_dir: str | None = Field(None, description="The final weights' resumable state (a longer run continues it).")


class ErrorEvent(_Event):
    event: Literal["error"] = "error"
    kind: ErrorKind
    message: str
    state_dir: str | None = Field(None, description="kind=interrupted: the state saved on the way out (--resume it).")


Event = Annotated[
    StartEvent | StepEvent | EpochEvent | CheckpointEvent | SampleEvent | DoneEvent | ErrorEvent,
    Field(discriminator="event"),
]
_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)

EVENTS_FILE = "events.jsonl"


def parse_event(line: str | bytes | dict) -> Event:
    """One line of the protocol (or its decoded dict) -> the matching event model. Raises ValueError."""
    if isinstance(line, dict):
        return _ADAPTER.validate_python(line)
    return _ADAPTER.validate_json(line)


def read_events(path: str | Path) -> list[Event]:
    """Every event of an events.jsonl file; a torn last line (a run killed mid-write) is skipped."""
    events: list[Event] = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        raw = raw.strip()
        if not raw:
            continue
        try:
            events.append(parse_event(raw))
        except ValueError:
            continue
    return events


class EventWriter:
    """Writes each event as one JSON line to stdout (or ``stream``) and appends it to ``events.jsonl``."""

    def __init__(self, log_path: str | Path | None, stream: TextIO | None = None):
        self.log_path = Path(log_path) if log_path is not None else None
        self.stream = stream

    def emit(self, event: _Event) -> None:
        line = event.model_dump_json()
        stream = self.stream
        if stream is None:
            import sys

            stream = sys.stdout
        stream.write(line + "\n")
        stream.flush()
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
