"""A frozen base model in 8 bits: Linear weights stored as float8 (e4m3fn) with one scale per output row,
computed in the activations' dtype (weight-only quantisation: each layer's weight is upcast as it runs).

This is what lets Flux.1's 12 B-parameter transformer (24 GB in bf16) train a LoRA on a 24 GB card: its
Linear weights take 12 GB. kohya's ``fp8_base`` casts the weights to float8_e4m3fn unscaled; here each output
row is scaled by its absolute maximum first (row / (amax / 448)), which keeps small rows' precision. The
upcast weight is never kept for the backward pass (the autograd function saves the 8-bit weight and upcasts
it again), so the activations of a step do not hold a bf16 copy of the model.

Plain PyTorch, so it runs on the CPU as well (the tests); on the GPU the upcast is one elementwise kernel
per layer, beside its matrix product.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = float(torch.finfo(FLOAT8).max)  # 448


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale per output row) with weight ~= float8 * scale."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FLOAT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale).to(FLOAT8), scale


def dequantize(weight8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float16:  # a small row's scale is below fp16's normal range: multiply in float32
        return (weight8.float() * scale.float()).to(dtype)
    return weight8.to(dtype) * scale.to(dtype)  # bf16 has float32's range


class _Float8Matmul(torch.autograd.Function):
    """y = x (w8 * s)^T + b; the backward upcasts w8 again instead of keeping the upcast weight."""

    @staticmethod
    def forward(ctx, x, weight8, scale, bias):
        ctx.save_for_backward(weight8, scale)
        return F.linear(x, dequantize(weight8, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight8, scale = ctx.saved_tensors
        grad_x = grad_out @ dequantize(weight8, scale, grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class Float8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is float8 with per-row scales (buffers ``weight8``, ``weight_scale``).

    A subclass of nn.Linear, so the LoRA selects and wraps it like any Linear (its ``in_features`` and
    ``out_features``); the fused LoRA path leaves subclasses alone, so LoRA runs beside it the plain way.
    Moving the module (``.to(device, dtype)``) moves the buffers but keeps their dtypes.
    """

    weight8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, source: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = source.in_features, source.out_features
        weight8, scale = quantize_rows(source.weight)
        self.register_buffer("weight8", weight8)
        self.register_buffer("weight_scale", scale)
        self.bias = None if source.bias is None else nn.Parameter(source.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]  # read-only: the dequantised weight, float32
        return dequantize(self.weight8, self.weight_scale, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _Float8Matmul.apply(x, self.weight8, self.weight_scale, bias)

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers.pop(name) for name in ("weight8", "weight_scale")}
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.bias.device if self.bias is not None else "cpu")).device
        for name, tensor in kept.items():  # moved, never cast: a cast and back would round the scale
            self._buffers[name] = tensor.to(device=device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8 weight-only"


def quantize_linears(root: nn.Module, select: Callable[[str], bool], device: torch.device | None = None) -> int:
    """Replace every nn.Linear under ``root`` whose path ``select`` accepts by a Float8Linear, one layer at a
    time (on ``device`` when given, so that a model loaded on the host never sits on the GPU in 16 bits).
    Returns how many layers were replaced."""
    replaced = 0
    for path, parent in list(_parents_of_linears(root)):
        for name, child in list(parent.named_children()):
            full = f"{path}.{name}" if path else name
            if type(child) is not nn.Linear or not select(full):
                continue
            if device is not None:
                child.to(device)
            setattr(parent, name, Float8Linear(child))
            replaced += 1
    return replaced


def _parents_of_linears(root: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for path, module in root.named_modules():
        if any(type(child) is nn.Linear for child in module.children()):
            yield path, module
