"""Going on from a saved state: the position, losses and optimizer state it holds, and a new plan where the
run it continues differs (another number of processes, more epochs)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .optim import make_scheduler, place_learning_rates
from .state import Position, ResumeError, find_latest_state, load_state

if TYPE_CHECKING:
    from .run_setup import Run


def resume_folder(resume: Path | str | None, output_dir: Path | str) -> Path | None:
    """The state folder to resume from: ``resume`` itself, or with "last" the newest in ``output_dir``."""
    if resume == "last":
        found = find_latest_state(Path(output_dir))
        if found is None:
            raise ResumeError(f"--resume last: no *-state folder in {output_dir}")
        return found
    return Path(resume) if resume is not None else None


def resume_run(run: Run, folder: Path) -> list[list[int]] | None:
    """Load the state into the run; returns the batch order of the epoch it stopped in (None at an epoch's
    end)."""
    saved = load_state(folder, run.position, run.network, run.optimizer, run.scheduler, run.scaler)
    run.position = Position(**saved["position"])
    run.position.optimizer_type = run.position.optimizer_type or run.cfg.optimizer_type  # states before it was kept
    run.losses = list(saved.get("losses", []))
    place_learning_rates(run.optimizer, run.device)
    longer = run.position.total_steps != run.dataset.plan.total_steps  # a finished run's state (load_state)
    if saved["position"].get("processes", 1) != run.ranks.world or longer:
        replan_after_resume(run)
    return saved["epoch_order"]


def replan_after_resume(run: Run) -> None:
    """A state saved with another number of processes, or a finished run's state that a longer run continues:
    the batches left run at this run's rate. A run measured in steps gets this config's step count; a run
    measured in epochs gets the steps that finish them. The learning-rate schedule is laid over the new total
    from the step reached."""
    pos, plan, cfg = run.position, run.dataset.plan, run.cfg
    per_step = cfg.gradient_accumulation_steps * run.ranks.world
    if cfg.max_train_epochs is not None or cfg.max_train_steps is None:
        left_this_epoch = math.ceil((plan.batches_per_epoch - pos.batch) / per_step)
        plan.total_steps = pos.step + left_this_epoch + (plan.epochs - pos.epoch - 1) * plan.steps_per_epoch
    pos.total_steps = plan.total_steps
    state = run.scheduler.state_dict()
    run.scheduler = make_scheduler(
        run.optimizer,
        cfg.lr_scheduler,
        cfg.warmup_steps_for(pos.total_steps),
        pos.total_steps,
        cfg.lr_scheduler_num_cycles,
        cfg.lr_scheduler_power,
    )
    run.scheduler.last_epoch = state["last_epoch"] - 1
    with warnings.catch_warnings():  # "step before the optimizer's": this step only sets the step reached's rate
        warnings.simplefilter("ignore", UserWarning)
        run.scheduler.step()
    pos.processes = run.ranks.world
    pos.steps_per_epoch = plan.steps_per_epoch
