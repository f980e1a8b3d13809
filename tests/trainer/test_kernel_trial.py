"""A Triton kernel's set-up trial: a failure is a line for the start event, a failed device is raised."""

from __future__ import annotations

import pytest

from remote.trainer.kernel_trial import trial_failure


def _raising(exc: Exception):
    def trial() -> None:
        raise exc

    return trial


def test_a_passing_trial_has_no_failure():
    assert trial_failure(lambda: None) is None


def test_a_failing_trial_says_its_first_line_and_the_kernels():
    failure = trial_failure(_raising(RuntimeError("cc: not found\nmore detail")), "kernel")
    assert failure == "the Triton kernel did not run here (RuntimeError: cc: not found)"
    assert trial_failure(_raising(ValueError(""))) == "the Triton kernels did not run here (ValueError: )"


def test_a_failed_device_is_not_a_kernel_failure():
    class AcceleratorError(RuntimeError):
        pass

    with pytest.raises(AcceleratorError):
        trial_failure(_raising(AcceleratorError("device lost")))
    with pytest.raises(RuntimeError, match="CUDA error"):
        trial_failure(_raising(RuntimeError("CUDA error: an illegal memory access")))
