"""kohya sd-scripts beside our trainer: the same cases, settings, models and data, measured the same way.

Runs kohya-ss/sd-scripts (a source tree given with --sd-scripts) on the model folders and datasets that
bench/train_speed.py, bench/tutorial_speed.py and bench/flux_speed.py build, under the same --workdir (one build
serves both trainers), and prints train_speed.py's Markdown table:

    sd15        train_network.py with train_speed.py's "sd15" settings: SD 1.5 512px, batch 4, LoRA dim 32 / alpha 16
                on the UNet (learning_rate 1e-4) and the text encoder (text_encoder_lr 5e-5), AdamW, bf16, seed 1,
                50 images; latents cached and SDPA attention (our trainer always does both)
    tutorial    train_network.py --config_file with tests/foundation/helpers.py's TUTORIAL_CONFIG as tutorial_speed.py
                writes it (fp16, AdamW8bit, batch 2, buckets 256-1024, the 20 mixed-size images in a 10-repeat folder),
                with --set overrides applied the same way; nothing else added: no latent caching, kohya's default
                attention, as a kohya user running that TOML gets
    flux-512, flux-1024
                flux_train_network.py with flux_speed.py's settings (FLUX_KEYS: fp8_base, gradient checkpointing,
                cached text-encoder outputs, timestep_sampling shift 3.1582, raw prediction, guidance 1.0, rank and
                alpha 16; AdamW, bf16, batch 1, seed 1, 20 images) plus the operational flags of kohya's Flux LoRA
                recipe (README: --sdpa --highvram --persistent_data_loader_workers --max_data_loader_n_workers 2
                --save_precision bf16), latents cached in memory; PyTorch's cuDNN attention off, as our trainer
                runs Flux.1 (launch.py's KOHYA_BENCH_CUDNN_ATTENTION). Unlike flux_speed.py (--cap-gib 24) kohya runs
                without a memory cap unless --cap-gib is given: its peak tells whether it fits a 24 GB card

Where kohya spells a key otherwise, the key is translated, never dropped: the tutorial's `batch_size` is kohya's
`train_batch_size`; its `resolution = 512` is kohya's string `resolution = "512"` (kohya splits it on a comma and
fails on a TOML integer); kohya needs `network_module = "networks.lora"` (rentrain's default); captions are read
from .txt files (`caption_extension`: rentrain's and the tutorials' default, kohya's is ".caption").

The models, no download anywhere:
    SD 1.5   kohya loads a diffusers folder with StableDiffusionPipeline.from_pretrained (library/train_util.py
             _load_target_model), which needs every part in model_index.json; train_speed.py's folder lists only the
             UNet and VAE (our trainer loads the parts one by one), so kohya reads WORKDIR/kohya-sd15: links to the
             parts plus a complete model_index.json.
    Flux.1   flux_train_network.py reads the transformer from a diffusers folder saved in three shards
             (library/flux_utils.py analyze_checkpoint_state and convert_diffusers_sd_to_bfl), which is what
             flux_speed.py writes (23.8 GB in 10 GB shards): the same weights as ours, and no second 24 GB copy on
             the GPU machine's 64 GiB disk. CLIP-L and T5-XXL are the folder's text_encoder/ and text_encoder_2/
             model.safetensors, in transformers' key layout, which kohya's load_clip_l / load_t5xxl load into
             transformers' classes. The autoencoder must be one file in BFL's layout (load_ae): WORKDIR/kohya-ae
             .safetensors, random, with the names and shapes of kohya's own flux_models.AutoEncoder (it only
             encodes the latents, cached before the timed steps).
    tokenizers  kohya fetches openai/clip-vit-large-patch14 and google/t5-v1_1-xxl unless --tokenizer_cache_dir
             holds them: our trainer's offline tokenizers are saved there (WORKDIR/kohya-tokenizers).

Measurement: bench/kohya/launch.py runs kohya's script in a subprocess with a hook on its "steps" progress bar that
appends the time (and torch.cuda.max_memory_allocated) of each optimizer step to a JSON-lines file (its docstring
says why that is one step's time); the columns are train_speed.py's: ms/step the median interval after --warmup
steps, start-up from the subprocess's start to the first step, peak GiB over the steps, set-up peak GiB when the
training loop starts, both counted from the process's start as our trainer counts them. launch.py also carries the
transformers 5 compatibility patches and the stand-ins for OpenCV (and torchvision on a CPU-only torch).

    python bench/kohya_speed.py --sd-scripts DIR [--cases sd15,tutorial,flux-512,flux-1024] [--steps 40]
        [--warmup 10] [--workdir DIR] [--set KEY=VALUE] [--kohya-arg=--flag ...] [--cap-gib G] [--json PATH]
    python bench/kohya_speed.py --smoke [--cases sd15,tutorial,flux-512]    # the same paths, small, on the CPU

--smoke: kohya hard-codes the SD 1.5 UNet (library/original_unet.py), CLIP-L, T5-XXL and the Flux autoencoder,
and reads only the Flux transformer's depth from its file, so the built-in tiny models do not fit. The smoke runs
the full-size SD 1.5 at 64px (tutorial: 128px buckets of 64-256), and for Flux a stand-in folder: the transformer
at FLUX.1's full width with one double and one single block (three shards), the full CLIP-L, a one-layer T5 of
T5-XXL's width (kohya's T5 config overridden through launch.py's $KOHYA_BENCH_T5_CONFIG); mixed precision off
for SD (accelerate refuses fp16 on a CPU), bf16 for Flux (fp8_base requires it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flux_speed import CASES as FLUX_CASES
from flux_speed import FLUX_KEYS, build_flux
from train_speed import CASES as OUR_CASES
from train_speed import (
    CLIP_L,
    Case,
    Result,
    add_override_option,
    build_dataset,
    build_model,
    parse_override,
    report,
    steady_result,
)
from tutorial_speed import MIXED_SIZES, tutorial_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.foundation.helpers import make_dataset  # noqa: E402  (after the path)

LAUNCHER = Path(__file__).resolve().parent / "kohya" / "launch.py"
DEFAULT_SD_SCRIPTS = REPO / ".kohya_src"
DEFAULT_BITSANDBYTES = REPO / "build" / "a8bnb"
CLIP_TOKENIZER_ID, T5_TOKENIZER_ID = "openai/clip-vit-large-patch14", "google/t5-v1_1-xxl"  # strategy_sd/_flux.py
FLUX_SHARD = "transformer/diffusion_pytorch_model-00001-of-00003.safetensors"  # the one name kohya looks for
FLUX_IMAGES = 20  # flux_speed.py's --images default
# kohya's Flux LoRA recipe (its README), the flags that are not settings of the run
FLUX_RECIPE_FLAGS = [
    "--sdpa",
    "--highvram",
    "--persistent_data_loader_workers",
    "--max_data_loader_n_workers",
    "2",
    "--save_precision",
    "bf16",
]
# --smoke's Flux stand-in: kohya builds Flux at full width and reads only the block counts from the file
SMOKE_FLUX_BLOCKS = {"num_layers": 1, "num_single_layers": 1}
SMOKE_T5 = {"d_model": 4096, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 2}  # txt_in takes 4096 wide
SMOKE_TUTORIAL_SIZES = [(128, 128), (64, 256), (256, 64), (192, 64)]  # each its bucket's exact size at 128px


@dataclass(frozen=True)
class KohyaRun:
    """One kohya command: the script, its arguments, and the case it measures (for batch size and FLOP)."""

    key: str  # the --cases name
    case: Case
    script: str
    arguments: list[str]
    environment: dict[str, str]


# ------------------------------------------------------------------------------------------ models and data


def save_tokenizers(folder: Path) -> Path:
    """Our trainer's offline CLIP and T5 tokenizers where kohya's --tokenizer_cache_dir looks for the hub's."""
    from remote.trainer.tiny import t5_tokenizer
    from remote.trainer.tokenizers import clip_tokenizer

    for model_id, make in ((CLIP_TOKENIZER_ID, clip_tokenizer), (T5_TOKENIZER_ID, t5_tokenizer)):
        target = folder / model_id.replace("/", "_")  # strategy_base.py _load_tokenizer's name
        if not target.exists():
            make().save_pretrained(target)
    return folder


