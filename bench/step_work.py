"""The work of one training step of rentrain's trainer, counted without a GPU: FLOPs, bytes moved, kernels.

    python bench/step_work.py [--family sd15|sdxl|flux|all] [--constants]
    python bench/step_work.py --flux         # Flux.1's parameters, activations, and the scaling rule checked
    python bench/step_work.py --inference    # the diffusers benchmark's UNet call (docs/costs.md)
    python bench/step_work.py --predict      # the model's H100 / H200 times for bench/train_speed.py's runs
    python bench/step_work.py --by-op flux   # a family's reference step: the other kernels' bytes by operation

For each case it builds the full-size SD 1.5 or SDXL UNet (and text encoders) on PyTorch's meta device (shapes
only, no memory, no arithmetic), puts the trainer's LoRA on them (kohya's module set, fused layers, flat
buffers: as bench/count_ops.py and the trainer do), and runs one step's forward, loss and backward in bf16
under two dispatch hooks:

    FLOPs        torch.utils.flop_counter.FlopCounterMode: matrix products, convolutions and attention
    bytes        every other operation that launches a kernel (elementwise, norms, casts, copies, softmax,
                 reductions): the bytes of its tensor inputs and outputs, each tensor counted by its distinct
                 elements (a broadcast operand once, not per use). The matrix operations' own bytes are
                 printed apart: they overlap with their arithmetic and do not enter the speed model
    kernels      operations that launch a kernel (views and metadata left out, as in count_ops.py)

Attention runs as one flash-attention kernel forward and one backward, as on the GPU (cuDNN / flash), not as
the math decomposition the meta device would otherwise take (which would count an N x N score matrix in
memory). Likewise torch.nn.RMSNorm (Flux.1's q/k norms) runs as the one fused kernel each way that PyTorch
launches on CUDA (aten._fused_rms_norm and its backward), not the meta device's pow, mean, rsqrt and products.
Flux.1's rotary embedding is routed as the trainer routes it on CUDA (remote/trainer/rotary.py), with its
Triton launch counted as one kernel that reads q or k (or, backward, their gradient) and cos and sin in float32,
and writes the result. The AdamW update is not run (torch's fused AdamW cannot run on the meta device); its
bytes are added as ADAMW_BYTES_PER_PARAM per LoRA parameter: it reads weight, gradient and both moments and
writes weight and both moments, all float32. Gradient checkpointing is not counted: rentrain.speed_model takes its
measured factor. fp8_base's weight upcasts are not counted here either: rentrain/step_work.py adds them.

Six cases per family separate the parts that rentrain/step_work.py scales: the reference settings (SD 1.5
512px batch 4, UNet + text encoder LoRA; SDXL 1024px batch 2, UNet LoRA; dim 32), batch 1, LoRA dim 64, and
the text encoder toggled (at both batch sizes). --constants prints the table for rentrain/step_work.py.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ADAMW_BYTES_PER_PARAM = 7 * 4  # fused AdamW: reads weight, gradient, two moments; writes weight, two moments
REFERENCE_RANK = 32
REFERENCE = {  # family: (resolution, batch, trains the text encoder): bench/train_speed.py's cases
    "sd15": (512, 4, True),
    "sdxl": (1024, 2, False),
    "flux": (1024, 2, False),  # counted here; rentrain.speed_model fits its fraction to the H100 runs
}
# Flux.1 [dev] on the meta device: diffusers' FluxTransformer2DModel (default config, guidance embedding on),
# the T5-XXL encoder of google/t5-v1_1-xxl (the one FLUX.1 ships), CLIP-L. Text-encoder outputs are cached
# (T5 at its 512 tokens); a trained text encoder means CLIP-L's LoRA, with T5 run frozen every step.
FLUX_T5 = dict(
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    vocab_size=32128,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
)
FLUX_TEXT_TOKENS = 512
FLUX_PIXELS_PER_TOKEN = 16 * 16  # 8x VAE downsampling, then 2x2 patches
# fp8_base's extra work (rentrain/step_work.py) takes the count of the frozen Linears:
FLUX_FROZEN_LINEAR_PARAMS = 11_898_322_944  # the transformer's Linear weights (flux_report() counts them)
FLUX_FROZEN_LINEARS = 504


@dataclass(frozen=True)
class Case:
    family: str
    batch: int
    rank: int
    text_encoder: bool


@dataclass(frozen=True)
class Work:
    flop: float  # matrix products, convolutions, attention
    attention_flop: float  # of which attention (grows with tokens squared)
    bytes: float  # every other kernel's reads and writes, plus the optimizer's
    matrix_bytes: float  # the matrix operations' own reads and writes (not in the model)
    kernels: int
    lora_params: int
    other_by_op: dict[str, tuple[int, int]] = field(default_factory=dict)  # operation: (bytes, calls)


def cases(family: str) -> list[Case]:
    _, batch, te = REFERENCE[family]
    return [
        Case(family, batch, REFERENCE_RANK, te),
        Case(family, 1, REFERENCE_RANK, te),
        Case(family, batch, 2 * REFERENCE_RANK, te),
        Case(family, 1, 2 * REFERENCE_RANK, te),
        Case(family, batch, REFERENCE_RANK, not te),
        Case(family, 1, REFERENCE_RANK, not te),
    ]


def distinct_bytes(tensor: Any) -> int:
    """Bytes of the distinct elements a kernel touches: broadcast (stride 0) dimensions count once."""
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride(), strict=True):
        if stride != 0:
            elements *= size
    return elements * tensor.element_size()


class Counter:
    """FLOPs (FlopCounterMode), bytes of the other kernels, and kernels, of what runs inside ``with counter:``,
    with every scaled_dot_product_attention run as one flash-attention kernel forward and one backward, and
    every rms_norm as one fused kernel forward and one backward, as on CUDA."""

    def __init__(self) -> None:
        import torch
        import torch.nn.functional as F
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        from torch.utils.flop_counter import FlopCounterMode, flop_registry

        from bench.count_ops import NO_KERNEL

        aten = torch.ops.aten
        counted_kernels()

        class FlashAttention(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v, scale):  # type: ignore[override]
                out, lse, cq, ck, mq, mk, seed, offset, _ = aten._scaled_dot_product_flash_attention(
                    q, k, v, scale=scale
                )
                ctx.save_for_backward(q, k, v, out, lse)
                ctx.rest = (cq, ck, mq, mk, seed, offset, scale)
                return out

            @staticmethod
            def backward(ctx, grad):  # type: ignore[override]
                q, k, v, out, lse = ctx.saved_tensors
                cq, ck, mq, mk, seed, offset, scale = ctx.rest
                dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
                    grad.contiguous(), q, k, v, out, lse, cq, ck, mq, mk, 0.0, False, seed, offset, scale=scale
                )
                return dq, dk, dv, None

        class FusedRMSNorm(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, shape, weight, eps):  # type: ignore[override]
                y, rstd = torch.ops.step_work._fused_rms_norm(x, shape, weight, eps)
                ctx.save_for_backward(x, weight, rstd)
                ctx.shape = shape
                return y

            @staticmethod
            def backward(ctx, grad):  # type: ignore[override]
                x, weight, rstd = ctx.saved_tensors
                wanted = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[2]]
                dx, dweight = aten._fused_rms_norm_backward(grad, x, ctx.shape, rstd, weight, wanted)
                return dx, None, dweight, None

        class AsCuda(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is F.scaled_dot_product_attention:
                    # diffusers' attention dispatch (Flux) passes query, key and value by name
                    named = (kwargs.pop("query", None), kwargs.pop("key", None), kwargs.pop("value", None))
                    q, k, v = args[:3] if len(args) >= 3 else named
                    return FlashAttention.apply(q, k, v, kwargs.get("scale"))
                if func is F.rms_norm:
                    given = inspect.signature(F.rms_norm).bind(*args, **kwargs).arguments
                    shape = list(given["normalized_shape"])
                    return FusedRMSNorm.apply(given["input"], shape, given.get("weight"), given.get("eps"))
                return func(*args, **kwargs)

        counter = self

        class Bytes(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func.overloadpacket.__name__ in NO_KERNEL:
                    return out
                counter.kernels += 1
                tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
                moved = sum(distinct_bytes(t) for t in tensors)
                if func.overloadpacket in flop_registry:
                    counter.matrix_bytes += moved
                else:
                    counter.other_bytes += moved
                    name = func.overloadpacket.__name__
                    counter.other_by_op[name] = counter.other_by_op.get(name, 0) + moved
                    counter.calls_by_op[name] = counter.calls_by_op.get(name, 0) + 1
                return out

        self.other_bytes = 0
        self.other_by_op: dict[str, int] = {}  # the other kernels' bytes, by operation
        self.calls_by_op: dict[str, int] = {}
        self.matrix_bytes = 0
        self.kernels = 0
        self.attention_ops = {p for p in flop_registry if "attention" in str(p)}
        self.flops = FlopCounterMode(display=False)
        self.modes = [AsCuda(), self.flops, Bytes()]

    def __enter__(self) -> Counter:
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self.modes):
            mode.__exit__(*exc)

    @property
    def flop(self) -> float:
        return float(self.flops.get_total_flops())

    @property
    def attention_flop(self) -> float:
        counts = self.flops.get_flop_counts()["Global"]
        return float(sum(n for op, n in counts.items() if op in self.attention_ops))


def count(case: Case) -> Work:
    if case.family == "flux":
        return count_flux(case, REFERENCE["flux"][0]).work
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bench.train_speed import CLIP_BIG_G, CLIP_L, SD15_UNET, SDXL_UNET
    from remote.trainer.lora import LoRANetwork

    resolution, _, _ = REFERENCE[case.family]
    latent = resolution // 8
    with torch.device("meta"):
        if case.family == "sd15":
            unet = UNet2DConditionModel(**SD15_UNET)
            encoders: list[Any] = [CLIPTextModel(CLIPTextConfig(**CLIP_L))]
        else:
            unet = UNet2DConditionModel(**SDXL_UNET)
            encoders = [
                CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G)),
            ]
        unet.to(torch.bfloat16).requires_grad_(False)
        for encoder in encoders:
            encoder.to(torch.bfloat16).requires_grad_(False)
        network = LoRANetwork(unet, encoders if case.text_encoder else [], case.family, case.rank, case.rank / 2)
        network.apply_to()
        network.to("meta", torch.float32)
        flat = network.use_flat_buffers(torch.bfloat16)
        lora_params = sum(p.numel() for p in network.parameters())
        b = case.batch
        latents = torch.randn(b, 4, latent, latent, dtype=torch.bfloat16)
        ids = torch.randint(0, 49408, (b, 77))
        timesteps = torch.randint(0, 1000, (b,))
        with Counter() as counter:
            flat.begin_micro_batch()
            extra: dict[str, Any] = {}
            if case.family == "sd15":
                context = (
                    encoders[0](ids).last_hidden_state
                    if case.text_encoder
                    else torch.randn(b, 77, 768, dtype=torch.bfloat16)
                )
            else:
                if case.text_encoder:
                    h1 = encoders[0](ids, output_hidden_states=True).hidden_states[-2]
                    out2 = encoders[1](ids, output_hidden_states=True)
                    context, pooled = torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds
                else:
                    context = torch.randn(b, 77, 2048, dtype=torch.bfloat16)
                    pooled = torch.randn(b, 1280, dtype=torch.bfloat16)
                time_ids = torch.randn(b, 6, dtype=torch.bfloat16)
                extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
            prediction = unet(latents, timesteps, encoder_hidden_states=context, **extra).sample
            loss = F.mse_loss(prediction.float(), latents.float())
            loss.backward()
            flat.end_micro_batch()
            flat.clip_grad_norm_(1.0)
    return Work(
        flop=counter.flop,
        attention_flop=counter.attention_flop,
        bytes=float(counter.other_bytes + ADAMW_BYTES_PER_PARAM * lora_params),
        matrix_bytes=float(counter.matrix_bytes),
        kernels=counter.kernels,
        lora_params=lora_params,
        other_by_op={op: (n, counter.calls_by_op[op]) for op, n in counter.other_by_op.items()},
    )


@functools.cache
def counted_kernels() -> Any:
    """Operators (torch.ops.step_work) for kernels that the meta device cannot run as one: the trainer's Triton
    rotary kernel, and CUDA's fused RMSNorm forward (aten._fused_rms_norm, which the meta device decomposes).
    Each gives its outputs' shapes, and the byte count takes its tensors in and out, as for any other kernel.
    Cached, so that the operators stay registered."""
    import torch

    library = torch.library.Library("step_work", "DEF")
    library.define("rotary(Tensor x, Tensor cos, Tensor sin, bool backward) -> Tensor")
    library.impl("rotary", lambda x, cos, sin, backward: torch.empty_like(x), "Meta")
    library.define(
        "_fused_rms_norm(Tensor input, int[] normalized_shape, Tensor? weight, float? eps) -> (Tensor, Tensor)"
    )
    library.impl("_fused_rms_norm", torch.ops.aten._fused_rms_norm, "Meta")
    return library


def counted_rotate(x: Any, cos: Any, sin: Any, backward: bool) -> Any:
    """remote/trainer/rotary.py's ``_rotate`` with its Triton launch as one counted kernel, same arguments."""
    import torch

    return torch.ops.step_work.rotary(x.contiguous(), cos.float().contiguous(), sin.float().contiguous(), backward)


