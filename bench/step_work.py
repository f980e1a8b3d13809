"""The work of one training step of rentrain's trainer, counted without a GPU: FLOPs, bytes moved, kernels.

    python bench/step_work.py [--family sd15|sdxl|all] [--constants]
    python bench/step_work.py --inference    # the diffusers benchmark's UNet call (docs/costs.md)
    python bench/step_work.py --predict      # the model's H100 / H200 times for bench/train_speed.py's runs

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
memory). The AdamW update is not run (torch's fused AdamW cannot run on the meta device); its bytes are added
as ADAMW_BYTES_PER_PARAM per LoRA parameter: it reads weight, gradient and both moments and writes weight and
both moments, all float32. Gradient checkpointing is not counted: rentrain.speed_model takes its measured factor.

Six cases per family separate the parts that rentrain/step_work.py scales: the reference settings (SD 1.5
512px batch 4, UNet + text encoder LoRA; SDXL 1024px batch 2, UNet LoRA; dim 32), batch 1, LoRA dim 64, and
the text encoder toggled (at both batch sizes). --constants prints the table for rentrain/step_work.py.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ADAMW_BYTES_PER_PARAM = 7 * 4  # fused AdamW: reads weight, gradient, two moments; writes weight, two moments
REFERENCE_RANK = 32
REFERENCE = {  # family: (resolution, batch, trains the text encoder): bench/train_speed.py's cases
    "sd15": (512, 4, True),
    "sdxl": (1024, 2, False),
}


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
    with every scaled_dot_product_attention run as one flash-attention kernel forward and one backward."""

    def __init__(self) -> None:
        import torch
        import torch.nn.functional as F
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        from torch.utils.flop_counter import FlopCounterMode, flop_registry

        from bench.count_ops import NO_KERNEL

        aten = torch.ops.aten

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

        class AsFlash(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is F.scaled_dot_product_attention:
                    q, k, v = args[:3]
                    return FlashAttention.apply(q, k, v, kwargs.get("scale"))
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
                return out

        self.other_bytes = 0
        self.matrix_bytes = 0
        self.kernels = 0
        self.attention_ops = {p for p in flop_registry if "attention" in str(p)}
        self.flops = FlopCounterMode(display=False)
        self.modes = [AsFlash(), self.flops, Bytes()]

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
            speed = modelled_step(spec, profile)
            cells.append(f"{speed.seconds_per_step * 1e3:.1f} ({speed.low * 1e3:.1f}-{speed.high * 1e3:.1f})")
        print(f"| {case} | {cells[0]} | {cells[1]} |")


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
    lines += [f"        {name}={f'{value + 0.0:.4g}'.replace('e+', 'e')}," for name, value in values.items()]
    return "\n".join([*lines, "    ),"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["sd15", "sdxl", "all"], default="all")
    parser.add_argument("--constants", action="store_true", help="also print rentrain/step_work.py's table")
    parser.add_argument(
        "--inference", action="store_true", help="only the SD 1.5 UNet forward of the diffusers benchmark (b32, fp16)"
    )
    parser.add_argument(
        "--predict", action="store_true", help="only the model's H100 / H200 step times for train_speed.py's runs"
    )
    args = parser.parse_args()
    if args.predict:
        predict()
        return 0
    if args.inference:
        work = count_inference()
        print(
            f"SD 1.5 UNet forward, 512px, batch 32, fp16: {work.flop / 1e12:.3f} TFLOP, {work.bytes / 1e9:.2f} GB "
            f"moved by the non-matrix kernels ({work.matrix_bytes / 1e9:.2f} GB by the matrix ones), "
            f"{work.kernels} kernels"
        )
        return 0
    families = ["sd15", "sdxl"] if args.family == "all" else [args.family]
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
