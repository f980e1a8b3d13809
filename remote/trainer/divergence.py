"""Stopping a run whose training has diverged, instead of paying for the rest of it.

A step's loss that is not a finite number (NaN or infinity) alone is not the end: under fp16 a forward pass
that overflows is skipped by the loss scaler, and the next step goes on. The run has diverged when the LoRA's
own weights are no longer finite (nothing trains them back), or when the loss stays non-finite for
NON_FINITE_LOSS_LIMIT steps in a row while the weights are finite (the frozen model overflows on every batch).
The weights are read when a loss is not finite, and before every LoRA file, resumable state or sample grid is
written: an update can overflow them while the loss it followed was finite, and such a file would be useless.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

NON_FINITE_LOSS_LIMIT = 10


def advice_for(optimizer_type: str, fp16: bool) -> str:
    """What to change, for the run's optimizer and precision."""
    rate = "its d_coef (Prodigy sets its own step size)" if optimizer_type.lower() == "prodigy" else "the learning rate"
    precision = ', or train in bf16 (mixed_precision = "bf16"), whose range fp16 lacks' if fp16 else ""
    return f"Lower {rate}{precision}; the checkpoints saved before it are good"


class Diverged(Exception):
    """The training diverged: the message says at which step, how, and what to change."""


def weights_are_finite(parameters: Iterable[torch.Tensor]) -> bool:
    """Whether every trained weight is a finite number (one device-to-host read for them all)."""
    flags = [p.detach().isfinite().all() for p in parameters]
    return bool(torch.stack(flags).all().item()) if flags else True


@dataclass
class DivergenceWatch:
    """Fed each optimizer step's loss in order; raises Diverged when the run cannot recover."""

    weights_finite: Callable[[], bool]
    advice: str = advice_for("AdamW", fp16=False)
    limit: int = NON_FINITE_LOSS_LIMIT
    first_bad_step: int | None = None
    bad_steps: int = 0

    def before_saving(self, step: int) -> None:
        """Raises Diverged, and nothing is written, when the weights to be saved are not all finite."""
        if not self.weights_finite():
            raise Diverged(
                f"training diverged by step {step}: the LoRA's weights are no longer finite numbers, so step "
                f"{step}'s file was not written. {self.advice}"
            )

    def observe(self, step: int, loss: float) -> None:
        if math.isfinite(loss):
            self.first_bad_step, self.bad_steps = None, 0
            return
        if self.first_bad_step is None:
            self.first_bad_step = step
        self.bad_steps += 1
        if not self.weights_finite():
            raise Diverged(
                f"training diverged at step {step}: the loss is {loss} and the LoRA's weights are no longer finite "
                f"numbers, so no later step can recover. {self.advice}"
            )
        if self.bad_steps >= self.limit:
            raise Diverged(
                f"training diverged: the loss has been {loss} for {self.bad_steps} steps in a row (steps "
                f"{self.first_bad_step}-{step}) while the LoRA's weights stay finite: the model overflows on every "
                f"batch. {self.advice}"
            )