@contextlib.contextmanager
def trainer_rotary() -> Iterator[None]:
    """diffusers' Flux.1 ``apply_rotary_emb`` routed through remote/trainer/rotary.py, as the trainer does on
    CUDA, with the kernel launch counted by counted_rotate (inside a Counter)."""
    from unittest import mock

    from remote.trainer import rotary

    module = importlib.import_module(rotary.FLUX_MODULE)
    current = module.apply_rotary_emb
    routed = rotary.fused_apply_rotary_emb(getattr(current, "original", current))
    with mock.patch.object(rotary, "_rotate", counted_rotate), mock.patch.object(module, "apply_rotary_emb", routed):
        yield


@dataclass(frozen=True)
class FluxCount:
    work: Work
    forward_flop: float  # of the transformer's forward alone (gradient checkpointing runs it again)
    saved_bytes: float  # activations kept for the backward pass (weights left out)
    block_input_bytes: float  # the blocks' inputs: what per-block gradient checkpointing keeps instead
    largest_block_bytes: float  # one block's saved activations: recomputed during a checkpointed backward
    frozen_linear_params: int
    frozen_linears: int


class SimpleLoRA:
    """kohya's LoRA on a module set, for counting: each group of Linears (kohya's one fused layer) shares one down
    projection (computed once per input) and has an up projection per member."""

    def __init__(self, root: Any, groups: list[list[str]], rank: int) -> None:
        import torch

        self.params: list[Any] = []
        for members in groups:
            layers = [root.get_submodule(name) for name in members]
            down = torch.nn.Linear(layers[0].in_features, rank, bias=False, dtype=torch.bfloat16)
            cache: dict[str, Any] = {}
            for layer in layers:
                up = torch.nn.Linear(rank, layer.out_features, bias=False, dtype=torch.bfloat16)
                self.params += [up.weight]
                layer.register_forward_hook(self._hook(down, up, cache))
            self.params += [down.weight]

    @staticmethod
    def _hook(down: Any, up: Any, cache: dict[str, Any]) -> Any:
        def hook(module: Any, args: tuple[Any, ...], out: Any) -> Any:
            x = args[0]
            if cache.get("input") is not x:
                cache["input"], cache["down"] = x, down(x)
            return out + up(cache["down"])

        return hook

    @property
    def param_count(self) -> int:
        return sum(p.numel() for p in self.params)