def sd15_view(model: Path, folder: Path) -> Path:
    """train_speed.py's SD 1.5 folder as StableDiffusionPipeline.from_pretrained wants it (module doc)."""
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        link = folder / part
        if not link.exists():
            link.symlink_to(model.resolve() / part, target_is_directory=True)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "tokenizer": ["transformers", "CLIPTokenizer"],  # kohya passes tokenizer=None: not loaded
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def import_kohya(sd_scripts: Path) -> None:
    """Make sd-scripts' `library` importable in this process, with launch.py's stand-ins where needed."""
    sys.path.insert(0, str(LAUNCHER.parent))
    from launch import add_fallback_modules

    add_fallback_modules()
    sys.path.insert(0, str(sd_scripts))


def write_flux_ae(path: Path, sd_scripts: Path) -> Path:
    """A random autoencoder in BFL's ae.safetensors layout: the tensors of kohya's flux_models.AutoEncoder (dev's
    ae_params), weights normal with variance 1/fan-in, norm scales one, biases zero, in bf16 (load_ae casts)."""
    import torch
    from safetensors.torch import save_file

    if path.exists():
        return path
    import_kohya(sd_scripts)
    from library import flux_models

    with torch.device("meta"):
        ae = flux_models.AutoEncoder(flux_models.configs["dev"].ae_params)
        shapes = {name: tensor.shape for name, tensor in ae.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) > 1:
            fan_in = shape[1:].numel()
            tensors[name] = (torch.randn(shape, generator=generator) / fan_in**0.5).to(torch.bfloat16)
        elif name.endswith(".bias"):
            tensors[name] = torch.zeros(shape, dtype=torch.bfloat16)
        else:  # a GroupNorm's scale
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
    temporary = path.with_suffix(".partial")
    save_file(tensors, str(temporary))
    temporary.replace(path)
    return path


