"""The fast path: everything that makes a step faster without changing what it computes, behind one object.

- channels_last: cuDNN's convolutions run NHWC; an NCHW model pays a layout copy per call. PyTorch's
  GroupNorm would then copy each activation back to NCHW and forth, so the denoiser's GroupNorms run as
  channels_last Triton kernels (group_norm.py).
- fused LoRA layers on flat buffers, their off-chain products on a side stream (lora_fused.py).
- an 8-bit base's upcasts (float8.py) as one Triton kernel per layer instead of a cast and a multiplication.
- Flux.1's rotary position embedding as one Triton kernel each way (rotary.py).
- CUDA graphs of each step's forward and backward, one per batch shape, and of the optimizer step
  (graphs.py).
- overlapped host work: the loop prepares and queues the next step before it reads the loss of the one
  before, unless host work must see the weights in between (loop.host_work_due).

The eager path runs the same step (step.py) without any of it: ``RENTRAIN_FAST_PATH=0`` in the trainer's
environment switches it all off (``cuda_graphs = false`` only the graphs). Both train the same function:
tests/trainer/test_fast_path.py compares them on the CPU, bench/fast_path_check.py on a GPU.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .float8 import use_fused_upcast
from .graphs import OptimizerGraph, StepGraphs, StepInputs
from .group_norm import use_channels_last_group_norm
from .lora import LoRANetwork
from .lora_fused import FlatBuffers
from .optim import is_graphable, why_not_graphable
from .rotary import use_fused_rotary

SWITCH = "RENTRAIN_FAST_PATH"


@dataclass
class FastPath:
    """The run's speed machinery. ``enabled`` false: plain eager steps, one after the other."""

    device: torch.device
    enabled: bool = True
    cuda_graphs: bool = False  # graphs of the steps (and of the optimizer, where it is graphable)
    graphs: StepGraphs | None = None
    optimizer_graph: OptimizerGraph | None = None
    _eager_backward: Callable[[StepInputs], torch.Tensor] | None = None
    _eager_optimizer: Callable[[], None] | None = None
    choices: list[str] = field(default_factory=list)  # what was switched on or off, for the start event

    @classmethod
    def for_run(cls, device: torch.device, cuda_graphs: bool) -> FastPath:
        """On unless the environment sets RENTRAIN_FAST_PATH=0; graphs only on CUDA and with ``cuda_graphs``."""
        enabled = os.environ.get(SWITCH, "1") != "0"
        return cls(device, enabled, cuda_graphs=enabled and cuda_graphs and device.type == "cuda")

    @property
    def on_cuda(self) -> bool:
        return self.enabled and self.device.type == "cuda"

    @property
    def overlap(self) -> bool:
        """Whether a step's loss may be read after the next step is queued."""
        return self.enabled

    def graphable_optimizer(self) -> bool:
        """Whether to make the optimizer capturable, so that its step (fp16 loss scaling included: it decides on
        the device, loss_scale.py) can be a graph too."""
        return self.cuda_graphs

    def prepare_denoiser(self, denoiser: torch.nn.Module, dtype: torch.dtype) -> None:
        """channels_last weights, and the Triton kernels that take over layers of the denoiser once their trial
        passed: channels_last GroupNorm, the 8-bit layers' upcast, Flux.1's rotary embedding (CUDA only)."""
        if not self.on_cuda:
            return
        denoiser.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # nn.Module.to's overloads omit it
        kernels: tuple[tuple[Callable[..., tuple[Any, str | None]], str, str], ...] = (
            (
                use_channels_last_group_norm,
                "GroupNorm: the UNet's {} layers run channels_last (Triton kernels)",
                "GroupNorm: PyTorch's, with a layout copy before and after each",
            ),
            (
                use_fused_upcast,
                "8-bit upcast: one Triton kernel a call for each of the {} layers",
                "8-bit upcast: PyTorch's cast and multiplication",
            ),
            (
                use_fused_rotary,
                "rotary embedding: one Triton kernel each way (q and k of every block)",
                "rotary embedding: diffusers' float32 steps",
            ),
        )
        for route, routed_choice, kept_choice in kernels:
            routed, note = route(denoiser, self.device, dtype)
            if routed:
                self.choices.append(routed_choice.format(routed))
            elif note:
                self.choices.append(f"{kept_choice}; {note}")

    def flat_buffers(self, network: LoRANetwork, dtype: torch.dtype) -> FlatBuffers:
        """The LoRA on flat buffers (always: the optimizer and clipping use them), fused into its targets on the
        fast path, with a side stream on CUDA."""
        return network.use_flat_buffers(dtype, side_stream=self.on_cuda, fuse=self.enabled)

    def start(
        self,
        backward_pass: Callable[[StepInputs], torch.Tensor],
        apply_gradients: Callable[[], None],
        optimizer: torch.optim.Optimizer,
        optimizer_label: str,
        loss_scaling: bool,
    ) -> None:
        """Take the step's two halves (eager functions) and, with CUDA graphs, capture them as shapes come."""
        self._eager_backward, self._eager_optimizer = backward_pass, apply_gradients
        if not self.enabled:
            self.choices.append(f"fast path: off ({SWITCH}=0: eager steps, plain LoRA layers, one step at a time)")
        if self.cuda_graphs:
            self.graphs = StepGraphs(backward_pass, on_disable=_warn)
            self.choices.append("CUDA graphs: on (one per batch shape, captured the second time a shape is seen)")
            scaling = ", fp16 loss scaling decided on the GPU" if loss_scaling else ""
            if is_graphable(optimizer):
                self.optimizer_graph = OptimizerGraph(apply_gradients, on_disable=_warn)
                self.choices.append(f"optimizer step: in a CUDA graph ({optimizer_label}, capturable{scaling})")
            else:
                reason = why_not_graphable(optimizer)
                self.choices.append(f"optimizer step: eager, not graphed: {reason} ({optimizer_label}{scaling})")
        elif self.device.type == "cuda":
            self.choices.append("CUDA graphs: off (cuda_graphs = false)" if self.enabled else "CUDA graphs: off")

    def backward(self, inputs: StepInputs) -> torch.Tensor:
        """Loss and backward of one micro-batch (a graph replay where one is captured); the loss, detached."""
        if self.graphs is not None:
            return self.graphs.backward(inputs)
        return self._started(self._eager_backward)(inputs)

    def optimizer_step(self) -> None:
        if self.optimizer_graph is not None:
            self.optimizer_graph.step()
        else:
            self._started(self._eager_optimizer)()

    def _started(self, function: Any) -> Any:
        if function is None:
            raise RuntimeError("FastPath.start() has not been called")
        return function


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