def flux_groups(transformer: Any) -> list[list[str]]:
    """kohya's lora_flux module set over diffusers' layers (remote/trainer/families/flux_keys.py)."""
    from remote.trainer.families.flux_keys import DOUBLE_BLOCK_TARGETS, SINGLE_BLOCK_TARGETS

    groups = []
    for prefix, targets, blocks in (
        ("transformer_blocks", DOUBLE_BLOCK_TARGETS, transformer.transformer_blocks),
        ("single_transformer_blocks", SINGLE_BLOCK_TARGETS, transformer.single_transformer_blocks),
    ):
        for index in range(len(blocks)):
            groups += [[f"{prefix}.{index}.{member}" for member in members] for _, members in targets]
    return groups


def clip_groups(encoder: Any) -> list[list[str]]:
    """kohya's text-encoder module set: the Linears of every CLIP attention and MLP."""
    import torch

    return [[name] for name, m in encoder.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in name]


class SavedActivations:
    """Bytes of the tensors autograd keeps for the backward pass (distinct storages; weights left out), in all
    and per transformer block, and the blocks' inputs."""

    def __init__(self, blocks: list[Any], weights: list[Any]) -> None:
        self.weights = {w.untyped_storage()._cdata for w in weights}
        self.seen: set[int] = set()
        self.total = 0
        self.per_block: list[int] = []
        self.block_inputs = 0
        for block in blocks:
            block.register_forward_pre_hook(self._enter, with_kwargs=True)
            block.register_forward_hook(self._leave)

    def _enter(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch

        inputs = [*args, kwargs.get("hidden_states"), kwargs.get("encoder_hidden_states")]
        self.block_inputs += sum(t.nbytes for t in inputs if isinstance(t, torch.Tensor))
        self.per_block.append(-self.total)

    def _leave(self, module: Any, args: tuple[Any, ...], out: Any) -> None:
        self.per_block[-1] += self.total

    def pack(self, tensor: Any) -> Any:
        key = tensor.untyped_storage()._cdata
        if key not in self.weights and key not in self.seen:
            self.seen.add(key)
            self.total += tensor.untyped_storage().nbytes()
        return tensor


def count_flux(case: Case, resolution: int) -> FluxCount:
    """One Flux.1 [dev] training step at ``resolution`` (square): the transformer's forward, the flow loss, the
    backward, the LoRA's AdamW update, as count() does for the UNets."""
    import torch
    import torch.nn.functional as F
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from bench.train_speed import CLIP_L

    side = resolution // 16
    image_tokens, b = side * side, case.batch
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True).to(torch.bfloat16).requires_grad_(False)
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L)).to(torch.bfloat16).requires_grad_(False)
        t5 = T5EncoderModel(T5Config(**FLUX_T5)).to(torch.bfloat16).requires_grad_(False)
        lora = SimpleLoRA(transformer, flux_groups(transformer), case.rank)
        if case.text_encoder:
            clip_lora = SimpleLoRA(clip, clip_groups(clip), case.rank)
            lora.params += clip_lora.params
        for param in lora.params:
            param.requires_grad_(True)
        linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        saved = SavedActivations(blocks, list(transformer.parameters()))
        latents = torch.randn(b, image_tokens, 64, dtype=torch.bfloat16)
        noise = torch.randn_like(latents)
        img_ids = torch.zeros(image_tokens, 3, dtype=torch.bfloat16)
        txt_ids = torch.zeros(FLUX_TEXT_TOKENS, 3, dtype=torch.bfloat16)
        timesteps = torch.rand(b, dtype=torch.bfloat16)
        guidance = torch.full((b,), 3.5, dtype=torch.bfloat16)
        ids = torch.randint(0, 49408, (b, 77))
        t5_ids = torch.randint(0, 32128, (b, FLUX_TEXT_TOKENS))
        with Counter() as counter, trainer_rotary():
            if case.text_encoder:
                pooled = clip(ids).pooler_output
                with torch.no_grad():
                    context = t5(t5_ids).last_hidden_state
            else:
                pooled = torch.randn(b, 768, dtype=torch.bfloat16)
                context = torch.randn(b, FLUX_TEXT_TOKENS, 4096, dtype=torch.bfloat16)
            before = counter.flop
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                prediction = transformer(
                    latents, context, pooled, timesteps, img_ids, txt_ids, guidance, return_dict=False
                )[0]
            forward_flop = counter.flop - before
            loss = F.mse_loss(prediction.float(), (noise - latents).float())
            loss.backward()
    work = Work(
        flop=counter.flop,
        attention_flop=counter.attention_flop,
        bytes=float(counter.other_bytes + ADAMW_BYTES_PER_PARAM * lora.param_count),
        matrix_bytes=float(counter.matrix_bytes),
        kernels=counter.kernels,
        lora_params=lora.param_count,
        other_by_op={op: (n, counter.calls_by_op[op]) for op, n in counter.other_by_op.items()},
    )
    return FluxCount(
        work=work,
        forward_flop=forward_flop,
        saved_bytes=float(saved.total),
        block_input_bytes=float(saved.block_inputs),
        largest_block_bytes=float(max(saved.per_block)),
        frozen_linear_params=sum(m.weight.numel() for m in linears),
        frozen_linears=len(linears),
    )