def build_flux_smoke(folder: Path) -> Path:
    """--smoke's Flux stand-in (module doc) as a diffusers folder, the transformer in three shards."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from remote.trainer.families.flux import FLUX_DEV_CONFIG, T5_XXL_CONFIG

    if (folder / FLUX_SHARD).exists():
        return folder
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        transformer = FluxTransformer2DModel(**{**FLUX_DEV_CONFIG, **SMOKE_FLUX_BLOCKS})
        size = sum(p.numel() * p.element_size() for p in transformer.parameters())
        transformer.save_pretrained(folder / "transformer", max_shard_size=int(size / 2.5))
        CLIPTextModel(CLIPTextConfig(**CLIP_L)).save_pretrained(folder / "text_encoder")
        T5EncoderModel(T5Config(**{**T5_XXL_CONFIG, **SMOKE_T5})).save_pretrained(folder / "text_encoder_2")
    finally:
        torch.set_default_dtype(default_dtype)
    if not (folder / FLUX_SHARD).exists():
        raise RuntimeError(f"{folder}: the smoke transformer was not saved in three shards")
    return folder


def flux_parts(folder: Path) -> tuple[Path, Path]:
    """The CLIP-L and T5 files of a diffusers Flux folder; a clear error when kohya could not read the folder."""
    clip_l, t5xxl = folder / "text_encoder" / "model.safetensors", folder / "text_encoder_2" / "model.safetensors"
    for needed in (folder / FLUX_SHARD, clip_l, t5xxl):
        if not needed.exists():
            raise FileNotFoundError(
                f"{needed} is missing: kohya reads the transformer from exactly three diffusers shards and each "
                "text encoder from one file (flux_speed.py's folder has both)"
            )
    return clip_l, t5xxl


# ------------------------------------------------------------------------------------------ commands


def flags(settings: dict[str, object]) -> list[str]:
    """kohya command-line flags: True -> --key, False/None -> nothing, else --key value."""
    out: list[str] = []
    for key, value in settings.items():
        if value is True:
            out.append(f"--{key}")
        elif value not in (False, None):
            out += [f"--{key}", str(value)]
    return out


def common_settings(output: Path, tokenizers: Path) -> dict[str, object]:
    return {
        "output_dir": output,
        "output_name": "bench",
        "save_model_as": "safetensors",
        "caption_extension": ".txt",
        "tokenizer_cache_dir": tokenizers,
    }


def sd15_run(
    case: Case, model: Path, dataset: Path, output: Path, tokenizers: Path, steps: int, precision: str
) -> KohyaRun:
    """train_speed.py write_config's settings as kohya flags (module doc)."""
    settings: dict[str, object] = {
        "pretrained_model_name_or_path": model,
        "train_data_dir": dataset,
        "resolution": case.resolution,
        "train_batch_size": case.batch_size,
        "max_train_steps": steps,
        "learning_rate": 1e-4,
        "text_encoder_lr": 5e-5 if case.train_text_encoder else None,
        "network_train_unet_only": not case.train_text_encoder,
        "network_module": "networks.lora",
        "network_dim": 32,
        "network_alpha": 16,
        "optimizer_type": "AdamW",
        "mixed_precision": precision,
        "seed": 1,
        "cache_latents": True,
        "sdpa": True,
        **common_settings(output, tokenizers),
    }
    return KohyaRun("sd15", case, "train_network.py", flags(settings), {})


