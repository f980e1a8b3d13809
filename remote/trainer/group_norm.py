"""GroupNorm on channels_last activations, as Triton kernels that read and write channels_last memory.

PyTorch's CUDA GroupNorm works on NCHW only: handed a channels_last tensor, it copies it to NCHW, and the
convolution after it copies the result back; the backward does the same with the gradients. In the UNet,
which runs channels_last for cuDNN, those layout copies were ~300 kernels and ~5 ms of a 45 ms SD 1.5
step (bench/RESULTS.md). Here the statistics and the normalisation work on channels_last memory directly.

Each (sample, group) is split across several programs so that the GPU is full even at batch 1-4 (32
groups): the forward is one kernel for partial statistics and one that combines them and normalises; the
backward likewise (partial sums of the gradient, then the input gradient). Statistics are float32
Welford summaries (mean, sum of squared deviations, count), merged around the overall mean: the variance
never subtracts two large numbers, so a large mean or a far-out value costs no more than float32's
rounding at the mean's magnitude.

Only frozen GroupNorms take this path (the trainer's base model): the kernels compute no weight or bias
gradients. Outside autocast only, because autocast runs GroupNorm in float32 and this keeps the input's
dtype.
"""

from __future__ import annotations

import math
from types import MethodType

import torch
from torch import nn

from .kernel_trial import trial_failure

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install; the trainer then keeps nn.GroupNorm's own path
    triton = None

BLOCK = 1024  # elements of one group a program handles per loop iteration
MAX_SPLITS = 64  # programs per (sample, group), at most
TARGET_PROGRAMS = 528  # about 4 per SM of an H100/H200: enough to keep every SM streaming

