"""Latent caching speed: the trainer's own `cache_latents` on a synthetic dataset, and where its time goes.

    python bench/latent_cache_speed.py [--images 64] [--resolution 512] [--batches 4,8,16] [--workdir DIR]

Builds the SD VAE architecture (random weights, float32) on the GPU and the synthetic PNG dataset of
bench/train_speed.py, then times, each into an empty cache folder:

    cold            the first call in the process (cuDNN's first calls for every convolution shape included)
    cache_latents   the trainer's call at each VAE batch size
    decode only     the same images decoded and resized on 8 worker threads, no GPU
    encode only     the VAE encoder alone on pixels already on the GPU, NCHW (the trainer's) and channels_last

Prints one Markdown table (images/s and peak GPU GiB).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataclasses import replace  # noqa: E402

from bench.train_speed import CASES, build_dataset, write_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batches", default="4,8,16")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rentrain-bench"))
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script itself")
    args = parser.parse_args()

    import torch
    from diffusers import AutoencoderKL

    from remote.config import load_config
    from remote.trainer import data as data_mod

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    def peak_gib() -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None

    def reset_peak() -> None:
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()

    with device:
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.18215,
        )
    vae.requires_grad_(False)
    folder = build_dataset(args.workdir / f"latent-data-{args.images}", args.resolution, images=args.images)
    case = replace(CASES["sd15"], resolution=args.resolution)
    config = write_config(
        args.workdir / "latent-bench.toml", case, "builtin:tiny-sd15", folder, args.workdir / "latent-out", 1
    )
    cfg = load_config(config).train

    rows: list[tuple[str, float, float | None]] = []

    def timed_cache(label: str, batch: int | None) -> None:
        os.environ["RENTRAIN_CACHE_DIR"] = str(args.workdir / f"latent-cache-{time.time_ns()}")
        dataset = data_mod.build_dataset(cfg)
        sync()
        reset_peak()
        started = time.perf_counter()
        encoded, _ = data_mod.cache_latents(dataset, vae, 0.18215, device, False, batch_size=batch)
        sync()
        seconds = time.perf_counter() - started
        rows.append((label, encoded / seconds, peak_gib()))
        print(f"{label}: {encoded} images in {seconds:.2f} s", file=sys.stderr, flush=True)

    timed_cache("cold: cache_latents, trainer's defaults", None)
    timed_cache("cache_latents, trainer's defaults", None)
    for batch in (int(b) for b in args.batches.split(",")):
        timed_cache(f"cache_latents, batch {batch}", batch)

    dataset = data_mod.build_dataset(cfg)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(data_mod.load_pixels, dataset.records))
    rows.append(("decode only, 8 threads", len(dataset.records) / (time.perf_counter() - started), None))

    vae.to(device)  # cache_latents hands the VAE back to the CPU
    for batch in (int(b) for b in args.batches.split(",")):
        for layout in (torch.channels_last, torch.contiguous_format):
            vae.to(memory_format=layout)
            pixels = torch.randn(batch, 3, args.resolution, args.resolution, device=device).contiguous(
                memory_format=layout
            )
            with torch.no_grad():
                vae.encode(pixels)
                sync()
                reset_peak()
                started = time.perf_counter()
                repeats = max(2, 64 // batch)
                for _ in range(repeats):
                    vae.encode(pixels).latent_dist.mean.sum().item()
                sync()
            name = "channels_last" if layout is torch.channels_last else "NCHW"
            rows.append(
                (f"encode only, batch {batch}, {name}", batch * repeats / (time.perf_counter() - started), peak_gib())
            )

    gpu = torch.cuda.get_device_name(0) if on_gpu else "CPU"
    print(f"{gpu}, torch {torch.__version__}; {args.images} images at {args.resolution}px")
    print("| run | images/s | peak GiB |\n|---|---|---|")
    for label, rate, peak in rows:
        print(f"| {label} | {rate:.1f} | {'-' if peak is None else f'{peak:.2f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
