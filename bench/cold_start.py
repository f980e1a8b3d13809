"""Trainer start-up with the libraries cold on disk, and after remote/warm_cache.py read them.

A fresh rented machine has never read its image's files. This drops the trainer's libraries and the model from
the page cache (posix_fadvise DONTNEED: clean pages of files no process holds open) and times the start-up
(process start to the first step event, as bench/train_speed.py measures it) three ways, SD 1.5 by default:

    cold       the files just dropped from the cache
    warmed     dropped, then remote/warm_cache.py (as bootstrap.sh runs it while the model downloads), timed
    warm       right after another run (everything cached)

    python bench/cold_start.py [--case sd15] [--steps 15] [--workdir DIR]

If "cold" is no slower than "warm", the drop did not take on this file system: the result says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from train_speed import CASES, build_dataset, build_model, run_case, write_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from remote.warm_cache import library_files, package_dirs, warm  # noqa: E402  (after the path)


def drop_from_cache(dirs: list[Path], model: Path) -> int:
    files = list(library_files(dirs)) + [p for p in model.rglob("*") if p.is_file()]
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return len(files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="sd15")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rentrain-bench"))
    args = parser.parse_args()

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    case = CASES[args.case]
    model = build_model(case.family, args.workdir / f"model-{case.family}")
    dataset = build_dataset(args.workdir / "data", case.resolution)
    dirs = package_dirs()
    rows = []
    for how in ("cold", "warmed", "warm"):
        note = ""
        if how != "warm":
            dropped = drop_from_cache(dirs, model)
            note = f"{dropped} files dropped"
        if how == "warmed":
            started = time.time()
            count, size = warm(dirs, read=True)
            note += f"; warm_cache read {count} files, {size / 2**30:.2f} GiB in {time.time() - started:.1f} s"
        output = args.workdir / f"out-cold-{how}-{int(time.time())}"
        config = write_config(args.workdir / f"cold-{how}.toml", case, model, dataset, output, args.steps)
        result = run_case(case, config, 2, None, gpu)
        rows.append((how, result.startup_s, result.error, note))
        print(f"{how}: start-up {result.startup_s:.1f} s ({note}) {result.error or ''}", file=sys.stderr, flush=True)
    print(f"| {case.name} ({gpu}) | start-up s | note |\n|---|---|---|")
    for how, startup, error, note in rows:
        print(f"| {how} | {'failed: ' + str(error)[:80] if error else f'{startup:.1f}'} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