if triton is not None:
    _SHAPE_ARGS = ["HW", "C", "CG", "G", "S", "count", "chunk"]

    @triton.jit
    def _group_start(group, HW, C, CG, G):
        """Memory offset of the group's first element (sample n, channel g*CG, pixel 0)."""
        return (group // G).to(tl.int64) * HW * C + (group % G) * CG

    @triton.jit
    def _group_offsets(group, start, HW, C, CG, G, count, BLOCK: tl.constexpr):
        """Elements ``start + 0..BLOCK`` of ``group`` (its flat index over HW x CG): memory offsets, channels,
        and which are inside the group."""
        index = start + tl.arange(0, BLOCK)
        inside = index < count
        channel = (group % G) * CG + index % CG
        offsets = _group_start(group, HW, C, CG, G) + (index // CG).to(tl.int64) * C + index % CG
        return offsets, channel, inside

    @triton.jit
    def _merge(mean, m2, n, SIZE: tl.constexpr):
        """One (mean, sum of squared deviations, count) from a vector of them, whose first part is never
        empty: the total's squared deviations are each part's own plus its count times its mean's squared
        distance from the overall mean. The overall mean is taken relative to the first part's, so a
        constant group comes out exact."""
        total = tl.sum(n, 0)
        pivot = tl.sum(tl.where(tl.arange(0, SIZE) == 0, mean, 0.0), 0)
        overall = pivot + tl.sum(n * (mean - pivot), 0) / tl.maximum(total, 1.0)
        apart = mean - overall
        return overall, tl.sum(m2 + n * apart * apart, 0), total

    @triton.jit(do_not_specialize=_SHAPE_ARGS)
    def _partial_stats(X, PART, HW, C, CG, G, S, count, chunk, BLOCK: tl.constexpr):
        """Program (group, split): mean, sum of squared deviations and count of its chunk (Welford per lane,
        then the lanes merged), so the variance never subtracts two large numbers."""
        pid = tl.program_id(0)
        group = pid // S
        mean = tl.zeros([BLOCK], tl.float32)
        m2 = tl.zeros([BLOCK], tl.float32)
        n = tl.zeros([BLOCK], tl.float32)
        low = (pid % S) * chunk
        for start in range(low, low + chunk, BLOCK):
            offsets, _, inside = _group_offsets(group, start, HW, C, CG, G, count, BLOCK)
            x = tl.load(X + offsets, mask=inside, other=0.0).to(tl.float32)
            n_new = n + tl.where(inside, 1.0, 0.0)
            delta = tl.where(inside, x - mean, 0.0)
            mean += delta / tl.maximum(n_new, 1.0)
            m2 += tl.where(inside, delta * (x - mean), 0.0)
            n = n_new
        mean_all, m2_all, n_all = _merge(mean, m2, n, BLOCK)
        tl.store(PART + 3 * pid, mean_all)
        tl.store(PART + 3 * pid + 1, m2_all)
        tl.store(PART + 3 * pid + 2, n_all)

    @triton.jit
    def _group_stats(PART, group, S, MAX_S: tl.constexpr):
        """The group's (mean, sum of squared deviations, count), combined from its splits' summaries."""
        split = tl.arange(0, MAX_S)
        mine = split < S
        at = PART + 3 * (group * S + split)
        mean = tl.load(at, mask=mine, other=0.0)
        m2 = tl.load(at + 1, mask=mine, other=0.0)
        n = tl.load(at + 2, mask=mine, other=0.0)
        return _merge(mean, m2, n, MAX_S)

    @triton.jit
    def _group_sums(PART, group, S, MAX_S: tl.constexpr):
        split = tl.arange(0, MAX_S)
        mine = split < S
        first = tl.sum(tl.load(PART + 2 * (group * S + split), mask=mine, other=0.0), 0)
        second = tl.sum(tl.load(PART + 2 * (group * S + split) + 1, mask=mine, other=0.0), 0)
        return first, second

    @triton.jit(do_not_specialize=_SHAPE_ARGS)
    def _normalize(
        X, W, B, Y, PART, MEAN, RSTD, HW, C, CG, G, S, count, chunk, eps, BLOCK: tl.constexpr, MAX_S: tl.constexpr
    ):
        pid = tl.program_id(0)
        group = pid // S
        mean, m2, _ = _group_stats(PART, group, S, MAX_S)
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        if pid % S == 0:
            tl.store(MEAN + group, mean)
            tl.store(RSTD + group, rstd)
        low = (pid % S) * chunk
        for start in range(low, low + chunk, BLOCK):
            offsets, channel, inside = _group_offsets(group, start, HW, C, CG, G, count, BLOCK)
            x = tl.load(X + offsets, mask=inside, other=0.0).to(tl.float32)
            w = tl.load(W + channel, mask=inside, other=0.0).to(tl.float32)
            b = tl.load(B + channel, mask=inside, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * w + b
            tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=inside)

    @triton.jit
    def _gradient_terms(X, DY, W, group, start, mean, rstd, HW, C, CG, G, count, BLOCK: tl.constexpr):
        """For elements ``start + 0..BLOCK`` of the group: offsets, which are inside it, x_hat, and dy*w
        (zero outside the group)."""
        offsets, channel, inside = _group_offsets(group, start, HW, C, CG, G, count, BLOCK)
        x = tl.load(X + offsets, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(DY + offsets, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(W + channel, mask=inside, other=0.0).to(tl.float32)
        return offsets, inside, (x - mean) * rstd, dy * w

    @triton.jit(do_not_specialize=_SHAPE_ARGS)
    def _partial_gradient_sums(X, DY, W, MEAN, RSTD, PART, HW, C, CG, G, S, count, chunk, BLOCK: tl.constexpr):
        """Program (group, split): sums of dy*w and of dy*w*x_hat over its chunk."""
        pid = tl.program_id(0)
        group = pid // S
        mean = tl.load(MEAN + group)
        rstd = tl.load(RSTD + group)
        plain = tl.zeros([BLOCK], tl.float32)
        weighted = tl.zeros([BLOCK], tl.float32)
        low = (pid % S) * chunk
        for start in range(low, low + chunk, BLOCK):
            _, _, x_hat, gw = _gradient_terms(X, DY, W, group, start, mean, rstd, HW, C, CG, G, count, BLOCK)
            plain += gw
            weighted += gw * x_hat
        tl.store(PART + 2 * pid, tl.sum(plain, 0))
        tl.store(PART + 2 * pid + 1, tl.sum(weighted, 0))

    @triton.jit(do_not_specialize=_SHAPE_ARGS)
    def _input_gradient(
        X, DY, W, MEAN, RSTD, PART, DX, HW, C, CG, G, S, count, chunk, BLOCK: tl.constexpr, MAX_S: tl.constexpr
    ):
        """dx = rstd * (dy*w - mean(dy*w) - x_hat * mean(dy*w*x_hat)), the means over the group."""
        pid = tl.program_id(0)
        group = pid // S
        mean = tl.load(MEAN + group)
        rstd = tl.load(RSTD + group)
        plain, weighted = _group_sums(PART, group, S, MAX_S)
        plain_mean = plain / count
        weighted_mean = weighted / count
        low = (pid % S) * chunk
        for start in range(low, low + chunk, BLOCK):
            offsets, inside, x_hat, gw = _gradient_terms(X, DY, W, group, start, mean, rstd, HW, C, CG, G, count, BLOCK)
            dx = rstd * (gw - plain_mean - x_hat * weighted_mean)
            tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=inside)


def _launch_shape(samples: int, groups: int, count: int) -> tuple[int, int]:
    """(splits per group, elements per split: a multiple of BLOCK)."""
    wanted = max(1, min(MAX_SPLITS, math.ceil(TARGET_PROGRAMS / (samples * groups))))
    chunk = math.ceil(count / wanted / BLOCK) * BLOCK
    return math.ceil(count / chunk), chunk


class ChannelsLastGroupNorm(torch.autograd.Function):
    """group_norm(x, groups, weight, bias, eps) for a 4-d channels_last x; no weight or bias gradients."""

    @staticmethod
    def forward(ctx, x, groups: int, weight, bias, eps: float):
        n, c, h, w = x.shape
        hw, cg = h * w, c // groups
        count = hw * cg
        splits, chunk = _launch_shape(n, groups, count)
        out = torch.empty_like(x, memory_format=torch.channels_last)
        part = torch.empty(n * groups * splits * 3, device=x.device, dtype=torch.float32)
        mean = torch.empty(n * groups, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        grid = (n * groups * splits,)
        shape = (hw, c, cg, groups, splits, count, chunk)
        _partial_stats[grid](x, part, *shape, BLOCK=BLOCK)
        _normalize[grid](x, weight, bias, out, part, mean, rstd, *shape, eps, BLOCK=BLOCK, MAX_S=MAX_SPLITS)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.shape = shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, rstd = ctx.saved_tensors
        shape = ctx.shape
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last)
        splits = shape[4]
        part = torch.empty(mean.numel() * splits * 2, device=x.device, dtype=torch.float32)
        grid = (mean.numel() * splits,)
        _partial_gradient_sums[grid](x, grad_out, weight, mean, rstd, part, *shape, BLOCK=BLOCK)
        _input_gradient[grid](x, grad_out, weight, mean, rstd, part, grad_x, *shape, BLOCK=BLOCK, MAX_S=MAX_SPLITS)
        return grad_x, None, None, None, None


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def takes_kernel_path(module: nn.GroupNorm, x: torch.Tensor) -> bool:
    """A frozen, affine GroupNorm on a non-empty channels_last 4-d tensor (outside autocast), on a device
    Triton runs on (CUDA; the CPU under Triton's interpreter, for tests)."""
    return (
        module.affine
        and not module.weight.requires_grad
        and not module.bias.requires_grad
        and x.dim() == 4
        and x.numel() > 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and not _autocast_enabled(x.device.type)
    )


def _forward(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    if takes_kernel_path(self, x):
        return ChannelsLastGroupNorm.apply(x, self.num_groups, self.weight, self.bias, self.eps)
    return nn.GroupNorm.forward(self, x)


def _trial(device: torch.device, dtype: torch.dtype) -> None:
    """Run both kernels once, on a shape that splits each group across programs and loops within a split,
    and check output and input gradient against PyTorch's GroupNorm. This also compiles them for ``dtype``
    (Triton needs a C compiler on the machine for its launcher)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, 64, 96, 96, generator=generator).to(device, dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.linspace(0.5, 1.5, 64, device=device, dtype=dtype)
    bias = torch.linspace(-0.5, 0.5, 64, device=device, dtype=dtype)
    grad = torch.randn(x.shape, generator=generator).to(device, dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = ChannelsLastGroupNorm.apply(x, 32, weight, bias, 1e-5)
    out.backward(grad)
    reference_x = x.detach().float().contiguous().requires_grad_(True)
    reference = torch.nn.functional.group_norm(reference_x, 32, weight.float(), bias.float(), 1e-5)
    reference.backward(grad.float())
    assert x.grad is not None and reference_x.grad is not None
    for name, ours, theirs in (("output", out, reference), ("input gradient", x.grad, reference_x.grad)):
        error = (ours.detach().float() - theirs).abs().max().item()
        scale = theirs.abs().max().item()
        if not error <= 0.02 * scale + 1e-3:  # bf16 rounds to 0.4%; NaN fails too
            raise RuntimeError(f"the kernels' {name} is off by {error:.3g} (values up to {scale:.3g})")


def use_channels_last_group_norm(model: nn.Module, device: torch.device, dtype: torch.dtype) -> tuple[int, str | None]:
    """Route the plain nn.GroupNorm layers of ``model`` through the kernels, once they have run correctly on
    ``device`` in ``dtype``. Returns (layers routed, why none were)."""
    if triton is None:
        return 0, "Triton is not installed"
    failure = trial_failure(lambda: _trial(device, dtype))
    if failure:
        return 0, failure
    routed = 0
    for module in model.modules():
        if type(module) is nn.GroupNorm:
            module.forward = MethodType(_forward, module)  # type: ignore[method-assign]  # this layer only
            routed += 1
    return routed, None