def flux_report() -> None:
    """Flux.1's figures for remote/trainer/families/facts.py (parameters, LoRA per dim, activations) and a check
    of rentrain/step_work.py's token-scaling rule against direct counts at 512 and 1024 px, batch 1, dim 16."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from bench.train_speed import CLIP_L
    from rentrain.step_work import step_work

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)
        t5 = T5EncoderModel(T5Config(**FLUX_T5))
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    lora_per_dim = SimpleLoRA(transformer, flux_groups(transformer), 1).param_count
    clip_per_dim = SimpleLoRA(clip, clip_groups(clip), 1).param_count
    count_of = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"transformer {count_of(transformer)}, T5-XXL encoder {count_of(t5)}, CLIP-L {count_of(clip)}")
    print(f"LoRA per dim: transformer {lora_per_dim}, CLIP-L {clip_per_dim}")
    for resolution in (512, 1024):
        flux = count_flux(Case("flux", 1, 16, False), resolution)
        modelled = step_work("flux", resolution * resolution, 1, 16, False)
        w = flux.work
        print(
            f"flux {resolution}px b1 dim 16: {w.flop / 1e12:.2f} TFLOP ({w.attention_flop / 1e12:.2f} attention; "
            f"forward {flux.forward_flop / 1e12:.2f}), {w.bytes / 1e9:.1f} GB, {w.kernels} kernels; rule: "
            f"{modelled.flop / 1e12:.2f} TFLOP, {modelled.bytes / 1e9:.1f} GB, {modelled.kernels:.0f} kernels; "
            f"saved activations {flux.saved_bytes / 2**30:.2f} GiB, block inputs {flux.block_input_bytes / 2**30:.2f} "
            f"GiB, largest block {flux.largest_block_bytes / 2**30:.2f} GiB; frozen Linears {flux.frozen_linears} "
            f"holding {flux.frozen_linear_params} weights"
        )


def count_inference(batch: int = 32) -> Work:
    """The SD 1.5 UNet's forward at 512px in fp16, no LoRA: one iteration of the diffusers benchmark that
    docs/costs.md uses to compare cards (batch 16 with classifier-free guidance = 32 samples per call)."""
    import torch
    from diffusers import UNet2DConditionModel

    from bench.train_speed import SD15_UNET

    with torch.device("meta"), torch.no_grad():
        unet = UNet2DConditionModel(**SD15_UNET).half()
        latents = torch.randn(batch, 4, 64, 64, dtype=torch.half)
        context = torch.randn(batch, 77, 768, dtype=torch.half)
        timesteps = torch.randint(0, 1000, (batch,))
        with Counter() as counter:
            unet(latents, timesteps, encoder_hidden_states=context)
    return Work(
        counter.flop,
        counter.attention_flop,
        float(counter.other_bytes),
        float(counter.matrix_bytes),
        counter.kernels,
        0,
    )


# bench/train_speed.py's cases: (family, resolution, batch, text encoder trained, case)
PREDICTED = (
    ("sd15", 512, 4, True, "sd15"),
    ("sd15", 512, 4, False, "sd15-unet"),
    ("sd15", 512, 1, True, "sd15-b1"),
    ("sd15", 768, 2, True, "sd15-768"),
    ("sdxl", 1024, 2, False, "sdxl"),
    ("sdxl", 1024, 1, False, "sdxl-b1"),
)


def predict() -> None:
    """The model's step time (never a measured figure) on the H100 SXM and H200 for each train_speed.py run."""
    from rentrain.gpu_specs import spec_for
    from rentrain.job_profile import JobProfile
    from rentrain.speed_model import modelled_step

    print("| bench/train_speed.py case | H100 SXM modelled ms (range) | H200 modelled ms (range) |\n|---|---|---|")
    for family, resolution, batch, te, case in PREDICTED:
        profile = JobProfile(
            family=family, steps=1, batch_size=batch, resolution=(resolution, resolution), trains_text_encoder=te
        )
        cells = []
        for gpu in ("H100 SXM", "H200"):
            spec = spec_for(gpu)
            assert spec is not None
            speed = modelled_step(spec, profile, family)
            cells.append(f"{speed.seconds_per_step * 1e3:.1f} ({speed.low * 1e3:.1f}-{speed.high * 1e3:.1f})")
        print(f"| {case} | {cells[0]} | {cells[1]} |")


