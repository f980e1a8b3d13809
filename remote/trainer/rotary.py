"""Flux.1's rotary position embedding as one Triton kernel each way.

diffusers' ``apply_rotary_emb`` (the interleaved-pairs form Flux.1 uses) casts q or k to float32, builds the
rotated copy with a negation and a stack, multiplies both by cos and sin and adds them: about 50 bytes moved per
element, over the 24 heads x 128 channels of every token, for q and k of each of the 57 blocks.
``bench/step_work.py --by-op flux`` counts it at about a sixth of the step's non-matrix traffic, its backward as
much again (PyTorch's RMSNorm beside it is already one fused kernel on CUDA). Here each output element is
computed in float32 registers from its input, its pair partner, and the position's cos and sin, and rounded
once: 4 bytes moved per bf16 element.

For a pair (x0, x1) at channels 2i, 2i+1 the forward is (x0 c0 - x1 s0, x1 c1 + x0 s1), as diffusers computes
it; the backward is the transpose, (g0 c0 + g1 s1, g1 c1 - g0 s0): the same kernel with the sine taken from
the partner's channel and the sign flipped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from .kernel_trial import trial_failure

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: diffusers' own function only
    triton = None

FLUX_MODULE = "diffusers.models.transformers.transformer_flux"

if triton is not None:

    @triton.jit
    def _rotate_rows(X, COS, SIN, OUT, tokens, width, D: tl.constexpr, BLOCK: tl.constexpr, BACKWARD: tl.constexpr):
        """Program = one token of one sample: its ``width`` (heads x D) channels; cos and sin are [tokens, D]."""
        row = tl.program_id(0).to(tl.int64)
        token = row % tokens
        j = tl.arange(0, BLOCK)
        inside = j < width
        channel = j % D
        even = (channel % 2) == 0
        partner = tl.where(even, j + 1, j - 1)
        x = tl.load(X + row * width + j, mask=inside, other=0.0).to(tl.float32)
        other = tl.load(X + row * width + partner, mask=inside, other=0.0).to(tl.float32)
        cos = tl.load(COS + token * D + channel, mask=inside, other=0.0)
        if BACKWARD:
            sin = tl.load(SIN + token * D + tl.where(even, channel + 1, channel - 1), mask=inside, other=0.0)
            turned = tl.where(even, other, -other)
        else:
            sin = tl.load(SIN + token * D + channel, mask=inside, other=0.0)
            turned = tl.where(even, -other, other)
        tl.store(OUT + row * width + j, (x * cos + turned * sin).to(OUT.dtype.element_ty), mask=inside)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    batch, tokens, heads, dim = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    width = heads * dim
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    block = triton.next_power_of_2(width)
    _rotate_rows[(batch * tokens,)](x, cos, sin, out, tokens, width, D=dim, BLOCK=block, BACKWARD=backward)
    return out


class RotaryEmbedding(torch.autograd.Function):
    """diffusers' apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1) for x of
    shape [batch, tokens, heads, head_dim]; cos and sin [tokens, head_dim] get no gradient."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_out, cos, sin, backward=True), None, None


def _takes_kernel(x: Any, freqs_cis: Any, use_real: bool, unbind_dim: int, sequence_dim: int) -> bool:
    if not (use_real and unbind_dim == -1 and sequence_dim == 1 and isinstance(freqs_cis, tuple | list)):
        return False
    cos, sin = freqs_cis
    return (
        x.dim() == 4
        and x.shape[-1] % 2 == 0
        and tuple(cos.shape) == (x.shape[1], x.shape[-1])
        and tuple(sin.shape) == tuple(cos.shape)
        and cos.device == x.device
    )


def fused_apply_rotary_emb(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """diffusers' apply_rotary_emb, through the kernel for Flux.1's form and ``original`` for any other."""

    def apply_rotary_emb(
        x: torch.Tensor,
        freqs_cis: Any,
        use_real: bool = True,
        use_real_unbind_dim: int = -1,
        sequence_dim: int = 2,
    ) -> torch.Tensor:
        if _takes_kernel(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim):
            cos, sin = freqs_cis
            return RotaryEmbedding.apply(x, cos, sin)
        return original(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)

    apply_rotary_emb.original = original  # type: ignore[attr-defined]  # what uninstall puts back
    return apply_rotary_emb


def _trial(device: torch.device, dtype: torch.dtype, original: Callable[..., torch.Tensor]) -> None:
    """The kernels against diffusers' function on a small Flux-shaped case, forward and backward (in float64
    arithmetic for the reference): within one rounding of ``dtype``. This also compiles them."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 5, 3, 16, generator=generator).to(device, dtype)
    angles = torch.randn(5, 8, generator=generator).repeat_interleave(2, dim=1)
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    grad = torch.randn(x.shape, generator=generator).to(device, dtype)
    ours_x = x.clone().requires_grad_(True)
    ours = RotaryEmbedding.apply(ours_x, cos, sin)
    ours.backward(grad)
    reference_x = x.double().requires_grad_(True)
    reference = original(reference_x, (cos.double(), sin.double()), True, -1, 1)
    reference.backward(grad.double())
    assert ours_x.grad is not None and reference_x.grad is not None
    tolerance = 2 * torch.finfo(dtype).eps
    for name, value, expected in (("output", ours, reference), ("gradient", ours_x.grad, reference_x.grad)):
        error = float((value.detach().double() - expected.detach()).abs().max())
        if not error <= tolerance * float(expected.detach().abs().max()):
            raise RuntimeError(f"the rotary kernel's {name} is off by {error:.3g}")


def use_fused_rotary(denoiser: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> tuple[bool, str | None]:
    """Route a Flux.1 transformer's rotary embedding through the kernels, once they have run correctly on
    ``device`` in ``dtype``. diffusers' Flux attention calls the module-level ``apply_rotary_emb`` of its own
    module, so that name is replaced there (for this process). Returns (routed, why not)."""
    if type(denoiser).__module__ != FLUX_MODULE:
        return False, None
    if triton is None:
        return False, "Triton is not installed"
    module = sys.modules[FLUX_MODULE]
    current = getattr(module, "apply_rotary_emb")  # noqa: B009  (a name the type checker cannot see)
    original = getattr(current, "original", current)
    failure = trial_failure(lambda: _trial(device, dtype, original))
    if failure:
        return False, failure
    setattr(module, "apply_rotary_emb", fused_apply_rotary_emb(original))  # noqa: B010
    return True, None
