"""fp16 loss scaling with every decision on the device, so that a CUDA graph can hold it.

torch.amp.GradScaler reads ``found_inf`` on the host before each optimizer step (and on unscale_ for
optimizers that cannot skip a step themselves): one sync per step, which stalls the overlapped loop and
keeps the optimizer out of a graph. Here the same arithmetic runs through the same kernels
(``_amp_foreach_non_finite_check_and_unscale_``, ``_amp_update_scale_``), with the scale, the growth tracker
and ``found_inf`` in device tensors:

- ``scale(loss)``: the loss times the current scale;
- ``unscale_(grad)``: gradients divided by the scale, ``found_inf`` set if any is inf or NaN;
- ``step(optimizer)``: an optimizer that can skip a step on the device (torch's fused Adam/AdamW, or any
  with ``_step_supports_amp_scaling``) reads ``found_inf`` itself and changes nothing, its step count
  included, when it is set; any other is skipped from the host, as GradScaler does;
- ``update()``: halve the scale after an overflow, double it after ``growth_interval`` clean steps.

The defaults and the state_dict are GradScaler's (accelerate uses GradScaler's defaults for kohya), so a
state saved by either loads into the other.
"""

from __future__ import annotations

from typing import Any

import torch

INIT_SCALE = 2.0**16
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 2000


class DeviceLossScaler:
    def __init__(self, device: torch.device, init_scale: float = INIT_SCALE) -> None:
        self.growth_factor, self.backoff_factor, self.growth_interval = GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL
        self._scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self._inv_scale = torch.ones((), dtype=torch.float32, device=device)
        self._growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self._attached: set[int] = set()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale.to(loss.dtype)

    def unscale_(self, grads: list[torch.Tensor]) -> None:
        """Divide ``grads`` by the scale in place; ``found_inf`` 1 if any value is inf or NaN (reset first)."""
        self.found_inf.zero_()
        torch.reciprocal(self._scale, out=self._inv_scale)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self._inv_scale)

    def skips_on_device(self, optimizer: torch.optim.Optimizer) -> bool:
        return bool(getattr(optimizer, "_step_supports_amp_scaling", False))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's step on unscaled gradients, or nothing where they overflowed."""
        if self.skips_on_device(optimizer):
            if id(optimizer) not in self._attached:  # the optimizer reads these attributes at each step
                optimizer.found_inf = self.found_inf  # type: ignore[attr-defined]
                optimizer.grad_scale = None  # type: ignore[attr-defined]  # already unscaled
                self._attached.add(id(optimizer))
            optimizer.step()
        elif not self.found_inf.item():  # host sync: an optimizer that cannot skip on the device
            optimizer.step()

    def update(self) -> None:
        torch._amp_update_scale_(
            self._scale,
            self._growth_tracker,
            self.found_inf,
            self.growth_factor,
            self.backoff_factor,
            self.growth_interval,
        )

    def get_scale(self) -> float:
        return float(self._scale.item())

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.get_scale(),
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "_growth_tracker": int(self._growth_tracker.item()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """In place: a captured graph keeps reading the same tensors."""
        self._scale.fill_(float(state["scale"]))
        self._growth_tracker.fill_(int(state.get("_growth_tracker", 0)))
        self.growth_factor = float(state.get("growth_factor", GROWTH_FACTOR))
        self.backoff_factor = float(state.get("backoff_factor", BACKOFF_FACTOR))
        self.growth_interval = int(state.get("growth_interval", GROWTH_INTERVAL))