def by_op(family: str, top: int = 16) -> None:
    """The reference step's non-matrix kernels by operation, largest first: where its memory traffic goes."""
    case = cases(family)[0]
    work = count(case)
    other = sum(n for n, _ in work.other_by_op.values())
    print(f"{label(case)}: {other / 1e9:.1f} GB moved by the other kernels ({work.kernels:,} kernels in all)")
    print("| operation | GB | share | calls |\n|---|---|---|---|")
    ranked = sorted(work.other_by_op.items(), key=lambda item: -item[1][0])
    for name, (moved, calls) in ranked[:top]:
        print(f"| {name} | {moved / 1e9:.1f} | {moved / other:.0%} | {calls:,} |")


def label(case: Case) -> str:
    resolution = REFERENCE[case.family][0]
    parts = "UNet+TE" if case.text_encoder else "UNet only"
    return f"{case.family} {resolution}px b{case.batch}, {parts}, dim {case.rank}"


def constants(family: str, works: dict[Case, Work]) -> str:
    """The FamilyWork literal of rentrain/step_work.py: fixed and per-sample parts, slopes per LoRA dim unit,
    and the text encoder's part (its sign: added when the reference leaves it out, else removed)."""
    ref_case, b1, r2, r2b1, te, teb1 = cases(family)
    batch = ref_case.batch

    def split(big: Work, small: Work) -> tuple[dict[str, float], dict[str, float]]:
        per = {k: (getattr(big, k) - getattr(small, k)) / (batch - 1) for k in ("flop", "attention_flop", "bytes")}
        fixed = {k: getattr(small, k) - per[k] for k in per}
        return fixed, per

    fixed, per = split(works[ref_case], works[b1])
    fixed_r, per_r = split(works[r2], works[r2b1])
    fixed_t, per_t = split(works[te], works[teb1])
    sign = -1.0 if ref_case.text_encoder else 1.0
    kernels_per_sample = (works[ref_case].kernels - works[b1].kernels) / (batch - 1)
    values = {
        "fixed_flop": fixed["flop"],
        "fixed_bytes": fixed["bytes"],
        "sample_flop": per["flop"] - per["attention_flop"],
        "sample_attention_flop": per["attention_flop"],
        "sample_bytes": per["bytes"],
        "rank_fixed_bytes": (fixed_r["bytes"] - fixed["bytes"]) / REFERENCE_RANK,
        "rank_sample_flop": (per_r["flop"] - per["flop"]) / REFERENCE_RANK,
        "rank_sample_bytes": (per_r["bytes"] - per["bytes"]) / REFERENCE_RANK,
        "text_encoder_fixed_flop": sign * (fixed_t["flop"] - fixed["flop"]),
        "text_encoder_fixed_bytes": sign * (fixed_t["bytes"] - fixed["bytes"]),
        "text_encoder_sample_flop": sign * (per_t["flop"] - per["flop"]),
        "text_encoder_sample_bytes": sign * (per_t["bytes"] - per["bytes"]),
    }
    resolution, _, te_ref = REFERENCE[family]
    lines = [
        f'    "{family}": FamilyWork(',
        f"        reference_pixels={resolution * resolution},",
        f"        reference_batch={batch},",
        f"        reference_rank={REFERENCE_RANK},",
        f"        reference_trains_text_encoder={te_ref},",
        f"        kernels={works[b1].kernels - kernels_per_sample:.0f},",
        f"        kernels_per_sample={kernels_per_sample:.0f},",
        f"        text_encoder_kernels={abs(works[teb1].kernels - works[b1].kernels)},",
    ]
    # + 0.0: no "-0"; "e08" rather than "e+08", as the formatter writes literals
    if family == "flux":
        values["frozen_linear_params"] = FLUX_FROZEN_LINEAR_PARAMS
        values["frozen_linears"] = FLUX_FROZEN_LINEARS
        lines += [f"        text_tokens={FLUX_TEXT_TOKENS},", f"        pixels_per_token={FLUX_PIXELS_PER_TOKEN},"]
    lines += [f"        {name}={f'{value + 0.0:.4g}'.replace('e+', 'e')}," for name, value in values.items()]
    return "\n".join([*lines, "    ),"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["sd15", "sdxl", "flux", "all"], default="all")
    parser.add_argument(
        "--flux", action="store_true", help="only Flux.1's parameter counts, activations and scaling-rule check"
    )
    parser.add_argument("--constants", action="store_true", help="also print rentrain/step_work.py's table")
    parser.add_argument(
        "--inference", action="store_true", help="only the SD 1.5 UNet forward of the diffusers benchmark (b32, fp16)"
    )
    parser.add_argument(
        "--predict", action="store_true", help="only the model's H100 / H200 step times for train_speed.py's runs"
    )
    parser.add_argument(
        "--by-op",
        choices=["sd15", "sdxl", "flux"],
        help="only this family's reference step: the other kernels' bytes and calls, by operation",
    )
    args = parser.parse_args()
    if args.by_op:
        by_op(args.by_op)
        return 0
    if args.predict:
        predict()
        return 0
    if args.flux:
        flux_report()
        return 0
    if args.inference:
        work = count_inference()
        print(
            f"SD 1.5 UNet forward, 512px, batch 32, fp16: {work.flop / 1e12:.3f} TFLOP, {work.bytes / 1e9:.2f} GB "
            f"moved by the non-matrix kernels ({work.matrix_bytes / 1e9:.2f} GB by the matrix ones), "
            f"{work.kernels} kernels"
        )
        return 0
    families = ["sd15", "sdxl", "flux"] if args.family == "all" else [args.family]
    print("| case | TFLOP | of which attention | GB moved (other kernels + AdamW) | GB (matrix ops) | kernels |")
    print("|---|---|---|---|---|---|")
    works: dict[Case, Work] = {}
    for family in families:
        for case in cases(family):
            work = works[case] = count(case)
            print(
                f"| {label(case)} | {work.flop / 1e12:.3f} | {work.attention_flop / 1e12:.3f} | "
                f"{work.bytes / 1e9:.2f} | {work.matrix_bytes / 1e9:.2f} | {work.kernels} |",
                flush=True,
            )
    if args.constants:
        print()
        for family in families:
            print(constants(family, works))
    return 0


if __name__ == "__main__":
    sys.exit(main())
