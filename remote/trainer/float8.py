"""A frozen base model in 8 bits: Linear weights stored as float8 (e4m3fn) with one scale per output row,
computed in the activations' dtype (weight-only quantisation: each layer's weight is upcast as it runs).

This is what lets Flux.1's 12 B-parameter transformer (24 GB in bf16) train a LoRA on a 24 GB card: its
Linear weights take 12 GB. kohya's ``fp8_base`` casts the weights to float8_e4m3fn unscaled; here each output
row is scaled by its absolute maximum first (row / (amax / 448)), which keeps small rows' precision. The
upcast weight is never kept for the backward pass (the autograd function saves the 8-bit weight and upcasts
it again), so the activations of a step do not hold a bf16 copy of the model.

Plain PyTorch, so it runs on the CPU as well (the tests): the upcast is a cast and a multiplication (7 bytes
moved per weight, three kernels with the scale's cast). On CUDA the fast path routes each layer through one
Triton kernel instead (``use_fused_upcast``): it reads the 8-bit codes, decodes them, scales each row in float32
and writes the result once (3 bytes per weight), rounding once where the plain path rounds the scale and the
product.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_trial import trial_failure

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the plain upcast only
    triton = None

UPCAST_BLOCK = 1024  # weights of one row a program upcasts

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


Upcast = Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]

if triton is not None:

    @triton.jit
    def _upcast_rows(CODES, SCALE, OUT, cols, BLOCK: tl.constexpr, BF16: tl.constexpr):
        """Program (row, block of columns): decode float8 e4m3fn codes (bias 7, subnormals below exponent 1,
        no infinities) from their bytes, times the row's float32 scale, one rounding to OUT's dtype. The bytes
        are decoded here rather than loaded as float8, which Triton supports only on newer GPUs. bf16 is
        rounded to nearest-even on the float32 bits (OUT is then the output's int16 view), the same on every
        GPU and in Triton's interpreter."""
        row = tl.program_id(0).to(tl.int64)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = columns < cols
        code = tl.load(CODES + row * cols + columns, mask=inside, other=0).to(tl.int32)
        exponent = (code >> 3) & 15
        # a normal code as float32 bits: exponent re-biased from 7 to 127, the 3 mantissa bits on top of 23
        normal = (((exponent + 120) << 23) | ((code & 7) << 20)).to(tl.float32, bitcast=True)
        subnormal = (code & 7).to(tl.float32) * 0.001953125  # m/8 * 2^-6
        magnitude = tl.where(exponent == 0, subnormal, normal)
        magnitude = tl.where((code & 127) == 127, float("nan"), magnitude)  # e4m3fn's only NaN codes
        value = tl.where((code & 128) != 0, -magnitude, magnitude) * tl.load(SCALE + row)
        if BF16:
            bits = value.to(tl.int32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            tl.store(OUT + row * cols + columns, (bits >> 16).to(tl.int16), mask=inside)
        else:
            tl.store(OUT + row * cols + columns, value.to(OUT.dtype.element_ty), mask=inside)


def fused_dequantize(weight8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize`` in one Triton kernel: float8 x float32 scale, rounded once to ``dtype``."""
    rows, cols = weight8.shape
    weight8 = weight8.contiguous()  # the kernel reads row after row
    out = torch.empty((rows, cols), device=weight8.device, dtype=dtype)
    grid = (rows, triton.cdiv(cols, UPCAST_BLOCK))
    bf16 = dtype == torch.bfloat16
    target = out.view(torch.int16) if bf16 else out
    codes, row_scales = weight8.view(torch.uint8), scale.float().contiguous()
    _upcast_rows[grid](codes, row_scales, target, cols, BLOCK=UPCAST_BLOCK, BF16=bf16)
    return out


class _Float8Matmul(torch.autograd.Function):
    """y = x (w8 * s)^T + b; the backward upcasts w8 again instead of keeping the upcast weight."""

    @staticmethod
    def forward(ctx, x, weight8, scale, bias, upcast: Upcast):
        ctx.save_for_backward(weight8, scale)
        ctx.upcast = upcast
        return F.linear(x, upcast(weight8, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight8, scale = ctx.saved_tensors
        grad_x = grad_out @ ctx.upcast(weight8, scale, grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


class Float8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is float8 with per-row scales (buffers ``weight8``, ``weight_scale``).

    A subclass of nn.Linear, so the LoRA selects and wraps it like any Linear (its ``in_features`` and
    ``out_features``); the fused LoRA path leaves subclasses alone, so LoRA runs beside it the plain way.
    Moving the module (``.to(device, dtype)``) moves the buffers but keeps their dtypes.
    """

    weight8: torch.Tensor
    weight_scale: torch.Tensor
    upcast: Upcast = staticmethod(dequantize)  # use_fused_upcast sets fused_dequantize on the layers it routes

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
        return _Float8Matmul.apply(x, self.weight8, self.weight_scale, bias, self.upcast)

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


def _upcast_trial(device: torch.device, dtype: torch.dtype) -> None:
    """Every float8 code but NaN's, in rows of unequal scales and a width that is not a multiple of the block,
    through the kernel and through float32 arithmetic: equal to the bit. This also compiles the kernel for
    ``dtype`` (Triton needs a C compiler on the machine for its launcher)."""
    codes = torch.arange(256, dtype=torch.uint8).view(FLOAT8)
    codes = codes[~torch.isnan(codes.float())]
    weight8 = codes.repeat(4, 9)[:, : UPCAST_BLOCK + 7].contiguous().to(device)
    # 1 + 2^-8 puts many products exactly halfway between two bf16 values: ties must round to even
    scale = torch.tensor([[1.0], [1.00390625], [3.0e-3], [1.7e-6]], device=device)
    ours = fused_dequantize(weight8, scale, dtype)
    expected = (weight8.float() * scale).to(dtype)
    if not torch.equal(ours, expected):
        wrong = int((ours != expected).sum())
        raise RuntimeError(f"the upcast kernel differs from float32 arithmetic in {wrong} of {ours.numel()} weights")


def use_fused_upcast(model: nn.Module, device: torch.device, dtype: torch.dtype) -> tuple[int, str | None]:
    """Route ``model``'s Float8Linear layers through the one-kernel upcast, once it has run correctly on
    ``device`` in ``dtype``. Returns (layers routed, why none were)."""
    layers = [m for m in model.modules() if isinstance(m, Float8Linear)]
    if not layers:
        return 0, None
    if triton is None:
        return 0, "Triton is not installed"
    failure = trial_failure(lambda: _upcast_trial(device, dtype), "kernel")
    if failure:
        return 0, failure
    for layer in layers:
        layer.upcast = fused_dequantize  # this layer only
    return len(layers), None
