"""Trainer speed and memory on a GPU, through the real trainer code path.

For each case it builds a randomly initialised, full-size SD 1.5 or SDXL model as a diffusers folder
(the real architectures from their configs; no weights are downloaded), writes a synthetic dataset and a
training config, runs `python -m remote.trainer CONFIG` as a user would, and reads its events:

    start-up s   process start -> first step event (model load, latent and text caching included)
    ms/step      steady state: the median wall time between step events after the warm-up steps (the
                 mean, which includes an epoch end's one-off costs, is printed on stderr)
    samples/s    batch size / steady-state seconds per step
    TFLOP/s      the step's FLOP count (FLOP_PER_STEP, with its source) / seconds per step
    % of peak    against PEAK_BF16_TFLOPS of the GPU
    peak GiB     the trainer's own peak-allocated report

    python bench/train_speed.py [--cases sd15,sd15-unet,sdxl] [--steps N] [--workdir DIR] [--cap-gib G]
    python bench/train_speed.py --tiny [--precision fp16]   # smoke test with the built-in tiny model (CPU or GPU)
    python bench/train_speed.py --cases sd15 --set cuda_graphs=false --patch autocast   # the old eager path

--cap-gib caps the process's GPU memory (torch.cuda.set_per_process_memory_fraction) to act like a
smaller card. Results are printed as one Markdown table; bench/RESULTS.md records them with the command.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Counted with torch.utils.flop_counter.FlopCounterMode on these exact settings (issue "Trainer speed and
# memory", measured on an H200): forward + backward of one training step.
FLOP_PER_STEP = {"sd15": 7.50e12, "sdxl": 30.0e12}
PEAK_BF16_TFLOPS = {"H200": 790.0, "H100": 790.0}  # dense bf16 matrix products measured on the lent H200


@dataclass
class Case:
    name: str
    family: str  # sd15 | sdxl
    resolution: int
    batch_size: int
    train_text_encoder: bool
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def flop_per_step(self) -> float | None:
        # the published count is for the text encoder trained (SD 1.5) / UNet only (SDXL) at these sizes
        if self.family == "sd15" and self.resolution == 512 and self.batch_size == 4 and self.train_text_encoder:
            return FLOP_PER_STEP["sd15"]
        if self.family == "sdxl" and self.resolution == 1024 and self.batch_size == 2 and not self.train_text_encoder:
            return FLOP_PER_STEP["sdxl"]
        return None


CASES = {
    "sd15": Case("SD 1.5 512px b4, UNet+TE", "sd15", 512, 4, True),
    "sd15-unet": Case("SD 1.5 512px b4, UNet only", "sd15", 512, 4, False),
    "sdxl": Case("SDXL 1024px b2, UNet only", "sdxl", 1024, 2, False),
    # other settings, to check how a step's time scales with pixels and batch (docs/costs.md)
    "sd15-b1": Case("SD 1.5 512px b1, UNet+TE", "sd15", 512, 1, True),
    "sd15-768": Case("SD 1.5 768px b2, UNet+TE", "sd15", 768, 2, True),
    "sdxl-b1": Case("SDXL 1024px b1, UNet only", "sdxl", 1024, 1, False),
}


# ------------------------------------------------------------------------------------------ models


# The real architectures' configs (diffusers UNet2DConditionModel / transformers CLIPTextConfig keyword arguments).
SD15_UNET = dict(
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
)

SDXL_UNET = dict(
    sample_size=128,
    cross_attention_dim=2048,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_BIG_G = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
    bos_token_id=49406,
    eos_token_id=49407,
)


def build_model(family: str, folder: Path) -> Path:
    """A random-initialised full-size diffusers folder, saved in fp16 (the trainer casts as configured)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from remote.trainer.tokenizers import clip_tokenizer

    if (folder / "model_index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    clip_l = CLIPTextConfig(**CLIP_L)
    with torch.device(device):
        if family == "sd15":
            unet = UNet2DConditionModel(**SD15_UNET)
            encoders = {"text_encoder": CLIPTextModel(clip_l)}
            index_class, scaling = "StableDiffusionPipeline", 0.18215
        else:
            unet = UNet2DConditionModel(**SDXL_UNET)
            big_g = CLIPTextConfig(**CLIP_BIG_G)
            encoders = {"text_encoder": CLIPTextModel(clip_l), "text_encoder_2": CLIPTextModelWithProjection(big_g)}
            index_class, scaling = "StableDiffusionXLPipeline", 0.13025
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=scaling,
        )
    unet.half().save_pretrained(folder / "unet")
    vae.half().save_pretrained(folder / "vae")
    for name, encoder in encoders.items():
        encoder.half().save_pretrained(folder / name)
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    if family == "sdxl":
        clip_tokenizer(pad_token="!").save_pretrained(folder / "tokenizer_2")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(
        folder / "scheduler"
    )
    index = {
        "_class_name": index_class,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    del unet, vae, encoders
    return folder


def build_dataset(folder: Path, resolution: int, images: int = 50) -> Path:
    """Smooth random colour fields with short captions: decodable, distinct, the right size."""
    import numpy as np
    from PIL import Image

    subset = folder / f"{resolution}" / "1_bench"
    if subset.exists():
        return subset.parent
    subset.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        small = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((resolution, resolution), Image.BICUBIC).save(subset / f"img_{i:03d}.png")
        (subset / f"img_{i:03d}.txt").write_text(f"bench photo number {i}, colour field")
    return subset.parent


def write_config(
    path: Path, case: Case, model: Path | str, dataset: Path, output: Path, steps: int, precision: str = "bf16"
) -> Path:
    keys: dict[str, object] = {
        "pretrained_model_name_or_path": str(model),
        "train_data_dir": str(dataset),
        "resolution": case.resolution,
        "batch_size": case.batch_size,
        "output_dir": str(output),
        "output_name": "bench",
        "max_train_steps": steps,
        "learning_rate": 1e-4,
        "text_encoder_lr": 5e-5 if case.train_text_encoder else 0,
        "network_dim": 32,
        "network_alpha": 16,
        "optimizer_type": "AdamW",
        "mixed_precision": precision,
        "seed": 1,
        **case.extra,  # --set overrides any of the above
    }
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items()))
    return path


