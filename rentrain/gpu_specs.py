"""What each GPU model can do on paper: dense bf16 tensor throughput, memory bandwidth and memory, one row per
model and memory size, each with its source (docs/costs.md explains how rentrain.speed_model uses them).

bf16_tflops is the dense (no sparsity) rate of 16-bit tensor products with float32 accumulation, the rate
PyTorch's bf16 matrix products and convolutions run at. Datasheets quote the sparse rate (halved here) or, for
FP8, a rate twice the 16-bit one; GeForce cards accumulate in float32 at half their headline FP16 rate (the
architecture whitepapers list both), so their row has the float32-accumulate figure. The figures were taken
from the named NVIDIA documents (public on nvidia.com); rows of kind "derived" apply the stated rule to them.

Cards without bf16 tensor cores (Turing: Quadro RTX 6000, Titan RTX; Pascal: Tesla P40) are left out: the
trainer's bf16 path is not what they run well, so they get no speed figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SpecKind = Literal["published", "derived"]

# How well a card's tensor cores are kept busy by a training step, relative to the Hopper cards the trainer
# was measured on (rentrain.speed_model.EFFICIENCY gives each class its factor and the evidence for it).
EfficiencyClass = Literal["hopper", "datacenter", "pro", "geforce"]


@dataclass(frozen=True)
class GpuSpec:
    model: str  # as providers/gpu_names.py normalises it
    vram_gb: float
    bf16_tflops: float  # dense, float32 accumulation
    bandwidth_gbs: float
    efficiency_class: EfficiencyClass
    kind: SpecKind
    source: str


_GA102 = "NVIDIA Ampere GA102 GPU Architecture whitepaper (v2.1), appendix table"
_ADA = "NVIDIA Ada GPU Architecture whitepaper (v2.1), appendix table"
_BLACKWELL = "NVIDIA RTX Blackwell GPU Architecture whitepaper (v1.0), appendix table"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet: BF16 624 TFLOPS sparse"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet"
_ADA_PRO = "4 x its FP32 TFLOPS (as in the RTX 6000 / 5000 Ada datasheets, whose tensor figures are 4x FP32 dense)"

GPU_SPECS: tuple[GpuSpec, ...] = (
    GpuSpec("RTX 3090", 24, 71.0, 936, "geforce", "published", f"{_GA102}: FP16/BF16 tensor, FP32 accumulate"),
    GpuSpec(
        "RTX 3090 Ti",
        24,
        79.9,
        1008,
        "geforce",
        "derived",
        "RTX 3090's 71 x (84 SMs x 1.86 GHz) / (82 SMs x 1.695 GHz), from the GeForce RTX 3090 Ti product page "
        "(10,752 CUDA cores, 1.86 GHz boost, 21 Gbps GDDR6X on 384 bits = 1,008 GB/s)",
    ),
    GpuSpec("RTX 4090", 24, 165.2, 1008, "geforce", "published", f"{_ADA}: FP16/BF16 tensor, FP32 accumulate"),
    GpuSpec(
        "RTX 4090D",
        24,
        147.1,
        1008,
        "geforce",
        "derived",
        "RTX 4090's 165.2 x 114 / 128 SMs (GeForce RTX 4090 D product page: 14,592 CUDA cores, 2.52 GHz boost, "
        "the 4090's memory)",
    ),
    GpuSpec("RTX 5090", 32, 209.5, 1792, "geforce", "published", f"{_BLACKWELL}: FP16/BF16 tensor, FP32 accumulate"),
    GpuSpec("RTX A5000", 24, 111.1, 768, "pro", "published", "NVIDIA RTX A5000 datasheet: tensor 222.2 TFLOPS sparse"),
    GpuSpec("RTX A6000", 48, 154.8, 768, "pro", "published", f"{_GA102} and RTX A6000 datasheet: 309.7 TFLOPS sparse"),
    GpuSpec(
        "RTX 4500 Ada",
        24,
        158.4,
        432,
        "pro",
        "derived",
        f"{_ADA_PRO}: RTX 4500 Ada datasheet, 39.6 TFLOPS FP32, 24 GB GDDR6, 432 GB/s",
    ),
    GpuSpec(
        "RTX 5000 Ada",
        32,
        261.1,
        576,
        "pro",
        "derived",
        "NVIDIA RTX 5000 Ada datasheet: tensor 1,044.4 TFLOPS (FP8, sparse) / 4; 32 GB GDDR6, 576 GB/s",
    ),
    GpuSpec(
        "RTX 6000 Ada",
        48,
        364.2,
        960,
        "pro",
        "derived",
        "NVIDIA RTX 6000 Ada datasheet: tensor 1,457.0 TFLOPS (FP8, sparse) / 4; 48 GB GDDR6, 960 GB/s",
    ),
    GpuSpec(
        "RTX PRO 6000",
        96,
        503.8,
        1792,
        "pro",
        "derived",
        "4 x its FP32 125.95 TFLOPS (NVIDIA RTX PRO 6000 Blackwell Workstation Edition datasheet; Blackwell's "
        "16-bit dense tensor rate is 4x FP32 in the RTX Blackwell whitepaper); 96 GB GDDR7, 1,792 GB/s",
    ),
    GpuSpec("A10", 24, 125.0, 600, "pro", "published", "NVIDIA A10 datasheet: BF16 250 TFLOPS sparse, 600 GB/s"),
    GpuSpec("A30", 24, 165.0, 933, "datacenter", "published", "NVIDIA A30 datasheet: BF16 330 TFLOPS sparse, 933 GB/s"),
    GpuSpec("A40", 48, 149.7, 696, "pro", "published", "NVIDIA A40 datasheet: BF16 299.4 TFLOPS sparse, 696 GB/s"),
    GpuSpec("L4", 24, 121.0, 300, "pro", "published", "NVIDIA L4 datasheet: BF16 242 TFLOPS sparse, 300 GB/s"),
    GpuSpec("L40", 48, 181.0, 864, "pro", "published", "NVIDIA L40 datasheet: BF16 362.1 TFLOPS sparse, 864 GB/s"),
    GpuSpec("L40S", 48, 362.0, 864, "pro", "published", "NVIDIA L40S datasheet: BF16 733 TFLOPS sparse, 864 GB/s"),
    GpuSpec("A100 PCIe", 40, 312.0, 1555, "datacenter", "published", f"{_A100}; 40GB PCIe: 1,555 GB/s"),
    GpuSpec("A100 PCIe", 80, 312.0, 1935, "datacenter", "published", f"{_A100}; 80GB PCIe: 1,935 GB/s"),
    GpuSpec("A100 SXM", 40, 312.0, 1555, "datacenter", "published", f"{_A100}; 40GB SXM: 1,555 GB/s"),
    GpuSpec("A100 SXM", 80, 312.0, 2039, "datacenter", "published", f"{_A100}; 80GB SXM: 2,039 GB/s"),
    GpuSpec("H100 PCIe", 80, 756.5, 2000, "hopper", "published", f"{_H100}: PCIe, BF16 1,513 TFLOPS sparse, 2 TB/s"),
    GpuSpec("H100 SXM", 80, 989.5, 3350, "hopper", "published", f"{_H100}: SXM, BF16 1,979 TFLOPS sparse, 3.35 TB/s"),
    GpuSpec("H100 NVL", 94, 835.5, 3900, "hopper", "published", f"{_H100}: NVL, BF16 1,671 TFLOPS sparse, 3.9 TB/s"),
    GpuSpec(
        "H200",
        141,
        989.5,
        4800,
        "hopper",
        "published",
        "NVIDIA H200 datasheet: SXM, BF16 1,979 TFLOPS sparse, 4.8 TB/s",
    ),
)


def specs_of(model: str) -> list[GpuSpec]:
    return [spec for spec in GPU_SPECS if spec.model == model]


def spec_for(model: str, vram_gb: float | None = None) -> GpuSpec | None:
    """The row of this model whose memory is nearest ``vram_gb`` (an offer's "80 GB" A100 is the 80GB row);
    without a size, the largest. None for a model without a row."""
    rows = specs_of(model)
    if not rows:
        return None
    if vram_gb is None:
        return max(rows, key=lambda spec: spec.vram_gb)
    return min(rows, key=lambda spec: abs(spec.vram_gb - vram_gb))
