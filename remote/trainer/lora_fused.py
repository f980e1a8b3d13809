"""The LoRA's training-time fast path: flat weight buffers and a fused linear layer.

Written the plain way, each LoRA module costs about 17 small GPU kernels a step (two weight casts, two
products and an add forward; their backward, two gradient casts and two gradient accumulations), which
for SD 1.5's 264 modules is most of the step's kernels. Here:

- All LoRA parameters are views of one flat master buffer (fp32), and their gradients views of one flat
  gradient buffer, so the optimizer, clipping and saving see ordinary parameters.
- The step computes with one flat copy of the weights in the model's dtype (bf16/fp16), refreshed with
  one kernel per micro-batch, and accumulates into one flat gradient buffer in that dtype, added into the
  fp32 gradients with one kernel. With fp32 training the copy and the master are the same buffer.
- A target Linear (or 1x1 convolution) and its LoRA run as one autograd function: the LoRA's up product
  adds onto the base output inside its matrix product, the backward adds the LoRA's input gradient onto
  the base's inside a product, and the LoRA gradients are accumulated inside their products. That is 3
  kernels forward and 5 backward for base and LoRA together; the base layer alone needs 2.
- On CUDA the LoRA products that the next layer does not wait for run on a second stream (``SideStream``):
  the down product beside the base product, and the gradient products beside the input gradient. Captured
  in a CUDA graph they become parallel branches, so the chain each step waits on is 2 kernels forward and
  2 backward per layer; the kernels are the same ones, so the results are identical.

Only training steps take this path; without gradients (sampling) the LoRA computes from the fp32 master
weights as before, so it never sees a stale copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn


class SideStream:
    """A second CUDA stream for the fused layers' off-chain products.

    ``side()`` runs a block on it after the work queued so far on the current stream; ``wait()`` makes the
    current stream wait for it. The gradient products of a layer's backward are not waited for there: they
    overlap with whatever runs next, and the tensors they read are held here until ``join()`` (at the next
    layer's backward, and at the end of the micro-batch), so the caching allocator cannot hand their memory
    to the current stream while the side stream still reads it.

    ``wait()`` only waits when work was queued on the side stream since the last wait: during a CUDA graph
    capture, a wait on a stream that took no part in the capture is an error (a step whose LoRA layers all
    run unfused, such as Flux.1 over an 8-bit base, never forks the side stream).
    """

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.held: list[torch.Tensor] = []
        self.forked = False

    def side(self, after_current: bool = True):
        if after_current:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        self.forked = True
        return torch.cuda.stream(self.stream)

    def wait(self) -> None:
        if self.forked:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            self.forked = False

    def join(self) -> None:
        self.wait()
        self.held.clear()


@dataclass
class FlatBuffers:
    """One network's LoRA weights and gradients, each in one flat tensor."""

    master: torch.Tensor
    master_grad: torch.Tensor
    compute: torch.Tensor
    compute_grad: torch.Tensor
    side_stream: SideStream | None = None

    @property
    def separate_copy(self) -> bool:
        return self.compute.data_ptr() != self.master.data_ptr()

    def begin_micro_batch(self) -> None:
        """Refresh the compute copy from the master weights and clear its gradient."""
        if self.separate_copy:
            self.compute.copy_(self.master)
            self.compute_grad.zero_()

    def end_micro_batch(self) -> None:
        """Add the micro-batch's gradient into the master gradients (which accumulate across micro-batches)."""
        if self.side_stream is not None:
            self.side_stream.join()
        if self.separate_copy:
            self.master_grad.add_(self.compute_grad)

    def zero_grad(self) -> None:
        self.master_grad.zero_()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over every LoRA gradient at once (the flat buffer holds them all):
        scale by max_norm / (norm + 1e-6) when that is below 1. No host sync, so it can be graph-captured."""
        norm = torch.linalg.vector_norm(self.master_grad, dtype=torch.float32)
        self.master_grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(self.master_grad.dtype))
        return norm


def flat_view(tensors: Sequence[torch.Tensor], gaps: bool = True) -> tuple[torch.Tensor, list[int]] | None:
    """(one flat view spanning the tensors, where each starts in it) when they are contiguous, non-overlapping
    pieces of one storage in one dtype, as flatten_parameters leaves the LoRA's parameters and gradients; else
    None. With ``gaps`` False they must also cover the view exactly, so that an update over the whole view
    touches nothing else."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    if not all(
        t.is_contiguous() and t.dtype == first.dtype and t.untyped_storage().data_ptr() == storage for t in tensors
    ):
        return None
    spans = sorted((int(t.storage_offset()), t.numel()) for t in tensors)
    for (start, size), (next_start, _) in pairwise(spans):
        if start + size > next_start or (not gaps and start + size != next_start):
            return None
    low = spans[0][0]
    high = max(start + size for start, size in spans)
    return first.detach().as_strided((high - low,), (1,), low), [int(t.storage_offset()) - low for t in tensors]