# ------------------------------------------------------------------------------------------ running


@dataclass
class Result:
    case: str
    ms_per_step: float
    samples_per_s: float
    tflops: float | None
    percent_of_peak: float | None
    peak_gib: float | None
    startup_s: float
    steps: int
    error: str | None = None
    setup_peak_gib: float | None = None  # loading and caching, before the first step


# Experiment switches, applied from outside the trainer (the trainer itself has no such knobs):
PATCHES = {
    # the pre-speed-work compute: autocast around a bf16 model (float32 norms and casts)
    "autocast": "import remote.trainer.step as S\nS.uses_autocast = lambda run: run.dtype != torch.float32",
    # fp16 under autocast for every family, as before the twelfth session (SD families now run fp16 throughout)
    "fp16_autocast": "import remote.trainer.step as S\nS.uses_autocast = lambda run: run.dtype == torch.float16",
    # the UNet's weights and activations in NHWC
    "channels_last": (
        "_setup = L.setup\n"
        "def setup(*a, **k):\n"
        "    run = _setup(*a, **k)\n"
        "    run.bundle.unet.to(memory_format=torch.channels_last)\n"
        "    return run\n"
        "L.setup = setup"
    ),
    # the LoRA computed the plain way (casts, separate products and adds) on the flat buffers
    "unfused": "import remote.trainer.lora as LR\nLR.is_fusable = lambda module: False",
    # the UNet in NCHW (the trainer runs it channels_last on CUDA)
    "nchw": (
        "_setup_cl = L.setup\n"
        "def setup_nchw(*a, **k):\n"
        "    run = _setup_cl(*a, **k)\n"
        "    run.bundle.unet.to(memory_format=torch.contiguous_format)\n"
        "    return run\n"
        "L.setup = setup_nchw"
    ),
    # PyTorch's GroupNorm (NCHW only: a layout copy before and after each) instead of the channels_last kernels
    "nativegn": (
        "import remote.trainer.speed as SP\n"
        "SP.use_channels_last_group_norm = lambda model, device, dtype: (0, 'bench patch nativegn')"
    ),
    # the fused LoRA layers' products all on one stream (no side stream)
    "serial": (
        "import remote.trainer.lora as LR\n"
        "_flat = LR.LoRANetwork.use_flat_buffers\n"
        "LR.LoRANetwork.use_flat_buffers = (\n"
        "    lambda self, dtype, side_stream=False, fuse=True: _flat(self, dtype, False, fuse)\n"
        ")"
    ),
    # each step finished (loss read, event written) before the next is prepared
    "lockstep": "L.host_work_due = lambda *a, **k: True",
    # cuDNN's fused attention left on for every family (the trainer turns it off for Flux.1)
    "cudnn_attention": "import remote.trainer.run_setup as R\nR.choose_attention_kernels = lambda family: None",
    # torch.compile of the UNet (inductor, default mode), inside the trainer's own CUDA graphs
    "compile": (
        "_setup_plain = L.setup\n"
        "def setup_compiled(*a, **k):\n"
        "    run = _setup_plain(*a, **k)\n"
        "    run.bundle.unet.forward = torch.compile(run.bundle.unet.forward)\n"
        "    return run\n"
        "L.setup = setup_compiled"
    ),
    # an 8-bit base upcast by PyTorch's cast and multiplication, not float8.py's one Triton kernel a layer
    "plain_upcast": (
        "import remote.trainer.speed as SP\nSP.use_fused_upcast = lambda model, device, dtype: (0, 'bench patch')"
    ),
    # Flux.1's rotary embedding by diffusers' own float32 steps, not rotary.py's kernel
    "plain_rotary": (
        "import remote.trainer.speed as SP\nSP.use_fused_rotary = lambda model, device, dtype: (False, 'bench patch')"
    ),
    # torch.compile of each Flux.1 transformer block (inductor, default mode; blocks of a kind share the code)
    "compile_blocks": (
        "_setup_plain = L.setup\n"
        "def setup_block_compiled(*a, **k):\n"
        "    run = _setup_plain(*a, **k)\n"
        "    for name in ('transformer_blocks', 'single_transformer_blocks'):\n"
        "        for block in getattr(run.bundle.unet, name, []):\n"
        "            block.compile()\n"
        "    return run\n"
        "L.setup = setup_block_compiled"
    ),
}


