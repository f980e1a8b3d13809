"""The channels_last GroupNorm kernels on a GPU: error against float64, and time against PyTorch's GroupNorm.

    python bench/group_norm_check.py

For the GroupNorm shapes of SD 1.5 (512px, batch 4) and SDXL (1024px, batch 2), in bf16: the mean absolute
error of the output and of the input gradient against a float64 reference, for the kernels
(remote/trainer/group_norm.py) and for PyTorch's own GroupNorm; and the time of forward + backward, for
the kernels on channels_last input and for PyTorch's GroupNorm on channels_last input (its layout copies
included) and on NCHW input. Also the kernels' first-call (compile) time. Prints one Markdown table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (label, batch, channels, height, width): every distinct GroupNorm input of the two UNets
SHAPES = [
    ("SD 1.5 64x64 c320", 4, 320, 64, 64),
    ("SD 1.5 32x32 c640", 4, 640, 32, 32),
    ("SD 1.5 16x16 c1280", 4, 1280, 16, 16),
    ("SD 1.5 8x8 c1280", 4, 1280, 8, 8),
    ("SDXL 128x128 c320", 2, 320, 128, 128),
    ("SDXL 64x64 c640", 2, 640, 64, 64),
    ("SDXL 32x32 c1280", 2, 1280, 32, 32),
    ("SDXL 128x128 c960", 2, 960, 128, 128),
]


def main() -> int:
    import torch
    import torch.nn.functional as F

    from remote.trainer.group_norm import ChannelsLastGroupNorm

    def timed(fn, repeats: int = 50) -> float:
        fn()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - started) / repeats * 1e6

    rows = []
    compile_started = time.perf_counter()
    x = torch.randn(1, 64, 8, 8, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ChannelsLastGroupNorm.apply(
        x.requires_grad_(True),
        32,
        torch.ones(64, device="cuda", dtype=torch.bfloat16),
        torch.zeros(64, device="cuda", dtype=torch.bfloat16),
        1e-5,
    ).sum().backward()
    torch.cuda.synchronize()
    compile_seconds = time.perf_counter() - compile_started

    for label, n, c, h, w in SHAPES:
        torch.manual_seed(0)
        base = (torch.randn(n, c, h, w, device="cuda") * 2 + 0.5).to(torch.bfloat16)
        weight = torch.randn(c, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(c, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16)
        reference_x = base.double().requires_grad_(True)
        reference = F.group_norm(reference_x, 32, weight.double(), bias.double(), 1e-5)
        reference.backward(grad.double())

        def ours(keep: list | None = None, base=base, weight=weight, bias=bias, grad=grad):
            x = base.contiguous(memory_format=torch.channels_last).requires_grad_(True)
            out = ChannelsLastGroupNorm.apply(x, 32, weight, bias, 1e-5)
            out.backward(grad.contiguous(memory_format=torch.channels_last))
            if keep is not None:
                keep += [out, x.grad]

        def native(layout, keep: list | None = None, base=base, weight=weight, bias=bias, grad=grad):
            x = base.contiguous(memory_format=layout).requires_grad_(True)
            out = F.group_norm(x, 32, weight, bias, 1e-5)
            out.backward(grad.contiguous(memory_format=layout))
            if keep is not None:
                keep += [out, x.grad]

        mine: list = []
        ours(mine)
        theirs: list = []
        native(torch.contiguous_format, theirs)
        errors = [
            (result.double() - expected).abs().mean().item()
            for result, expected in zip(mine + theirs, [reference, reference_x.grad] * 2, strict=True)
        ]
        rows.append(
            (
                label,
                *errors,
                timed(ours),
                timed(lambda: native(torch.channels_last)),
                timed(lambda: native(torch.contiguous_format)),
            )
        )

    print(
        f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}; "
        f"kernels' first call (compile) {compile_seconds:.1f} s"
    )
    print(
        "| shape (bf16, 32 groups) | output error: kernels | PyTorch | input-gradient error: kernels | PyTorch "
        "| fwd+bwd us: kernels (channels_last) | PyTorch, channels_last input | PyTorch, NCHW input |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, out_ours, grad_ours, out_native, grad_native, t_ours, t_cl, t_nchw in rows:
        print(
            f"| {label} | {out_ours:.2e} | {out_native:.2e} | {grad_ours:.2e} | {grad_native:.2e} "
            f"| {t_ours:.0f} | {t_cl:.0f} | {t_nchw:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
