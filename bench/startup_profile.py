"""Where the trainer's start-up goes: each phase of loading a diffusers folder, timed in a fresh process.

    python bench/startup_profile.py [--family sd15|sdxl] [--workdir DIR]

Builds the random full-size model folder of bench/train_speed.py once, then runs a child process that
times, in order: importing torch, creating the CUDA context, importing diffusers and transformers, and
loading the UNet, VAE, text encoder(s) and tokenizer(s) the way remote/trainer/models.py does (bf16,
straight onto the GPU). A second child times the raw floor of the same bytes: safetensors read straight
to the GPU, without building the modules. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STARTED = time.perf_counter()


def _child(folder: Path, family: str, raw: bool) -> dict[str, float]:
    times: dict[str, float] = {}
    mark = [STARTED]

    def lap(name: str) -> None:
        now = time.perf_counter()
        times[name] = round(now - mark[0], 3)
        mark[0] = now

    import torch

    lap("import torch")
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    lap("CUDA context")
    if raw:
        from safetensors.torch import load_file

        lap("import safetensors")
        parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
        for part in parts:
            for file in sorted((folder / part).glob("*.safetensors")):
                tensors = load_file(str(file), device="cuda")
                torch.cuda.synchronize()
                del tensors
            lap(f"read {part} to GPU")
        return times
    from diffusers import AutoencoderKL, UNet2DConditionModel

    lap("import diffusers")
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    lap("import transformers")
    place = {"device_map": "cuda"}
    UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.bfloat16, **place)
    torch.cuda.synchronize()
    lap("UNet")
    AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32, **place)
    torch.cuda.synchronize()
    lap("VAE")
    CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=torch.bfloat16, **place)
    if family == "sdxl":
        CLIPTextModelWithProjection.from_pretrained(
            folder, subfolder="text_encoder_2", torch_dtype=torch.bfloat16, **place
        )
    torch.cuda.synchronize()
    lap("text encoder(s)")
    CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    lap("tokenizer(s)")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd15", choices=("sd15", "sdxl"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rentrain-bench"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.family, args.raw)))
        return 0
    sys.path.insert(0, str(REPO))
    from bench.train_speed import build_model

    folder = build_model(args.family, args.workdir / f"model-{args.family}")
    rows = ["| phase | seconds |", "|---|---|"]
    for raw in (False, True):
        command = [sys.executable, __file__, "--child", str(folder), "--family", args.family] + (
            ["--raw"] if raw else []
        )
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - started
        times = json.loads(done.stdout.strip().splitlines()[-1])
        label = "raw safetensors read" if raw else "as the trainer loads"
        rows += [f"| {label}: {name} | {seconds:.2f} |" for name, seconds in times.items()]
        rows.append(f"| {label}: whole process | {wall:.2f} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
