"""kohya's `optimizer_args`, read and checked without torch: the laptop's `rentrain check` refuses an argument
the optimizer would reject, before anything is rented; remote/trainer/optim.py builds the optimizer with
the same parser.

ACCEPTED_ARGS lists each optimizer's keyword arguments (its constructor's parameters less `params` and
`lr`, which the trainer passes); tests/foundation/test_optimizer_args.py checks it against the installed
torch, bitsandbytes, lion-pytorch, prodigyopt and transformers.
"""

from __future__ import annotations

import ast
import math
from typing import Any

ACCEPTED_ARGS: dict[str, frozenset[str]] = {
    # torch.optim.AdamW
    "adamw": frozenset(
        {"betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused"}
    ),
    # bitsandbytes.optim.AdamW8bit
    "adamw8bit": frozenset(
        {"betas", "eps", "weight_decay", "amsgrad", "optim_bits", "args", "min_8bit_size", "is_paged"}
    ),
    # lion_pytorch.Lion
    "lion": frozenset({"betas", "weight_decay", "use_triton", "decoupled_weight_decay"}),
    # bitsandbytes.optim.Lion8bit
    "lion8bit": frozenset({"betas", "weight_decay", "args", "min_8bit_size", "is_paged"}),
    # prodigyopt.Prodigy
    "prodigy": frozenset(
        {
            "betas",
            "beta3",
            "eps",
            "weight_decay",
            "decouple",
            "use_bias_correction",
            "safeguard_warmup",
            "d0",
            "d_coef",
            "growth_rate",
            "fsdp_in_use",
            "slice_p",
        }
    ),
    # transformers.optimization.Adafactor
    "adafactor": frozenset(
        {
            "eps",
            "clip_threshold",
            "decay_rate",
            "beta1",
            "weight_decay",
            "scale_parameter",
            "relative_step",
            "warmup_init",
        }
    ),
}

ADAFACTOR_RELATIVE_STEP = (
    "Adafactor with relative_step=True is not supported: rentrain trains Adafactor with a fixed learning rate "
    "and your lr_scheduler (relative_step=False, scale_parameter=False, warmup_init=False)"
)
SET_ELSEWHERE = {"lr": "learning_rate (or unet_lr / text_encoder_lr)", "params": "nothing: the trainer passes them"}


def parse_optimizer_value(text: str) -> Any:
    """A Python literal ("0.01", "0.9,0.99", "True"), lower-case true/false, or else the text itself."""
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return {"true": True, "false": False}.get(text.lower(), text)


def parse_optimizer_args(items: list[str]) -> dict[str, Any]:
    """kohya's optimizer_args: ["weight_decay=0.01", "betas=0.9,0.999"] -> {"weight_decay": 0.01, "betas": (0.9,
    0.999)}."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.strip()] = parse_optimizer_value(value)
    return out


def optimizer_arg_problem(optimizer: str, item: str) -> str | None:
    """Why `optimizer` (any case) would refuse the "name=value" item, or None when it takes it."""
    name, sep, text = item.partition("=")
    name = name.strip()
    if not sep or not name:
        return f"{item!r}: expected name=value, such as weight_decay=0.01"
    if name in SET_ELSEWHERE:
        return f"{item!r}: {name} is not an optimizer argument here; set {SET_ELSEWHERE[name]}"
    accepted = ACCEPTED_ARGS.get(optimizer.lower())
    if accepted is not None and name not in accepted:
        return f"{item!r}: {optimizer} takes no argument {name!r}; it takes {', '.join(sorted(accepted))}"
    value = parse_optimizer_value(text)
    if not _is_plain_value(value):
        return f"{item!r}: the value must be a finite number, true/false, or numbers separated by commas"
    if optimizer.lower() == "adafactor" and name == "relative_step" and value is True:
        return f"{item!r}: {ADAFACTOR_RELATIVE_STEP}"
    return None


def _is_plain_value(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_is_number(v) for v in value)
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