def flatten_parameters(
    params: list[nn.Parameter], compute_dtype: torch.dtype, side_stream: bool = False
) -> tuple[FlatBuffers, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Move ``params`` into flat buffers (in place: each becomes a view of the master buffer, its gradient a
    view of the gradient buffer). Returns the buffers and, per parameter id, its (compute view, compute
    gradient view). ``side_stream``: give the fused layers a second stream (CUDA only)."""
    device, dtype = params[0].device, params[0].dtype
    total = sum(p.numel() for p in params)
    master = torch.empty(total, device=device, dtype=dtype)
    master_grad = torch.zeros(total, device=device, dtype=dtype)
    separate = compute_dtype != dtype
    compute = torch.empty(total, device=device, dtype=compute_dtype) if separate else master
    compute_grad = torch.zeros(total, device=device, dtype=compute_dtype) if separate else master_grad
    views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    offset = 0
    for param in params:
        n, shape = param.numel(), param.shape
        master[offset : offset + n].copy_(param.data.reshape(-1))
        param.data = master[offset : offset + n].view(shape)
        param.grad = master_grad[offset : offset + n].view(shape)
        views[id(param)] = (compute[offset : offset + n].view(shape), compute_grad[offset : offset + n].view(shape))
        offset += n
    side = SideStream(device) if side_stream and device.type == "cuda" else None
    buffers = FlatBuffers(master, master_grad, compute, compute_grad, side)
    if separate:
        compute.copy_(master)
    return buffers, views


class FusedLoRALinear(torch.autograd.Function):
    """y = x W^T + b + scale * (x A^T) B^T over the last dimension of x, with W, b frozen.

    ``master_down`` and ``master_up`` (the trainable fp32 parameters) are inputs only so that the output
    requires a gradient; their gradients are accumulated into ``grad_down``/``grad_up`` (views of the
    flat compute-dtype gradient buffer) inside the backward's matrix products, and none is returned.
    """

    @staticmethod
    def forward(ctx, x, master_down, master_up, weight, bias, down, up, grad_down, grad_up, scale, side):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(down.dtype)
        if side is None:
            hidden = torch.mm(x2, down.t())
            out = F.linear(x2, weight, bias)
        else:
            hidden = x2.new_empty((x2.shape[0], down.shape[0]))  # allocated on the current stream
            with side.side():
                torch.mm(x2, down.t(), out=hidden)
            out = F.linear(x2, weight, bias)
            side.wait()
        out.addmm_(hidden, up.t(), alpha=scale)  # in place: an out-of-place addmm first copies the base
        ctx.save_for_backward(x2, hidden, weight, down, up)
        ctx.grads = (grad_down, grad_up)
        ctx.scale, ctx.side = scale, side
        ctx.x_shape, ctx.x_dtype = shape, x.dtype
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, hidden, weight, down, up = ctx.saved_tensors
        grad_down, grad_up = ctx.grads
        scale, side = ctx.scale, ctx.side
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(down.dtype)
        needs_x = ctx.needs_input_grad[0]
        if side is None:
            grad_hidden = torch.mm(g, up)
            grad_up.addmm_(g.t(), hidden, alpha=scale)
            grad_down.addmm_(grad_hidden.t(), x2, alpha=scale)
            grad_x = torch.mm(g, weight).addmm_(grad_hidden, down, alpha=scale) if needs_x else None
        else:
            side.join()  # the previous layer's gradient products
            grad_hidden = g.new_empty((g.shape[0], up.shape[1]))
            with side.side():
                torch.mm(g, up, out=grad_hidden)
            grad_x = torch.mm(g, weight) if needs_x else None
            side.wait()
            if grad_x is not None:
                grad_x.addmm_(grad_hidden, down, alpha=scale)
            with side.side(after_current=False):
                grad_up.addmm_(g.t(), hidden, alpha=scale)
                grad_down.addmm_(grad_hidden.t(), x2, alpha=scale)
            side.held += [g, hidden, grad_hidden, x2]
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, None, None, None, None, None, None, None, None, None


def is_fusable(module: nn.Module) -> bool:
    """A plain Linear, or a plain 1x1 convolution with stride 1 and no padding (a Linear over the channels).
    Subclasses are left alone: their forward may do more than the fused layer does."""
    if type(module) is nn.Linear:
        return True
    return (
        type(module) is nn.Conv2d
        and tuple(module.kernel_size) == (1, 1)
        and tuple(module.stride) == (1, 1)
        and tuple(module.padding) == (0, 0)
        and module.groups == 1
        and module.dilation == (1, 1)
    )


def fused_forward(
    base: nn.Module,
    x: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    views,
    scale: float,
    side: SideStream | None = None,
) -> torch.Tensor:
    """The base layer plus its LoRA through FusedLoRALinear; 1x1 convolutions run as a Linear over the
    channels (free on a channels_last tensor)."""
    (down, grad_down), (up, grad_up) = views
    assert isinstance(base, (nn.Linear, nn.Conv2d)), "is_fusable admits Linear and 1x1 Conv2d layers"
    if isinstance(base, nn.Linear):
        return FusedLoRALinear.apply(
            x, lora_down, lora_up, base.weight, base.bias, down, up, grad_down, grad_up, scale, side
        )
    channels_last = x.permute(0, 2, 3, 1)
    out = FusedLoRALinear.apply(
        channels_last,
        lora_down,
        lora_up,
        base.weight.view(base.out_channels, base.in_channels),
        base.bias,
        down.view(down.shape[0], down.shape[1]),
        up.view(up.shape[0], up.shape[1]),
        grad_down.view(down.shape[0], down.shape[1]),
        grad_up.view(up.shape[0], up.shape[1]),
        scale,
        side,
    )
    return out.permute(0, 3, 1, 2)
