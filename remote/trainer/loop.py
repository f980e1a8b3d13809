"""The training run, top to bottom: build it (run_setup.py), loop over epochs and their steps (step.py),
write checkpoints and samples between steps, save the final LoRA.

A step is launched (queued on the GPU) and finished (its loss read, its event written) separately: on the fast
path (speed.py) the next step is launched before the one before it is finished, unless host work must see
the weights in between. Each epoch's batch order comes from seed + epoch (as kohya), each step's draws
from its position, so a resumed run trains exactly what the uninterrupted run trained.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from remote.config import TrainConfig
from remote.events import DoneEvent, EpochEvent, EventWriter, StartEvent, StepEvent

from . import data as data_mod
from .checkpoints import save_checkpoint, save_final, save_run_state, save_samples
from .distributed import any_rank, barrier, init_ranks, sum_across
from .resume import resume_folder, resume_run
from .run_setup import OutputExistsError, Run, final_path, prepare_caches, setup
from .state import state_dir_name
from .step import LaunchedStep, train_step

__all__ = ["OutputExistsError", "Stopped", "train"]


class Stopped(Exception):
    """The run was asked to stop (SIGTERM/SIGINT); a resumable state was saved in ``state_dir``."""

    def __init__(self, message: str, state_dir: Path | None = None):
        super().__init__(message)
        self.state_dir = state_dir


def train(
    cfg: TrainConfig, writer: EventWriter, resume: Path | str | None = None, stop_after_step: int | None = None
) -> Path:
    """Run the whole training; returns the final LoRA path. ``stop_after_step`` is for tests."""
    wall_start = time.time()
    folder = resume_folder(resume, cfg.output_dir)
    started = time.perf_counter()
    ranks = init_ranks()
    if not ranks.main:  # one writer: the other ranks' events would repeat rank 0's
        writer = EventWriter(None, stream=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    run = setup(cfg, writer, folder, ranks)
    timings = {"setup": time.perf_counter() - started, **run.timings, **prepare_caches(run)}
    epoch_order = resume_run(run, folder) if folder is not None else None
    with stop_signals(run):  # before the start event: a client may stop us on it
        emit_start(run, {key: round(value, 3) for key, value in timings.items()})
        train_epochs(run, epoch_order, stop_after_step)
    return finish(run, wall_start)


def train_epochs(run: Run, epoch_order: list[list[int]] | None, stop_after_step: int | None) -> None:
    """Every step left, epoch by epoch; checkpoints and samples where they are due."""
    pos, plan, cfg = run.position, run.dataset.plan, run.cfg
    while pos.step < plan.total_steps and pos.epoch < plan.epochs:
        epoch = pos.epoch
        order = epoch_order or data_mod.epoch_batches(run.dataset, cfg.batch_size, run.seed, epoch)
        epoch_order = None
        epoch_losses: list[float] = []
        deferred: LaunchedStep | None = None  # launched, its event not yet emitted
        while pos.epoch == epoch and pos.step < plan.total_steps:
            group = order[pos.batch : pos.batch + cfg.gradient_accumulation_steps * run.ranks.world]
            try:
                launched = train_step(run, group, epoch, pos.batch)
            except BaseException:
                if deferred is not None:  # its work is done: report it before the error
                    with suppress(Exception):
                        finish_step(run, deferred, epoch_losses)
                raise
            pos.batch += len(group)
            pos.step += 1
            if pos.batch >= len(order):  # the epoch's last step: the position moves to the next epoch
                pos.epoch, pos.batch = epoch + 1, 0
            if deferred is not None:  # the step before, finished while this one runs
                finish_step(run, deferred, epoch_losses)
                deferred = None
            stop = any_rank(run.stop_requested, run.ranks)
            if run.speed.overlap and not host_work_due(run, epoch, stop, stop_after_step):
                deferred = launched
                continue
            finish_step(run, launched, epoch_losses)
            order_in_progress = order if pos.epoch == epoch else None
            after_step(run, epoch, order_in_progress)
            if pos.epoch != epoch:
                end_of_epoch(run, epoch + 1, epoch_losses)
            stop = any_rank(run.stop_requested, run.ranks)  # also a signal during the checkpoint or samples
            if stop or (stop_after_step is not None and pos.step >= stop_after_step):
                stop_with_state(run, order_in_progress)


def finish_step(run: Run, launched: LaunchedStep, losses: list[float]) -> None:
    """Wait for a launched step, record its mean loss (over the group's batches, all processes) in the run's
    and the epoch's ``losses``, and emit its step event."""
    loss_sum, seconds = launched.wait()
    total, count = sum_across([loss_sum, float(launched.batches)], run.ranks)
    loss = total / max(1.0, count)
    run.losses.append(loss)
    losses.append(loss)
    emit_step(run, launched, loss, seconds)
    run.divergence.observe(launched.step, loss)


def host_work_due(run: Run, epoch: int, stop: bool, stop_after_step: int | None) -> bool:
    """Whether the step just launched must finish before the next one starts: its event is followed by work
    that reads the weights as they are after it (a checkpoint, samples, an epoch's end, a stop, the final
    file), or it is a multi-process step (their collectives keep the ranks in step)."""
    pos, cfg = run.position, run.cfg
    return (
        run.ranks.distributed
        or stop
        or (stop_after_step is not None and pos.step >= stop_after_step)
        or pos.step >= pos.total_steps
        or pos.epoch != epoch
        or _every(cfg.save_every_n_steps, pos.step)
        or _every(cfg.sample_every_n_steps, pos.step)
    )


def after_step(run: Run, epoch: int, order_in_progress: list[list[int]] | None) -> None:
    """Step checkpoints and samples (never after the last step: the final file and grid follow)."""
    step, cfg = run.position.step, run.cfg
    if step >= run.position.total_steps:
        return
    if _every(cfg.save_every_n_steps, step):
        save_checkpoint(run, epoch + 1, step, by_epoch=False, epoch_order=order_in_progress)
    if _every(cfg.sample_every_n_steps, step):
        save_samples(run, f"{run.name}-step{step:08d}", epoch + 1, step)


def end_of_epoch(run: Run, done_epochs: int, losses: list[float]) -> None:
    """The epoch event, then epoch checkpoints and samples (kohya: not after the last epoch)."""
    step, cfg = run.position.step, run.cfg
    run.writer.emit(EpochEvent(epoch=done_epochs, step=step, mean_loss=sum(losses) / max(1, len(losses))))
    if done_epochs >= run.dataset.plan.epochs or step >= run.position.total_steps:
        return
    if _every(cfg.save_every_n_epochs, done_epochs):
        save_checkpoint(run, done_epochs, step, by_epoch=True, epoch_order=None)
    if _every(cfg.sample_every_n_epochs, done_epochs):
        save_samples(run, f"{run.name}-{done_epochs:06d}", done_epochs, step)


def stop_with_state(run: Run, order_in_progress: list[list[int]] | None) -> None:
    """Save a resumable state at the step reached and raise ``Stopped`` (``Diverged`` instead when the weights
    are no longer finite: a resume of them would only rent a machine to stop again)."""
    run.divergence.before_saving(run.position.step)
    name = state_dir_name(run.name, step=run.position.step)
    if run.ranks.main:
        save_run_state(run, name, order_in_progress)
    barrier(run.ranks)  # no rank leaves (and gets the others killed) before the state is written
    folder = run.output_dir / name
    raise Stopped(f"stopped after step {run.position.step}; resume with --resume {folder}", folder)


def finish(run: Run, wall_start: float) -> Path:
    """The final LoRA, its state and sample grid, and the done event (rank 0; the others wait for it)."""
    pos, plan = run.position, run.dataset.plan
    final = final_path(run.cfg)
    last_epoch = min(plan.epochs, max(1, math.ceil(pos.step / max(1, plan.steps_per_epoch))))
    run.info["finished_at"] = time.time()
    run.divergence.before_saving(pos.step)  # every process: they hold the same weights and stop together
    if not run.ranks.main:
        barrier(run.ranks)  # no rank leaves before rank 0 has written the final file (see distributed.leave)
        return final
    digest, state = save_final(run, final, last_epoch)
    save_samples(run, run.name, last_epoch, pos.step, final=True)
    run.writer.emit(
        DoneEvent(
            path=str(final),
            sha256=digest,
            step=pos.step,
            epoch=last_epoch,
            wall_seconds=time.time() - wall_start,
            final_loss=run.losses[-1] if run.losses else None,
            state_dir=str(state),
        )
    )
    barrier(run.ranks)
    return final


# ---------------------------------------------------------------------------------------------------
# Events and signals


def emit_start(run: Run, timings: dict[str, float]) -> None:
    plan, cfg = run.dataset.plan, run.cfg
    device_name = str(run.device)
    if run.device.type == "cuda":
        device_name += f" ({torch.cuda.get_device_name(run.device)})"
    run.writer.emit(
        StartEvent(
            total_steps=plan.total_steps,
            epochs=plan.epochs,
            steps_per_epoch=plan.steps_per_epoch,
            samples_per_epoch=plan.samples_per_epoch,
            batch_size=cfg.batch_size,
            model_family=run.family.name,
            model=cfg.pretrained_model_name_or_path,
            device=device_name,
            dtype=str(run.dtype).removeprefix("torch."),
            resumed_from_step=run.position.step,
            trainable_parameters=sum(p.numel() for p in run.network.parameters()),
            output_dir=str(run.output_dir),
            warnings=run.bundle.warnings + run.info.get("warnings", []),
            choices=run.choices,
            setup_seconds=timings,
            setup_gpu_memory_gb=None if run.setup_peak_gib is None else round(run.setup_peak_gib, 3),
        )
    )


def emit_step(run: Run, launched: LaunchedStep, loss: float, seconds: float) -> None:
    memory = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None
    lrs = launched.lrs
    run.writer.emit(
        StepEvent(
            step=launched.step,
            total_steps=run.position.total_steps,
            epoch=launched.epoch + 1,
            loss=loss,
            lr=lrs.get("unet", lrs.get("text_encoder", 0.0)),
            lr_text_encoder=lrs.get("text_encoder"),
            seconds_per_step=seconds,
            samples_per_second=launched.images / seconds if seconds > 0 else 0.0,
            gpu_memory_gb=memory,
        )
    )


@contextmanager
def stop_signals(run: Run) -> Iterator[None]:
    """SIGTERM/SIGINT finish the current step, save a state and stop (a spot instance being reclaimed); a
    second signal interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        if run.stop_requested:
            raise KeyboardInterrupt
        run.stop_requested = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _every(n: int | None, value: int) -> bool:
    return n is not None and n != 0 and value % n == 0
