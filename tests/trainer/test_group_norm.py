"""The channels_last GroupNorm kernels compute PyTorch's group_norm and its input gradient.

The kernels are Triton's; here they run on the CPU in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which executes the same kernel code with NumPy. bench/fast_path_check.py compares whole
training runs on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import remote.trainer.group_norm as kernels


def _channels_last(*shape, dtype=torch.float32, scale=1.0, offset=0.0):
    return (torch.randn(*shape) * scale + offset).to(dtype).contiguous(memory_format=torch.channels_last)


def _reference(x, groups, weight, bias, grad, eps=1e-5):
    """group_norm and its input gradient in float64, NCHW."""
    x64 = x.detach().double().contiguous().requires_grad_(True)
    out = F.group_norm(x64, groups, weight.double(), bias.double(), eps)
    out.backward(grad.double())
    return out.detach(), x64.grad


@pytest.mark.parametrize(
    "shape,groups,offset",
    [
        ((2, 64, 8, 8), 32, 0.0),  # 2 channels a group
        ((1, 40, 5, 7), 4, 0.0),  # 10 channels a group (not a power of two), odd spatial size
        ((1, 32, 48, 48), 32, 100.0),  # 2,304 elements a group, split across programs; a mean of 100
        ((3, 1280, 2, 2), 32, -3.0),  # 40 channels a group, few pixels
    ],
)
def test_forward_and_input_gradient_match_group_norm(shape, groups, offset):
    torch.manual_seed(0)
    x = _channels_last(*shape, scale=2.0, offset=offset).requires_grad_(True)
    weight, bias = torch.randn(shape[1]), torch.randn(shape[1])
    out = kernels.ChannelsLastGroupNorm.apply(x, groups, weight, bias, 1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected_out, expected_grad = _reference(x, groups, weight, bias, grad)
    # float32 statistics of values near 100 carry its rounding (7.6e-6) into the output
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=2e-5 + 1e-6 * abs(offset))
    torch.testing.assert_close(x.grad.double(), expected_grad, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_as_close_to_exact_as_pytorchs_own_group_norm(dtype):
    """bf16 (the bf16 path) and fp16 (SD's fp16 path, which runs without autocast too)."""
    torch.manual_seed(1)
    x = _channels_last(2, 320, 32, 32, dtype=dtype, scale=3.0, offset=1.0).requires_grad_(True)
    weight, bias = torch.randn(320, dtype=dtype), torch.randn(320, dtype=dtype)
    out = kernels.ChannelsLastGroupNorm.apply(x, 32, weight, bias, 1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected_out, expected_grad = _reference(x, 32, weight, bias, grad)

    x_native = x.detach().contiguous().requires_grad_(True)
    native = F.group_norm(x_native, 32, weight, bias, 1e-5)
    native.backward(grad.contiguous())
    ours_out, native_out = (out.double() - expected_out).abs().mean(), (native.double() - expected_out).abs().mean()
    ours_grad, native_grad = (
        (x.grad.double() - expected_grad).abs().mean(),
        (x_native.grad.double() - expected_grad).abs().mean(),
    )
    # Triton's interpreter truncates float32 to bf16 where a GPU rounds to nearest, which doubles the
    # rounding error of every stored value; within that, the kernels lose nothing (their sums are float32)
    assert ours_out <= 2.2 * native_out, (ours_out, native_out)
    assert ours_grad <= 2.2 * native_grad, (ours_grad, native_grad)


def test_an_outlying_first_value_or_a_large_mean_costs_no_precision():
    # float32 statistics that subtract two large sums (or shift by one value) lose digits here; Welford
    # summaries do not: the error stays at PyTorch's own float32 level
    torch.manual_seed(2)
    x = torch.randn(2, 64, 16, 16) * 1e-3 + 30.0
    x[:, :, 0, 0] = 200.0  # every group's first element far out
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    weight, bias = torch.randn(64), torch.randn(64)
    out = kernels.ChannelsLastGroupNorm.apply(x, 32, weight, bias, 1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected_out, expected_grad = _reference(x, 32, weight, bias, grad)
    native = F.group_norm(x.detach().contiguous(), 32, weight, bias, 1e-5)
    native_error = (native.double() - expected_out).abs().max()
    assert (out.double() - expected_out).abs().max() <= 4 * native_error + 1e-6
    torch.testing.assert_close(x.grad.double(), expected_grad, rtol=1e-3, atol=1e-3)


def test_single_pixel_and_empty_inputs():
    torch.manual_seed(3)
    x = torch.randn(3, 64, 1, 1).requires_grad_(True)  # contiguous and channels_last at once
    weight, bias = torch.randn(64), torch.randn(64)
    out = kernels.ChannelsLastGroupNorm.apply(x, 16, weight, bias, 1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected_out, expected_grad = _reference(x, 16, weight, bias, grad)
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), expected_grad, rtol=1e-4, atol=1e-5)
    norm = nn.GroupNorm(16, 64).requires_grad_(False)
    assert not kernels.takes_kernel_path(norm, _channels_last(0, 64, 4, 4))


def test_routed_layers_take_the_kernels_only_when_frozen_channels_last_and_outside_autocast(monkeypatch):
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(), nn.GroupNorm(4, 16))
    assert kernels.use_channels_last_group_norm(model, torch.device("cpu"), torch.float32) == (2, None)
    norm = model[1]
    x = _channels_last(2, 16, 6, 6)
    assert not kernels.takes_kernel_path(norm, x)  # its weights still train
    model.requires_grad_(False)
    assert kernels.takes_kernel_path(norm, x)
    assert not kernels.takes_kernel_path(norm, x.contiguous())  # NCHW: PyTorch's own kernel, no copies
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.takes_kernel_path(norm, x)  # autocast runs group_norm in float32
    model.to(memory_format=torch.channels_last)
    image = _channels_last(2, 8, 6, 6)
    calls = []
    original = kernels.ChannelsLastGroupNorm.apply
    monkeypatch.setattr(kernels.ChannelsLastGroupNorm, "apply", lambda *a: calls.append(1) or original(*a))
    routed = model(image)
    monkeypatch.undo()
    assert len(calls) == 2
    for layer in (model[1], model[3]):
        del layer.forward  # back to nn.GroupNorm.forward
    torch.testing.assert_close(routed, model(image), rtol=1e-5, atol=1e-5)


def test_kernels_that_fail_their_trial_leave_pytorchs_group_norm_in_place(monkeypatch):
    def no_compiler(*args):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(kernels.ChannelsLastGroupNorm, "apply", no_compiler)
    model = nn.Sequential(nn.GroupNorm(4, 16))
    routed, reason = kernels.use_channels_last_group_norm(model, torch.device("cpu"), torch.bfloat16)
    assert routed == 0
    assert "did not run here" in reason and "C compiler" in reason
    assert "forward" not in vars(model[0])  # still nn.GroupNorm's own forward


def test_kernels_that_compute_wrong_numbers_fail_their_trial(monkeypatch):
    original = kernels.ChannelsLastGroupNorm.apply
    monkeypatch.setattr(
        kernels.ChannelsLastGroupNorm, "apply", lambda x, g, w, b, eps: original(x, g, w, b, eps) * 1.05
    )
    routed, reason = kernels.use_channels_last_group_norm(
        nn.Sequential(nn.GroupNorm(4, 16)), torch.device("cpu"), torch.float32
    )
    assert routed == 0 and "output is off" in reason


def test_a_constant_group_normalises_to_its_bias_exactly():
    x = torch.full((2, 64, 8, 8), 7.3).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(64), torch.randn(64)
    out = kernels.ChannelsLastGroupNorm.apply(x, 32, weight, bias, 1e-5)
    assert torch.equal(out, bias.view(1, 64, 1, 1).expand_as(out))
