"""lion-pytorch's Lion with a step that a CUDA graph can hold.

lion-pytorch's ``Lion`` hands the learning rate to its update as a Python float (``alpha=-lr``) and makes its
state at the first step, so a captured graph would replay the first step's rate for the whole schedule.
``GraphableLion`` keeps lion-pytorch's state (``exp_avg`` per parameter, zeros at the start) and its group keys
(``lr``, ``betas``, ``weight_decay``), so a state saved by either loads into the other, and does its arithmetic
(lion_pytorch.update_fn) operation for operation:

    p = p * (1 - lr * weight_decay)
    p = p - lr * sign(beta1 * exp_avg + (1 - beta1) * grad)
    exp_avg = beta2 * exp_avg + (1 - beta2) * grad

The learning rate comes from each group's ``lr`` at every step: a float64 device tensor that the scheduler fills
in place (remote/trainer/optim.py, place_learning_rates). ``1 - lr * weight_decay`` is computed in float64 and
rounded once, as Python computes it before the kernel rounds it; ``lr * sign(...)`` is exact, so the parameters
come out bit for bit as lion-pytorch's (tests/trainer/test_lion.py).

The states are laid out like the parameters: where a group's parameters and gradients tile one flat buffer each
(the trainer's LoRA, lora_fused.py), the step is a handful of kernels over the whole group; otherwise it runs
tensor by tensor. ``found_inf`` and ``grad_scale`` attributes (torch's convention, set by loss_scale.py): the
gradients are divided by ``grad_scale``, and where ``found_inf`` is nonzero the step changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .lora_fused import flat_view

LR_DTYPE = torch.float64  # lion-pytorch computes with the learning rate as a Python float


class GraphableLion(torch.optim.Optimizer):
    """lion_pytorch.Lion's state and arithmetic, with a step that a CUDA graph can hold (module doc).

    Every parameter must have a gradient at each step: the groups are stepped whole."""

    _step_supports_amp_scaling = True  # loss_scale.py hands it found_inf / grad_scale
    lr_dtype = LR_DTYPE  # place_learning_rates makes learning-rate tensors of this dtype

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        use_triton: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        # lion-pytorch's signature and checks; its Triton kernel takes the rate as a float
        if use_triton:
            raise ValueError("GraphableLion has no Triton kernel (lion-pytorch's use_triton=True does)")
        if not lr > 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not all(0.0 <= beta <= 1.0 for beta in betas):
            raise ValueError(f"Invalid betas: {tuple(betas)}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        self._init_lr = lr
        self.decoupled_wd = decoupled_weight_decay
        self._tilings: list[tuple[list[int], torch.Tensor]] = []  # per group: the parameters' starts, exp_avg
        for group in self.param_groups:
            self._tilings.append(self._lay_out(group["params"]))
        self._built = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_built", False):
            raise RuntimeError("GraphableLion's state is laid out at construction: it takes no new groups")
        super().add_param_group(param_group)

    def _lay_out(self, params: list[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
        """One zeroed exp_avg buffer for the group, each parameter's state a view of it at the parameter's place
        in the parameters' own tiling (or in their order, where they tile nothing)."""
        tiling = flat_view(params, gaps=False)
        if tiling is None:
            starts = [0]
            for p in params[:-1]:
                starts.append(starts[-1] + p.numel())
        else:
            starts = tiling[1]
        total = max(start + p.numel() for start, p in zip(starts, params, strict=True))
        buffer = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
        for p, start in zip(params, starts, strict=True):
            self.state[p]["exp_avg"] = buffer[start : start + p.numel()].view(p.shape)
        return starts, buffer

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf: torch.Tensor | None = getattr(self, "found_inf", None)
        grad_scale: torch.Tensor | None = getattr(self, "grad_scale", None)
        keep = None if found_inf is None else found_inf.reshape(()) == 0
        for group, (starts, buffer) in zip(self.param_groups, self._tilings, strict=True):
            params: list[torch.Tensor] = group["params"]
            grads = [self._gradient(p) for p in params]
            rate = group["lr"]
            lr = rate.to(LR_DTYPE) if isinstance(rate, torch.Tensor) else torch.tensor(rate, dtype=LR_DTYPE)
            lr = lr.to(params[0].device)
            decay = group["weight_decay"] / self._init_lr if self.decoupled_wd else group["weight_decay"]
            # rounded to float32 once, as a kernel rounds a Python float it is handed
            coefficients = (-lr).float(), (1 - lr * decay).float()
            beta1, beta2 = group["betas"]
            tiled_params, tiled_grads = flat_view(params, gaps=False), flat_view(grads, gaps=False)
            if (
                tiled_params is not None
                and tiled_grads is not None
                and tiled_params[1] == starts
                and tiled_grads[1] == starts
            ):
                pieces = [(tiled_params[0], tiled_grads[0], buffer)]
            else:
                pieces = [(p.detach(), g, self.state[p]["exp_avg"]) for p, g in zip(params, grads, strict=True)]
            for p, g, exp_avg in pieces:
                if grad_scale is not None:
                    g = g / grad_scale
                _update(p, g, exp_avg, coefficients, float(beta1), float(beta2), keep)
        return loss

    @staticmethod
    def _gradient(p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:
            raise ValueError(
                "GraphableLion steps every parameter at once, and a parameter of shape "
                f"{tuple(p.shape)} has no gradient"
            )
        return p.grad

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state (this class's or lion-pytorch's), then copy each exp_avg into its place in the buffers: a
        captured step keeps reading them."""
        super().load_state_dict(state_dict)
        for group, (starts, buffer) in zip(self.param_groups, self._tilings, strict=True):
            for p, start in zip(group["params"], starts, strict=True):
                place = buffer[start : start + p.numel()].view(p.shape)
                loaded = self.state[p].get("exp_avg")
                place.copy_(loaded if loaded is not None else torch.zeros_like(place))
                self.state[p]["exp_avg"] = place


def _update(
    p: torch.Tensor,
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    coefficients: tuple[torch.Tensor, torch.Tensor],
    beta1: float,
    beta2: float,
    keep: torch.Tensor | None,
) -> None:
    """lion_pytorch.update_fn in place; where ``keep`` is False, nothing changes."""
    neg_lr, decay = coefficients
    update = exp_avg.mul(beta1).add_(g, alpha=1.0 - beta1).sign_().mul_(neg_lr)  # exactly -lr, 0 or lr
    if keep is None:
        p.mul_(decay).add_(update)
        exp_avg.mul_(beta2).add_(g, alpha=1.0 - beta2)
        return
    p.copy_(torch.where(keep, p.mul(decay).add_(update), p))
    exp_avg.copy_(torch.where(keep, exp_avg.mul(beta2).add_(g, alpha=1.0 - beta2), exp_avg))
