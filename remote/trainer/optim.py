"""Optimizers and learning-rate schedules, with kohya's names and meanings."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from .adamw8bit import GraphableAdamW8bit
from .lion import GraphableLion
from .optimizer_args import parse_optimizer_args


class OptimizerError(Exception):
    """The optimizer cannot run here; the message names an alternative."""


def make_optimizer(
    name: str, param_groups: list[dict], lr: float, args: list[str], device: torch.device, graphable: bool = False
):
    """(optimizer, ss_optimizer string). ``lr`` is the default for groups without their own.

    ``graphable``: where the optimizer can be stepped inside a CUDA graph (torch AdamW, AdamW8bit as
    GraphableAdamW8bit, Lion as GraphableLion, on CUDA), make it so: capturable, learning rates in device tensors
    (see ``is_graphable``).
    """
    kwargs = parse_optimizer_args(args)
    cls = optimizer_class(name, kwargs, device, graphable)
    # every class chosen above takes lr; their common base torch.optim.Optimizer does not (it takes defaults)
    optimizer = cls(param_groups, lr=lr, **kwargs)  # type: ignore[call-arg]
    place_learning_rates(optimizer, device)
    label = f"{cls.__module__}.{cls.__name__}" + (f"({','.join(args)})" if args else "")
    return optimizer, label


def optimizer_class(
    name: str, kwargs: dict, device: torch.device, graphable: bool = False
) -> type[torch.optim.Optimizer]:
    """The class that make_optimizer builds for ``name``; sets the defaults it adds into ``kwargs``."""
    lower = name.lower()
    cls: type[torch.optim.Optimizer]
    if lower == "adamw":
        cls = torch.optim.AdamW
        if device.type == "cuda":
            kwargs.setdefault("fused", True)  # one kernel for all ~800 LoRA tensors instead of several each
            if graphable and kwargs["fused"]:
                kwargs.setdefault("capturable", True)
    elif lower in ("adamw8bit", "lion8bit"):
        if device.type != "cuda":
            raise OptimizerError(
                f"{name} (bitsandbytes) needs a CUDA GPU; on {device.type} use optimizer_type = "
                f'"{"AdamW" if lower == "adamw8bit" else "Lion"}"'
            )
        if lower == "adamw8bit" and graphable and not kwargs.get("is_paged") and kwargs.get("args") is None:
            return GraphableAdamW8bit  # bitsandbytes' states and arithmetic, its step in a CUDA graph
        try:
            # from the defining modules: bitsandbytes.optim does not re-export them for a type checker
            from bitsandbytes.optim.adamw import AdamW8bit
            from bitsandbytes.optim.lion import Lion8bit
        except Exception as exc:
            raise OptimizerError(
                f"{name} needs bitsandbytes, which cannot be imported here ({exc}); "
                'use optimizer_type = "AdamW" or install bitsandbytes'
            ) from exc
        cls = AdamW8bit if lower == "adamw8bit" else Lion8bit
    elif lower == "lion":
        if graphable and not kwargs.get("use_triton"):
            return GraphableLion  # lion-pytorch's state and arithmetic, its step in a CUDA graph
        try:
            from lion_pytorch import Lion
        except ImportError as exc:
            raise OptimizerError(
                "Lion needs the lion-pytorch package (pip install lion-pytorch); or use AdamW"
            ) from exc
        cls = Lion
    elif lower == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as exc:
            raise OptimizerError("Prodigy needs the prodigyopt package (pip install prodigyopt); or use AdamW") from exc
        cls = Prodigy
    elif lower == "adafactor":
        from transformers.optimization import Adafactor

        cls = Adafactor

        # The usual SDXL recipe (a fixed learning rate under our scheduler). kohya's bare default is relative
        # step sizes, which replace the learning rate and its scheduler: not supported, said plainly.
        if kwargs.get("relative_step") is True:
            raise OptimizerError(
                "Adafactor with relative_step=True (kohya's default when optimizer_args omit it) is not supported: "
                "rentrain trains Adafactor with a fixed learning rate and your lr_scheduler "
                "(relative_step=False, scale_parameter=False, warmup_init=False)"
            )
        kwargs.setdefault("scale_parameter", False)
        kwargs.setdefault("relative_step", False)
        kwargs.setdefault("warmup_init", False)
    else:
        raise OptimizerError(f"unknown optimizer {name!r}")
    return cls


def is_graphable(optimizer) -> bool:
    """torch AdamW, fused and capturable, GraphableAdamW8bit or GraphableLion: its step reads everything, the
    learning rates included, from device tensors, so a CUDA graph of it replays correctly as the schedule
    changes the rates."""
    if isinstance(optimizer, GraphableAdamW8bit | GraphableLion):
        return True
    return isinstance(optimizer, torch.optim.AdamW) and bool(
        optimizer.defaults.get("capturable") and optimizer.defaults.get("fused")
    )


# Why an optimizer's step cannot be replayed from a CUDA graph, by its class's module and name: each reads a
# number on the host that a graph would freeze (from the libraries' own step code).
_BITSANDBYTES = "bitsandbytes counts steps on the host and synchronises the GPU after each tensor"
NOT_GRAPHABLE_BECAUSE = {
    "torch.optim.adamw.AdamW": "torch AdamW without fused=True steps tensor by tensor",
    "bitsandbytes.optim.adamw.AdamW8bit": f"{_BITSANDBYTES}; with paged states or an args object it stays in use",
    "bitsandbytes.optim.lion.Lion8bit": _BITSANDBYTES,
    "lion_pytorch.lion_pytorch.Lion": "lion-pytorch passes the learning rate to its update as a Python number",
    "prodigyopt.prodigy.Prodigy": "Prodigy reads its step-size estimate on the host (.item()) at every step",
    "transformers.optimization.Adafactor": "Adafactor derives its decay and step size from a step count on the host",
}


def why_not_graphable(optimizer) -> str | None:
    """None for a graphable optimizer, else the reason in a few words (for the start event)."""
    if is_graphable(optimizer):
        return None
    cls = type(optimizer)
    return NOT_GRAPHABLE_BECAUSE.get(f"{cls.__module__}.{cls.__name__}", f"{cls.__name__} has no capturable step")


def place_learning_rates(optimizer, device: torch.device) -> None:
    """Learning rates as device tensors for a graphable optimizer (the scheduler then fills them in place),
    plain floats for every other; also after loading a saved state, which may hold either."""
    graphable = is_graphable(optimizer)
    dtype = getattr(optimizer, "lr_dtype", torch.float32)
    for group in optimizer.param_groups:
        value = float(group["lr"])
        group.setdefault("initial_lr", value)  # the scheduler's base rate stays a float
        if isinstance(group["initial_lr"], torch.Tensor):
            group["initial_lr"] = float(group["initial_lr"])
        if graphable:
            rate = group["lr"]
            if isinstance(rate, torch.Tensor) and rate.device == device and rate.dtype == dtype:
                continue
            group["lr"] = torch.tensor(value, dtype=dtype, device=device)
        else:
            group["lr"] = value


def lr_lambda(name: str, warmup: int, total: int, num_cycles: int = 1, power: float = 1.0, base_lr: float = 1.0):
    """The multiplier of the base LR at step s, as transformers'/diffusers' schedules define it."""

    def constant(step: int) -> float:
        return 1.0

    def constant_with_warmup(step: int) -> float:
        return step / max(1, warmup) if step < warmup else 1.0

    def linear(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    def cosine(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))

    def cosine_with_restarts(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))

    def polynomial(step: int) -> float:
        lr_end_ratio = min(1e-7 / base_lr, 1.0)  # transformers' default lr_end = 1e-7, absolute
        if step < warmup:
            return step / max(1, warmup)
        if step > total:
            return lr_end_ratio
        remaining = 1 - (step - warmup) / max(1, total - warmup)
        return (1 - lr_end_ratio) * remaining**power + lr_end_ratio

    table = {
        "constant": constant,
        "constant_with_warmup": constant_with_warmup,
        "linear": linear,
        "cosine": cosine,
        "cosine_with_restarts": cosine_with_restarts,
        "polynomial": polynomial,
    }
    if name not in table:
        raise ValueError(f"unknown lr_scheduler {name!r}")
    return table[name]


def make_scheduler(optimizer, name: str, warmup: int, total: int, num_cycles: int = 1, power: float = 1.0) -> LambdaLR:
    base_lr = optimizer.defaults.get("lr") or 1.0
    return LambdaLR(optimizer, lr_lambda(name, warmup, total, num_cycles, power, base_lr))
