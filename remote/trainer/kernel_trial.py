"""The trial a Triton kernel runs at set-up before the trainer routes layers through it (group_norm.py,
float8.py, rotary.py): on a small case against PyTorch's own result, which also compiles it for the dtype."""

from __future__ import annotations

from collections.abc import Callable


def trial_failure(trial: Callable[[], None], kernels: str = "kernels") -> str | None:
    """None when ``trial`` passed; else why the Triton ``kernels`` did not run, in a line for the start event
    (the trainer then keeps PyTorch's path). A CUDA error is raised: the device itself failed, and nothing
    after this would run either."""
    try:
        trial()
    except Exception as exc:
        if "CUDA error" in str(exc) or type(exc).__name__ == "AcceleratorError":
            raise
        message = str(exc).strip()
        reason = message.splitlines()[0][:200] if message else ""
        return f"the Triton {kernels} did not run here ({type(exc).__name__}: {reason})"
    return None
