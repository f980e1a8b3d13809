"""What a run writes besides events: checkpoints (a LoRA file and a resumable state), sample grids, and the
final file."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from remote.events import CheckpointEvent, SampleEvent

from .lora import build_metadata, save_kohya
from .samples import sample_grid
from .state import save_state, state_dir_name

if TYPE_CHECKING:
    from .run_setup import Run


def save_checkpoint(run: Run, epoch: int, step: int, by_epoch: bool, epoch_order: list | None) -> None:
    run.divergence.before_saving(step)  # every process: they hold the same weights and stop together
    if not run.ranks.main:
        return
    name = run.cfg.output_name or "epoch"  # kohya: epoch-000001.safetensors ... last.safetensors
    stem = f"{name}-{epoch:06d}" if by_epoch else f"{name}-step{step:08d}"
    path = run.output_dir / f"{stem}.safetensors"
    metadata = build_metadata(run.cfg, run.bundle.family, {**run.info, "epoch": epoch, "step": step})
    digest = save_kohya(run.network, path, metadata, run.cfg.save_precision)
    folder = save_run_state(run, state_dir_name(name, step=step, epoch=epoch if by_epoch else None), epoch_order)
    run.writer.emit(CheckpointEvent(path=str(path), sha256=digest, epoch=epoch, step=step, state_dir=str(folder)))
    if by_epoch and run.cfg.save_last_n_epochs and run.cfg.save_every_n_epochs:
        old = epoch - run.cfg.save_every_n_epochs * run.cfg.save_last_n_epochs
        if old > 0:
            (run.output_dir / f"{name}-{old:06d}.safetensors").unlink(missing_ok=True)
            shutil.rmtree(run.output_dir / state_dir_name(name, epoch=old), ignore_errors=True)


def save_run_state(run: Run, folder_name: str, epoch_order: list | None) -> Path:
    """The resumable state (LoRA, optimizer, schedule, position, losses) in ``output_dir/folder_name``."""
    folder = run.output_dir / folder_name
    return save_state(
        folder, run.position, run.network, run.optimizer, run.scheduler, run.scaler, epoch_order, run.losses
    )


def save_final(run: Run, path: Path, epoch: int) -> tuple[str, Path]:
    """The final LoRA and the state of its weights (a run with more epochs, `rentrain continue`, goes on from
    it): (the file's sha256, the state folder)."""
    step = run.position.step
    metadata = build_metadata(run.cfg, run.bundle.family, {**run.info, "epoch": epoch, "step": step})
    digest = save_kohya(run.network, path, metadata, run.cfg.save_precision)
    return digest, save_run_state(run, state_dir_name(run.name, step=step), None)


def save_samples(run: Run, label: str, epoch: int, step: int, final: bool = False) -> None:
    if not run.cfg.sample_prompts or not run.ranks.main:
        return
    run.divergence.before_saving(step)  # no grid drawn from weights that are no longer numbers
    path = run.output_dir / "samples" / f"{label}.png"
    written = sample_grid(run, path, f"{label}  epoch {epoch}  step {step}")
    if written is not None:
        run.writer.emit(SampleEvent(path=str(written), epoch=epoch, step=step, final=final))