def trainer_command(config: Path, cap_gib: float | None = None, patches: tuple[str, ...] = ()) -> list[str]:
    """`python -m remote.trainer CONFIG`, or the same through a launcher that caps GPU memory (to act like a
    smaller card) and applies experiment patches."""
    if not cap_gib and not patches:
        return [sys.executable, "-m", "remote.trainer", str(config)]
    lines = ["import sys, runpy, torch", "import remote.trainer.loop as L"]
    if cap_gib:
        lines.append(
            f"torch.cuda.set_per_process_memory_fraction({cap_gib} * 2**30 / "
            "torch.cuda.get_device_properties(0).total_memory)"
        )
    lines += [PATCHES[name] for name in patches]
    lines += [
        "sys.argv = ['remote.trainer', sys.argv[1]]",
        "runpy.run_module('remote.trainer', run_name='__main__', alter_sys=True)",
    ]
    return [sys.executable, "-c", "\n".join(lines), str(config)]


def run_case(
    case: Case, config: Path, warmup: int, cap_gib: float | None, gpu: str, patches: tuple[str, ...] = ()
) -> Result:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    command = trainer_command(config, cap_gib, patches)
    started = time.time()
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    events = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    for line in completed.stderr.splitlines():
        if "CUDA graph" in line or "Error" in line:
            print(f"  trainer: {line[:400]}", file=sys.stderr, flush=True)
    steps = [e for e in events if e["event"] == "step"]
    errors = [e for e in events if e["event"] == "error"]
    if errors or len(steps) <= warmup + 1:
        message = errors[0]["message"] if errors else completed.stderr[-800:]
        print(f"  trainer stderr, last lines:\n{completed.stderr[-2500:]}", file=sys.stderr, flush=True)
        return Result(case.name, 0, 0, None, None, None, 0, len(steps), error=message)
    start = next((e for e in events if e["event"] == "start"), {})
    print(
        f"  trainer: start event {start.get('time', started) - started:.1f} s after launch, first step "
        f"{steps[0]['seconds_per_step']:.2f} s; set-up: {start.get('setup_seconds')}; choices: {start.get('choices')}",
        file=sys.stderr,
        flush=True,
    )
    first, last = (float(e["loss"]) for e in (steps[0], steps[-1]))  # not finite: "NaN" (remote/events.py)
    print(f"  trainer: loss {first:.4f} at step 1 -> {last:.4f} at step {len(steps)}", file=sys.stderr)
    times = [e["time"] for e in steps]
    memory = [e["gpu_memory_gb"] for e in steps if e.get("gpu_memory_gb") is not None]
    setup_peak = start.get("setup_gpu_memory_gb")
    return steady_result(case, "trainer", times, warmup, started, memory, setup_peak, gpu)


