"""One progress display for a training run, fed by the trainer's events (local or remote alike)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from remote.events import (
    CheckpointEvent,
    DoneEvent,
    EpochEvent,
    ErrorEvent,
    Event,
    SampleEvent,
    StartEvent,
    StepEvent,
)


class RunProgress:
    """Shows step, loss, ETA and money spent; prints checkpoints, samples and the result as they land.

    `usd_per_hour` is the instance's price (0 on this machine); cost is billed time so far x price.
    """

    def __init__(self, console: Console, usd_per_hour: float = 0.0, billing_started: float | None = None):
        self.console = console
        self.usd_per_hour = usd_per_hour
        self.billing_started = billing_started if billing_started is not None else time.time()
        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[cost]}"),
            console=console,
            transient=False,
        )
        self.task: TaskID | None = None
        self.done: DoneEvent | None = None
        self.error: ErrorEvent | None = None
        self.checkpoints: list[CheckpointEvent] = []

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def cost_so_far(self) -> float:
        return self.usd_per_hour * max(0.0, time.time() - self.billing_started) / 3600

    def _cost_text(self) -> str:
        return f"${self.cost_so_far():.3f}" if self.usd_per_hour else ""

    def handle(self, event: Event) -> None:
        if isinstance(event, StartEvent):
            resumed = f", resumed after step {event.resumed_from_step}" if event.resumed_from_step else ""
            self.console.print(
                f"Training {event.model_family} LoRA on {escape(event.device)} ({event.dtype}): "
                f"{event.total_steps} steps, {event.epochs} epochs{resumed}",
                highlight=False,
            )
            for choice in event.choices:
                self.console.print(f"  {escape(choice)}", highlight=False)
            self.task = self.progress.add_task(
                "train",
                total=event.total_steps,
                completed=event.resumed_from_step,
                loss="-",
                speed="",
                cost=self._cost_text(),
            )
        elif isinstance(event, StepEvent):
            if self.task is None:
                self.task = self.progress.add_task("train", total=event.total_steps, loss="-", speed="", cost="")
            self.progress.update(
                self.task,
                completed=event.step,
                total=event.total_steps,
                loss=f"{event.loss:.4f}",
                speed=f"{event.seconds_per_step:.2f}s/step",
                cost=self._cost_text(),
            )
        elif isinstance(event, EpochEvent):
            self.console.print(f"epoch {event.epoch} done, mean loss {event.mean_loss:.4f}", highlight=False)
        elif isinstance(event, CheckpointEvent):
            self.checkpoints.append(event)
            self.console.print(f"checkpoint {escape(Path(event.path).name)} (epoch {event.epoch}, step {event.step})")
        elif isinstance(event, SampleEvent):
            self.console.print(f"sample grid {escape(event.path)}")
        elif isinstance(event, DoneEvent):
            self.done = event
            self.console.print(
                f"[bold green]done[/] {escape(event.path)} in {event.wall_seconds:.0f} s (sha256 {event.sha256[:12]}…)"
            )
        elif isinstance(event, ErrorEvent):
            self.error = event
            self.console.print(f"[bold red]training failed ({event.kind})[/]: {escape(event.message)}")


def plain_printer(console: Console) -> Callable[[str], None]:
    """Print a message as plain text: it may carry paths, provider errors or a host's words, never markup."""

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False)

    return say
