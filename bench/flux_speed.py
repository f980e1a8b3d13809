"""Flux.1 [dev] LoRA training speed and memory on a GPU, through the real trainer code path.

Builds a randomly initialised, full-size FLUX.1 [dev] as a diffusers folder (the 12 B-parameter transformer
with its 19 double and 38 single blocks, the 16-channel autoencoder, CLIP-L and the 4.8 B-parameter T5-XXL
encoder; no weights are downloaded, the compute is the same), a synthetic dataset and a kohya Flux config
with the settings of kohya's Flux LoRA recipe (fp8_base, gradient checkpointing, cached latents and text
encodings, timestep_sampling "shift" 3.1582, model_prediction_type "raw", guidance 1.0, rank 16), and runs
`python -m remote.trainer CONFIG` under bench/train_speed.py's measurement (median step interval, the trainer's
own peak-allocated report, which counts every phase since the process started: loading, text and latent
caching, training).

The T5 tokenizer is the offline one the tests use (a small vocabulary): the encoder still reads the full
512-token sequence [dev] trains with, so the work is the real one.

    python bench/flux_speed.py [--cases flux-1024,flux-512] [--cap-gib 24] [--steps 25] [--warmup 8]
    python bench/flux_speed.py --smoke      # a narrow two-block stand-in through the same path, on the CPU
    python bench/flux_speed.py --cases flux-512 --patch compile_blocks     # an experiment patch (train_speed.py's)
    python bench/flux_speed.py --cases flux-512 --cap-gib 0 --set gradient_checkpointing=false  # no cap, no recompute

FLOP per step are bench/step_work.py --flux's counts (forward + backward, without the recompute of gradient
checkpointing); % of peak is against train_speed.py's PEAK_BF16_TFLOPS of the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from train_speed import (
    CLIP_L,
    PATCHES,
    Case,
    add_override_option,
    build_dataset,
    parse_override,
    report,
    run_case,
    write_config,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from remote.trainer.families.flux import FLUX_DEV_CONFIG  # noqa: E402  (after the path)

# the same graph, narrow and two blocks deep, for --smoke on the CPU
FLUX_SMOKE = {
    **FLUX_DEV_CONFIG,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "axes_dims_rope": (4, 6, 6),
}
T5_SMOKE = dict(d_model=64, d_kv=8, d_ff=96, num_layers=2, num_heads=4)

# bench/step_work.py --flux (2026-12-05): forward + backward of one step, batch 1, LoRA rank 16
FLOP_PER_STEP = {1024: 172.19e12, 512: 45.84e12}

# kohya's Flux LoRA recipe (its README's flux_train_network.py example), with this run's rank
FLUX_KEYS: dict[str, object] = {
    "network_module": "networks.lora_flux",
    "network_dim": 16,
    "network_alpha": 16,
    "network_train_unet_only": True,
    "fp8_base": True,
    "gradient_checkpointing": True,
    "cache_text_encoder_outputs": True,
    "timestep_sampling": "shift",
    "discrete_flow_shift": 3.1582,
    "model_prediction_type": "raw",
    "guidance_scale": 1.0,
}


@dataclass
class FluxCase(Case):
    flop: float | None = None

    @property
    def flop_per_step(self) -> float | None:
        return self.flop


CASES = {
    f"flux-{px}": FluxCase(f"Flux.1 [dev] {px}px b1, rank 16, fp8 base", "flux", px, 1, False, FLUX_KEYS, flop)
    for px, flop in FLOP_PER_STEP.items()
}


def build_flux(folder: Path, smoke: bool = False) -> Path:
    """A random-initialised FLUX.1 [dev] diffusers folder in bf16 (the trainer quantises the blocks itself)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from remote.trainer.families.flux import AE_CONFIG, T5_XXL_CONFIG
    from remote.trainer.tiny import t5_tokenizer
    from remote.trainer.tokenizers import clip_tokenizer

    if (folder / "model_index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    started = time.time()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: 24 GB, never 48 in float32
    try:
        with torch.device(device):
            parts = {
                "transformer": FluxTransformer2DModel(**(FLUX_SMOKE if smoke else FLUX_DEV_CONFIG)),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                "text_encoder_2": T5EncoderModel(T5Config(**{**T5_XXL_CONFIG, **(T5_SMOKE if smoke else {})})),
            }
    finally:
        torch.set_default_dtype(default_dtype)
    for name, model in parts.items():
        model.save_pretrained(folder / name, max_shard_size="10GB")
        print(f"  built {name} in {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    del parts
    ae = {**AE_CONFIG, "block_out_channels": (16, 32, 32, 32), "norm_num_groups": 8} if smoke else AE_CONFIG
    AutoencoderKL(**ae).save_pretrained(folder / "vae")
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    t5_tokenizer().save_pretrained(folder / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "FluxPipeline",
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="flux-1024,flux-512")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rentrain-bench-flux"))
    parser.add_argument("--cap-gib", type=float, default=24.0, help="act like a card of this size (0: no cap)")
    parser.add_argument("--smoke", action="store_true", help="the narrow stand-in, 64px, 4 steps (CPU is fine)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    add_override_option(parser, "config override (repeatable), as train_speed.py --set")
    parser.add_argument("--patch", dest="patches", action="append", default=[], choices=sorted(PATCHES))
    args = parser.parse_args()
    overrides = dict(parse_override(item) for item in args.overrides)
    label = ", ".join([f"{k}={v}" for k, v in overrides.items()] + args.patches)
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    model = build_flux(args.workdir / ("model-smoke" if args.smoke else "model-flux"), args.smoke)
    results = []
    for key in args.cases.split(","):
        case = CASES[key]
        if label:
            case = replace(case, name=f"{case.name} [{label}]", extra={**case.extra, **overrides})
        steps, warmup = args.steps, args.warmup
        if args.smoke:
            case, steps, warmup = replace(case, name=f"{case.name} [smoke]", resolution=64, flop=None), 4, 1
        dataset = build_dataset(args.workdir / "data", case.resolution, images=args.images)
        output = args.workdir / f"out-{key}-{int(time.time())}"
        config = write_config(args.workdir / f"{key}.toml", case, model, dataset, output, steps)
        cap = args.cap_gib if torch.cuda.is_available() else 0  # a memory cap needs a GPU
        result = run_case(case, config, warmup, cap or None, gpu, tuple(args.patches))
        print(f"{key}: {result}", file=sys.stderr, flush=True)
        results.append(result)
    return report(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