def steady_result(
    case: Case,
    who: str,
    times: list[float],
    warmup: int,
    started: float,
    memory: list[float],
    setup_peak_gib: float | None,
    gpu: str,
) -> Result:
    """The Result of a run launched at ``started`` from the times its steps ended: the median interval between
    those after the warm-up (an epoch's end, a sync or a new batch shape captured as a graph, costs a few steps'
    time once; the mean over the window, printed beside it, includes those)."""
    intervals = [b - a for a, b in itertools.pairwise(times[warmup:])]
    seconds = statistics.median(intervals)
    print(
        f"  {who}: mean interval {1000 * statistics.mean(intervals):.1f} ms, median {1000 * seconds:.1f} ms",
        file=sys.stderr,
        flush=True,
    )
    flop = case.flop_per_step
    tflops = flop / seconds / 1e12 if flop else None
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    return Result(
        case=case.name,
        ms_per_step=seconds * 1000,
        samples_per_s=case.batch_size / seconds,
        tflops=tflops,
        percent_of_peak=100 * tflops / peak if tflops and peak else None,
        peak_gib=max(memory) if memory else None,
        startup_s=times[0] - started,
        steps=len(times),
        setup_peak_gib=setup_peak_gib,
    )


def add_override_option(parser: argparse.ArgumentParser, help: str) -> None:
    """--set KEY=VALUE (repeatable) into ``args.overrides``; parse_override reads each."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def parse_override(item: str) -> tuple[str, object]:
    key, _, value = item.partition("=")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def table(results: list[Result]) -> str:
    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [
        "| case | ms/step | samples/s | TFLOP/s | % of bf16 peak | peak GiB | set-up peak GiB | start-up s | steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            rows.append(f"| {r.case} | failed: {r.error.splitlines()[0][:120]} | | | | | | | {r.steps} |")
            continue
        rows.append(
            f"| {r.case} | {r.ms_per_step:.1f} | {r.samples_per_s:.1f} | {number(r.tflops, 0)} | "
            f"{number(r.percent_of_peak, 1)} | {number(r.peak_gib, 2)} | {number(r.setup_peak_gib, 2)} | "
            f"{r.startup_s:.1f} | {r.steps} |"
        )
    return "\n".join(rows)


def environment() -> str:
    import torch

    lines = [f"python {platform.python_version()}, torch {torch.__version__}"]
    for name in ("diffusers", "transformers", "peft"):
        try:
            module = __import__(name)
            lines.append(f"{name} {module.__version__}")
        except ImportError:
            pass
    if torch.cuda.is_available():
        lines.append(f"GPU {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
            lines.append(f"driver {driver}")
        except OSError:
            pass
    return ", ".join(lines)


def report(results: list[Result], json_path: Path | None) -> int:
    """Print the environment and the table (and write the JSON); the exit status: 1 when a case failed."""
    print(environment())
    print(table(results))
    if json_path:
        json_path.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0 if all(r.error is None for r in results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="sd15,sd15-unet,sdxl")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rentrain-bench"))
    parser.add_argument("--cap-gib", type=float, default=None)
    parser.add_argument(
        "--tiny", action="store_true", help="smoke test with builtin:tiny-sd15 (on the GPU if there is one)"
    )
    parser.add_argument("--precision", default="no", choices=("no", "fp16", "bf16"), help="mixed_precision of --tiny")
    parser.add_argument("--json", type=Path, help="also write the results here")
    add_override_option(parser, "config override for every case, e.g. cuda_graphs=false (repeatable)")
    parser.add_argument(
        "--patch",
        dest="patches",
        action="append",
        default=[],
        choices=sorted(PATCHES),
        help="experiment patch applied from outside the trainer (repeatable)",
    )
    args = parser.parse_args()
    overrides = dict(parse_override(item) for item in args.overrides)
    label = ", ".join([f"{k}={v}" for k, v in overrides.items()] + args.patches)
    sys.path.insert(0, str(REPO))

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    results = []
    if args.tiny:
        case = Case(f"tiny SD 1.5 64px b2 ({gpu}, mixed_precision {args.precision})", "sd15", 64, 2, True, overrides)
        dataset = build_dataset(args.workdir / "data", 64, images=8)
        output = args.workdir / f"out-tiny-{int(time.time())}"
        config = write_config(
            args.workdir / "tiny.toml", case, "builtin:tiny-sd15", dataset, output, args.steps, args.precision
        )
        results.append(run_case(case, config, args.warmup, None, gpu, tuple(args.patches)))
    else:
        for key in args.cases.split(","):
            case = CASES[key]
            if label:
                case = replace(case, name=f"{case.name} [{label}]", extra={**case.extra, **overrides})
            model = build_model(case.family, args.workdir / f"model-{case.family}")
            dataset = build_dataset(args.workdir / "data", case.resolution)
            output = args.workdir / f"out-{key}-{int(time.time())}"
            config = write_config(args.workdir / f"{key}.toml", case, model, dataset, output, args.steps)
            result = run_case(case, config, args.warmup, args.cap_gib, gpu, tuple(args.patches))
            print(f"{key}: {result}", file=sys.stderr, flush=True)
            results.append(result)
    return report(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
