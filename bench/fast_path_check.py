"""Does the fast path train the same function? The real trainer, run five ways on the same seed and data.

    eager + autocast   the trainer before the speed work: eager steps, autocast around a bf16 model,
                       the LoRA computed the plain way (the "unfused" patch)
    eager, bf16        bf16 throughout without autocast (cuda_graphs = false), fused LoRA layers
    fast path          bf16 throughout, fused LoRA layers, steps replayed as CUDA graphs (the default)
    ... PyTorch's GN   the same with PyTorch's GroupNorm instead of the channels_last kernels
    eager, fp32        no mixed precision: how far bf16 itself is from exact arithmetic

With --fp16 the runs are the tutorial's precision instead: eager fp16 under autocast (the reference; the
trainer's fp16 before the twelfth session, train_speed.py's fp16_autocast patch), the fast path under autocast,
the fast path in fp16 throughout (the default for SD: what the bf16 path does, in fp16), and fp32 again as the
scale of the noise.

Each run trains SD 1.5 (full size, random weights; 512px, batch 4, UNet + text encoder LoRA) for --steps
steps; 50 images at batch 4 end each epoch on a batch of 2, so two shapes are captured. Against the first
run it reports the per-step loss difference (mean and max over the steps) and the relative L2 distance of
the exported LoRA files. The fp32 row is the scale of "bf16 noise": the fast path should be far closer to
the eager bf16 paths than fp32 is.

    python bench/fast_path_check.py [--steps 100] [--workdir DIR] [--fp16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.train_speed import CASES, build_dataset, build_model, environment, trainer_command, write_config  # noqa: E402

VARIANTS = (
    ("eager + autocast, plain LoRA (before)", {"cuda_graphs": False}, ("autocast", "unfused"), "bf16"),
    ("eager, bf16", {"cuda_graphs": False}, (), "bf16"),
    ("fast path (CUDA graphs, bf16)", {}, (), "bf16"),
    ("fast path with PyTorch's GroupNorm", {}, ("nativegn",), "bf16"),
    ("eager, fp32 (precision reference)", {"cuda_graphs": False}, (), "no"),
)
FP16_VARIANTS = (
    ("eager, fp16 under autocast", {"cuda_graphs": False}, ("fp16_autocast",), "fp16"),
    ("fast path, fp16 under autocast", {}, ("fp16_autocast",), "fp16"),
    ("fast path, fp16 throughout", {}, (), "fp16"),
    ("eager, fp32 (precision reference)", {"cuda_graphs": False}, (), "no"),
)


def train(label: str, extra: dict, patches: tuple[str, ...], precision: str, steps: int, workdir: Path):
    case = replace(CASES["sd15"], extra=extra)
    model = build_model(case.family, workdir / "model-sd15")
    dataset = build_dataset(workdir / "data", case.resolution)
    output = workdir / f"out-check-{len(os.listdir(workdir))}-{int(time.time())}"
    config = write_config(workdir / "check.toml", case, model, dataset, output, steps, precision)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    done = subprocess.run(trainer_command(config, None, patches), env=env, capture_output=True, text=True, check=False)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    losses = [float(e["loss"]) for e in events if e["event"] == "step"]  # not finite: "NaN" (remote/events.py)
    final = next((e["path"] for e in events if e["event"] == "done"), None)
    if final is None:
        raise SystemExit(f"{label}: the run failed\n{done.stderr[-3000:]}")
    start = next(e for e in events if e["event"] == "start")
    print(f"{label}: {len(losses)} steps; {start.get('choices')}", file=sys.stderr, flush=True)
    print(done.stderr[-600:] if "graph" in done.stderr.lower() else "", file=sys.stderr)
    return losses, Path(final)


def lora_distance(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    first, second = load_file(str(a)), load_file(str(b))
    diff = sum(float((first[k].float() - second[k].float()).pow(2).sum()) for k in second if k.endswith("weight"))
    norm = sum(float(second[k].float().pow(2).sum()) for k in second if k.endswith("weight"))
    return (diff / norm) ** 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rentrain-bench"))
    parser.add_argument("--fp16", action="store_true", help="the fp16 variants (the tutorial's precision)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs = [
        (label, *train(label, extra, patches, precision, args.steps, args.workdir))
        for label, extra, patches, precision in (FP16_VARIANTS if args.fp16 else VARIANTS)
    ]
    ref_label, ref_losses, ref_file = runs[0]
    rows = [
        f"Against: {ref_label}; {args.steps} steps, seed 1",
        "| run | mean loss | mean abs loss diff | max abs loss diff | LoRA relative L2 distance |",
        "|---|---|---|---|---|",
    ]
    for label, losses, file in runs:
        n = min(len(losses), len(ref_losses))
        diffs = [abs(losses[i] - ref_losses[i]) for i in range(n)]
        rows.append(
            f"| {label} | {sum(losses) / len(losses):.5f} | {sum(diffs) / n:.2e} | {max(diffs):.2e} | "
            f"{lora_distance(file, ref_file):.2e} |"
        )
    print(environment())
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
