"""How fast latent caching can feed the VAE: decoding, resizing and cropping camera-sized photos, on the CPU.

    python bench/decode_speed.py [--images 24] [--size 4032x3024] [--bucket 512] [--workers 8]

Writes --images synthetic JPEG photos of --size (smooth colour fields with grain, quality 92), plans them
into --bucket buckets as the trainer does, then times the trainer's own decode step (data._decode_chunk:
open, EXIF-rotate, resize, crop, to a tensor) one image after another and on the worker threads that
cache_latents uses. Prints one Markdown table with the machine's CPU count: the threaded figure scales
with cores, and rented GPU machines have 8-32 of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_photos(folder: Path, count: int, size: tuple[int, int]) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    subset = folder / "1_photos"
    subset.mkdir(parents=True)
    for i in range(count):
        small = rng.integers(0, 255, size=(12, 16, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(small).resize(size, Image.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 12, size=field.shape, dtype=np.int16)
        photo = Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8))
        photo.save(subset / f"photo_{i:03d}.jpg", quality=92)
        (subset / f"photo_{i:03d}.txt").write_text("a photo")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", default="4032x3024")
    parser.add_argument("--bucket", type=int, default=512)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    from remote.config import TrainConfig
    from remote.trainer import data as data_mod

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_photos(folder, args.images, (width, height))
        cfg = TrainConfig(
            pretrained_model_name_or_path="builtin:tiny-sd15",
            train_data_dir=str(folder),
            resolution=args.bucket,
            output_dir=str(folder / "out"),
            max_train_steps=1,
            learning_rate=1e-4,
        )
        records = data_mod.build_dataset(cfg).records
        chunks = [[(record, None)] for record in records]
        started = time.perf_counter()
        for chunk in chunks:
            data_mod._decode_chunk(chunk)
        serial = time.perf_counter() - started
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            started = time.perf_counter()
            list(pool.map(data_mod._decode_chunk, chunks))
            threaded = time.perf_counter() - started
    n = len(records)
    print(f"{n} JPEG photos {width}x{height} -> {args.bucket}px buckets; {os.cpu_count()} CPUs")
    print("| decode, resize, crop | seconds | images/s |\n|---|---|---|")
    print(f"| one after another | {serial:.2f} | {n / serial:.1f} |")
    print(f"| {args.workers} worker threads (cache_latents) | {threaded:.2f} | {n / threaded:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