def tutorial_run(
    case: Case, model: Path, dataset: Path, workdir: Path, tokenizers: Path, overrides: dict[str, object]
) -> KohyaRun:
    """TUTORIAL_CONFIG through tutorial_speed.py's tutorial_config, then kohya's spellings (module doc)."""
    output = workdir / f"out-kohya-tutorial-{int(time.time())}"
    kohya_keys = {
        "network_module": "networks.lora",
        "caption_extension": ".txt",
        "tokenizer_cache_dir": str(tokenizers),
        **overrides,
    }
    config = tutorial_config(workdir / "kohya-tutorial.toml", model, dataset, output, kohya_keys)
    text = config.read_text().replace("\nbatch_size = ", "\ntrain_batch_size = ")
    config.write_text(re.sub(r"^resolution = (\d+)$", r'resolution = "\1"', text, flags=re.M))
    return KohyaRun("tutorial", case, "train_network.py", ["--config_file", str(config)], {})


def flux_run(
    key: str, case: Case, folder: Path, ae: Path, dataset: Path, output: Path, tokenizers: Path, steps: int
) -> KohyaRun:
    """flux_speed.py's settings (its write_config keys and FLUX_KEYS) plus the recipe's flags (module doc)."""
    clip_l, t5xxl = flux_parts(folder)
    settings: dict[str, object] = {
        "pretrained_model_name_or_path": folder,
        "clip_l": clip_l,
        "t5xxl": t5xxl,
        "ae": ae,
        "train_data_dir": dataset,
        "resolution": case.resolution,
        "train_batch_size": case.batch_size,
        "max_train_steps": steps,
        "learning_rate": 1e-4,
        "optimizer_type": "AdamW",
        "mixed_precision": "bf16",
        "seed": 1,
        "cache_latents": True,
        **FLUX_KEYS,
        **common_settings(output, tokenizers),
    }
    # PyTorch's attention kernels as our trainer picks them for Flux.1 (launch.py's KOHYA_BENCH_CUDNN_ATTENTION)
    environment = {"KOHYA_BENCH_CUDNN_ATTENTION": "off"}
    return KohyaRun(key, case, "flux_train_network.py", flags(settings) + FLUX_RECIPE_FLAGS, environment)


# ------------------------------------------------------------------------------------------ running


