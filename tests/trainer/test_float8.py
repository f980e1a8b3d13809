"""The 8-bit base's one-kernel upcast (remote/trainer/float8.py): the Triton kernel runs here in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which executes the same kernel code with NumPy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from remote.trainer.float8 import (
    FLOAT8,
    Float8Linear,
    dequantize,
    fused_dequantize,
    quantize_linears,
    quantize_rows,
    use_fused_upcast,
)


def _every_code() -> torch.Tensor:
    codes = torch.arange(256, dtype=torch.uint8).view(FLOAT8)
    return codes[~torch.isnan(codes.float())]  # 254: zero, subnormals, normals up to 448, both signs


def test_nan_codes_stay_nan_and_a_strided_view_is_read_as_its_values():
    codes = torch.arange(256, dtype=torch.uint8).view(FLOAT8)
    nan = torch.isnan(fused_dequantize(codes.view(2, 128), torch.ones(2, 1), torch.bfloat16).flatten())
    assert torch.equal(nan, torch.isnan(codes.float()))  # 0x7F and 0xFF only
    weight8 = _every_code()[:240].view(16, 15)
    transposed = weight8.t()  # not contiguous
    assert torch.equal(fused_dequantize(transposed, torch.ones(15, 1), torch.float32), transposed.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_kernel_decodes_every_code_and_rounds_the_scaled_value_once(dtype):
    weight8 = _every_code().repeat(5, 5)[:, :1100].contiguous()  # rows wider than one program's block
    # 1 + 2^-8: many products fall exactly halfway between two bf16 values (ties to even)
    scale = torch.tensor([[1.0], [1.00390625], [0.37], [2.5e-4], [3.1e-7]])
    ours = fused_dequantize(weight8, scale, dtype)
    assert ours.dtype == dtype and ours.shape == weight8.shape
    assert torch.equal(ours, (weight8.float() * scale).to(dtype))  # float32 product, one rounding


def test_the_kernel_is_within_a_rounding_of_the_plain_upcast_and_closer_to_the_weights():
    torch.manual_seed(0)
    weight = torch.randn(48, 3000) * torch.logspace(-3, 1, 48)[:, None]
    weight8, scale = quantize_rows(weight)
    fused = fused_dequantize(weight8, scale, torch.bfloat16).float()
    plain = dequantize(weight8, scale, torch.bfloat16).float()
    exact = weight8.float() * scale
    assert ((fused - plain).abs() <= 2 * torch.finfo(torch.bfloat16).eps * exact.abs()).all()
    assert (fused - exact).abs().sum() <= (plain - exact).abs().sum()


def test_routed_layers_upcast_with_the_kernel_forward_and_backward():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    quantize_linears(model, lambda path: True)
    model.to(torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    plain_leaf = x.clone().requires_grad_(True)
    plain = model(plain_leaf)
    plain.float().square().sum().backward()

    assert use_fused_upcast(model, torch.device("cpu"), torch.bfloat16) == (2, None)
    calls: list[torch.dtype] = []

    def counted(weight8, scale, dtype):
        calls.append(dtype)
        return fused_dequantize(weight8, scale, dtype)

    for layer in model:
        if isinstance(layer, Float8Linear):
            assert layer.upcast is fused_dequantize
            layer.upcast = counted
    leaf = x.clone().requires_grad_(True)
    out = model(leaf)
    assert len(calls) == 2  # one upcast per layer forward
    out.float().square().sum().backward()
    assert calls == [torch.bfloat16] * 4  # and one per layer backward (the input gradient), none kept
    # bf16: the kernel rounds once where the plain upcast rounds twice; the results agree to a rounding
    torch.testing.assert_close(out, plain, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(leaf.grad, plain_leaf.grad, rtol=2e-2, atol=2e-2)


def test_a_model_without_8bit_layers_is_left_alone_and_a_failing_kernel_is_said(monkeypatch):
    import remote.trainer.float8 as float8

    assert use_fused_upcast(nn.Linear(4, 4), torch.device("cpu"), torch.bfloat16) == (0, None)
    model = nn.Sequential(nn.Linear(8, 8))
    quantize_linears(model, lambda path: True)

    def broken(weight8, scale, dtype):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(float8, "fused_dequantize", broken)
    routed, note = use_fused_upcast(model, torch.device("cpu"), torch.bfloat16)
    assert routed == 0 and note == "the Triton kernel did not run here (RuntimeError: no C compiler)"
    assert model[0].upcast is dequantize  # the plain upcast stays
