"""The speed model's tables in docs/costs.md, printed from rentrain.speed_model as it stands (no GPU, no torch):

calibration   each measured run (MEASURED_STEPS) against the model's figure, split into its three terms
cards         modelled step times at SD 1.5's and SDXL's reference settings on every card of the GPU table
flux          Flux.1 [dev] at batch 1, LoRA dim 16, fp8_base, on a few cards, at 512 and 1024 px

python bench/speed_tables.py [--table calibration|cards|flux|all]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rentrain.gpu_specs import GPU_SPECS, spec_for
from rentrain.job_profile import JobProfile
from rentrain.speed_model import (
    MEASURED_STEPS,
    SpeedEstimate,
    calibration,
    checkpointing_factor,
    memory_fit,
    seconds_per_step,
    with_memory_plan,
)

FLUX_CARDS = ("RTX 3090", "RTX 4090", "RTX 5090", "L40S", "A100 SXM", "H100 SXM")


def calibration_table() -> str:
    cal = calibration()
    lines = [
        f"f = {', '.join(f'{k} {v:.1%}' for k, v in sorted(cal.tensor_fraction.items()))}; "
        f"m = {cal.bandwidth_factor:.3f}; g = {cal.kernel_seconds * 1e6:.2f} us",
        "",
        "| GPU | case | measured ms | modelled ms | error | matrix / other kernels / kernel cost |",
        "|---|---|---|---|---|---|",
    ]
    for m, error in zip(MEASURED_STEPS, cal.error, strict=True):
        spec = spec_for(m.gpu_model)
        assert spec is not None
        work = m.work
        fraction = cal.tensor_fraction[m.case]
        terms = (
            work.flop / (spec.bf16_tflops * 1e12 * fraction),
            work.bytes / (spec.bandwidth_gbs * 1e9 * cal.bandwidth_factor),
            work.kernels * cal.kernel_seconds,
        )
        factor = checkpointing_factor(m.case) if m.checkpointed else 1.0
        note = f" (x {factor:.2f} checkpointing)" if m.checkpointed else ""
        measured = m.seconds * 1e3
        modelled = (1 + error) * m.plain_seconds * factor * 1e3
        split = " / ".join(f"{t * 1e3 * factor:.1f}" for t in terms)
        case = m.source.rsplit("; ", 1)[-1].split(":")[0]
        lines.append(f"| {m.gpu_model} | {case} | {measured:.1f} | {modelled:.1f}{note} | {error:+.1%} | {split} |")
    return "\n".join(lines)


def cell(speed: SpeedEstimate | None, scale: float = 1e3, digits: int = 0) -> str:
    if speed is None:
        return "-"
    if speed.kind == "measured":
        return f"{speed.seconds_per_step * scale:.{max(digits, 1)}f} measured"
    values = (speed.seconds_per_step * scale, speed.low * scale, speed.high * scale)
    return "{:.{d}f} ({:.{d}f}-{:.{d}f})".format(*values, d=digits)


def cards_table() -> str:
    sd15 = JobProfile(family="sd15", steps=1, batch_size=4, resolution=(512, 512), trains_text_encoder=True)
    sdxl = JobProfile(family="sdxl", steps=1, batch_size=2, resolution=(1024, 1024))
    lines = [
        "| GPU | bf16 TFLOPS | GB/s | class | SD 1.5 512px b4, UNet + TE | SDXL 1024px b2, UNet |",
        "|---|---|---|---|---|---|",
    ]
    for spec in GPU_SPECS:
        memory = f" {spec.vram_gb:g} GB" if spec.model.startswith("A100") else ""  # two rows each
        cells = [cell(seconds_per_step(spec.model, p, spec.vram_gb), digits=0) for p in (sd15, sdxl)]
        lines.append(
            f"| {spec.model}{memory} | {spec.bf16_tflops:g} | {spec.bandwidth_gbs:,.0f} | {spec.efficiency_class} | "
            f"{cells[0]} | {cells[1]} |"
        )
    return "\n".join(lines)


def flux_table() -> str:
    lines = ["| GPU (GB) | 512 px | 1024 px |", "|---|---|---|"]
    for model in FLUX_CARDS:
        spec = spec_for(model, 80 if model.startswith("A100") else None)
        assert spec is not None
        cells = []
        for px in (512, 1024):
            profile = JobProfile(family="flux", steps=1, resolution=(px, px), network_dim=16, fp8_base=True)
            fit = memory_fit(profile, spec.vram_gb)
            if fit is None:
                cells.append("does not fit")
                continue
            speed = seconds_per_step(spec.model, profile, spec.vram_gb)
            assert speed is not None
            cells.append(cell(with_memory_plan(speed, fit), scale=1, digits=2))
        lines.append(f"| {model} ({spec.vram_gb:g}) | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=["calibration", "cards", "flux", "all"], default="all")
    args = parser.parse_args()
    tables = {"calibration": calibration_table, "cards": cards_table, "flux": flux_table}
    for name, make in tables.items():
        if args.table in (name, "all"):
            print(f"## {name}\n\n{make()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