def launch(
    run: KohyaRun, sd_scripts: Path, workdir: Path, extra: list[str], env: dict[str, str]
) -> tuple[int, list[str], list[dict[str, Any]], float]:
    """Run one kohya command through launch.py: (exit status, its output lines, its events, launch time)."""
    events, log = workdir / f"kohya-{run.key}.events.jsonl", workdir / f"kohya-{run.key}.log"
    events.unlink(missing_ok=True)
    command = [sys.executable, str(LAUNCHER), str(sd_scripts), run.script, *run.arguments, *extra]
    environment = {**os.environ, **env, **run.environment, "KOHYA_BENCH_EVENTS": str(events)}
    print(f"  kohya: {shlex.join(command)}", file=sys.stderr, flush=True)
    started = time.time()
    with log.open("w") as output:
        completed = subprocess.run(command, env=environment, stdout=output, stderr=subprocess.STDOUT, check=False)
    lines = log.read_text(errors="replace").splitlines()
    for line in lines:
        if line.startswith("kohya launch:") or "Error" in line:
            print(f"  kohya: {line[:400]}", file=sys.stderr, flush=True)
    if completed.returncode != 0:
        tail = "\n".join(lines[-40:])
        print(f"  kohya exited {completed.returncode}; log {log}, last lines:\n{tail}", file=sys.stderr, flush=True)
    records = [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []
    return completed.returncode, lines, records, started


def measure(case: Case, records: list[dict[str, Any]], started: float, warmup: int, gpu: str) -> Result:
    """train_speed.py run_case's figures from launch.py's events (enough steps assumed)."""
    steps = [r for r in records if r["event"] == "step"]
    losses = [r["value"] for r in records if r["event"] == "loss"]
    loop = next(r for r in records if r["event"] == "loop")
    print(
        f"  kohya: training loop {loop['time'] - started:.1f} s after launch, first step "
        f"{steps[0]['time'] - loop['time']:.2f} s; avr_loss {losses[0]:.4f} -> {losses[-1]:.4f} "
        f"over {len(steps)} steps",
        file=sys.stderr,
        flush=True,
    )
    memory = [s["gpu_peak_gib"] for s in steps if s["gpu_peak_gib"] is not None]
    times = [s["time"] for s in steps]
    return steady_result(case, "kohya", times, warmup, started, memory, loop["gpu_peak_gib"], gpu)


def run_kohya(
    run: KohyaRun, sd_scripts: Path, workdir: Path, extra: list[str], warmup: int, gpu: str, env: dict[str, str]
) -> Result:
    """Run and measure one kohya command. A non-zero exit after enough steps (saving the LoRA, say) is reported
    on stderr and the timing kept; too few steps is a failed row with kohya's last error line."""
    returncode, lines, records, started = launch(run, sd_scripts, workdir, extra, env)
    steps = sum(1 for r in records if r["event"] == "step")
    if steps <= warmup + 1:
        message = next((line for line in reversed(lines) if "Error" in line), f"exit {returncode}")
        return Result(run.case.name, 0, 0, None, None, None, 0, steps, error=message.strip())
    return measure(run.case, records, started, warmup, gpu)


def kohya_case(case: Case, smoke: bool) -> Case:
    label = "kohya, smoke (CPU)" if smoke else "kohya"
    return replace(case, name=f"{case.name} [{label}]")


def plan(key: str, args: argparse.Namespace, tokenizers: Path, overrides: dict[str, object]) -> KohyaRun:
    """The kohya command of one case, with its model and data built (or found) under --workdir."""
    workdir, smoke = args.workdir, args.smoke
    output = workdir / f"out-kohya-{key}-{int(time.time())}"
    if key == "sd15":
        case = OUR_CASES["sd15"]
        if smoke:
            case = replace(case, resolution=64, batch_size=1)
        model = sd15_view(build_model("sd15", workdir / "model-sd15"), workdir / "kohya-sd15")
        dataset = build_dataset(workdir / "data", case.resolution, images=4 if smoke else 50)
        steps = 4 if smoke else args.steps
        return sd15_run(kohya_case(case, smoke), model, dataset, output, tokenizers, steps, "no" if smoke else "bf16")
    if key == "tutorial":
        case = Case("tutorial TOML, 20 mixed-size images", "sd15", 512, 2, True)  # tutorial_speed.py's label
        model = sd15_view(build_model("sd15", workdir / "model-sd15"), workdir / "kohya-sd15")
        dataset = workdir / ("data-tutorial-smoke" if smoke else "data-tutorial")
        if not dataset.exists():
            make_dataset(dataset, SMOKE_TUTORIAL_SIZES if smoke else MIXED_SIZES, repeats=2 if smoke else 10)
        if smoke:
            case = replace(case, resolution=128)
            smoke_keys = {"resolution": 128, "min_bucket_reso": 64, "max_bucket_reso": 256, "max_train_epochs": 1}
            overrides = {**smoke_keys, "mixed_precision": "no", **overrides}
        return tutorial_run(kohya_case(case, smoke), model, dataset, workdir, tokenizers, overrides)
    case = FLUX_CASES[key]
    if smoke:
        case = replace(case, resolution=64, flop=None)
        folder = build_flux_smoke(workdir / "model-flux-kohya-smoke")
    else:
        folder = build_flux(workdir / "model-flux")
    ae = write_flux_ae(workdir / "kohya-ae.safetensors", args.sd_scripts)
    dataset = build_dataset(workdir / "data", case.resolution, images=4 if smoke else FLUX_IMAGES)
    run = flux_run(key, kohya_case(case, smoke), folder, ae, dataset, output, tokenizers, 3 if smoke else args.steps)
    if smoke:
        run.environment["KOHYA_BENCH_T5_CONFIG"] = json.dumps(SMOKE_T5)
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd-scripts", type=Path, default=DEFAULT_SD_SCRIPTS, help="kohya sd-scripts source tree")
    parser.add_argument("--cases", default="sd15,tutorial")
    parser.add_argument("--steps", type=int, default=40, help="max_train_steps of sd15 and Flux")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rentrain-bench"))
    parser.add_argument("--bitsandbytes-path", type=Path, default=DEFAULT_BITSANDBYTES, help="put on PYTHONPATH")
    parser.add_argument("--cap-gib", type=float, default=0.0, help="cap kohya's GPU memory (0: no cap)")
    parser.add_argument("--smoke", action="store_true", help="small runs of the same code paths on the CPU")
    parser.add_argument("--json", type=Path, help="also write the results here")
    add_override_option(parser, "tutorial TOML override, as tutorial_speed.py --set (e.g. max_train_epochs=1)")
    parser.add_argument(
        "--kohya-arg",
        dest="kohya_args",
        action="append",
        default=[],
        metavar="ARG",
        help="appended to every kohya command line (repeatable), e.g. --kohya-arg=--sdpa",
    )
    args = parser.parse_args()
    if not (args.sd_scripts / "train_network.py").is_file():
        parser.error(f"--sd-scripts {args.sd_scripts}: no train_network.py there")
    args.sd_scripts = args.sd_scripts.resolve()
    unknown = [key for key in args.cases.split(",") if key not in ("sd15", "tutorial", *FLUX_CASES)]
    if unknown:
        parser.error(f"--cases: unknown case {unknown[0]!r} (sd15, tutorial, {', '.join(FLUX_CASES)})")
    overrides = dict(parse_override(item) for item in args.overrides)
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    python_path = [str(args.bitsandbytes_path)] if args.bitsandbytes_path.is_dir() else []
    python_path += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"PYTHONPATH": os.pathsep.join(python_path), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    if args.cap_gib:
        env["KOHYA_BENCH_CAP_GIB"] = str(args.cap_gib)
    args.workdir.mkdir(parents=True, exist_ok=True)
    tokenizers = save_tokenizers(args.workdir / "kohya-tokenizers")
    warmup = 1 if args.smoke else args.warmup
    results = []
    for key in args.cases.split(","):
        run = plan(key, args, tokenizers, overrides)
        result = run_kohya(run, args.sd_scripts, args.workdir, args.kohya_args, warmup, gpu, env)
        print(f"{key}: {result}", file=sys.stderr, flush=True)
        results.append(result)
    return report(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
