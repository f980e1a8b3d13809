"""The tutorial's config on a GPU: what users bring, not what we tune for.

The config is the kohya tutorial's TOML the tests use (tests/foundation/helpers.py TUTORIAL_CONFIG: SD 1.5,
fp16, AdamW8bit, batch 2, buckets 256-1024, dim 32, 10 epochs), unchanged but for the model, dataset and
output paths. The model is bench/train_speed.py's full-size SD 1.5 with random weights; the dataset is 20
images of mixed sizes and aspect ratios (about 512x512 pixels each, so several buckets of the same pixel
count), in a folder with the tutorial's 10 repeats: 100 steps an epoch, 1,000 in all.

Two runs, measured as train_speed.py measures (median step interval after the warm-up, peak memory, start-up):

    tutorial         the mixed-size dataset (one CUDA graph per bucket shape)
    single shape     the same config on 20 images of 512x512: the same pixels per step, one shape

    python bench/tutorial_speed.py [--runs tutorial,single] [--warmup 20] [--workdir DIR] [--set KEY=VALUE]
                                   [--patch NAME]   # train_speed.py's experiment patches, e.g. fp16_autocast
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from train_speed import PATCHES, Case, add_override_option, build_model, parse_override, report, run_case

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.foundation.helpers import TUTORIAL_CONFIG, make_dataset  # noqa: E402  (after the path)

# about 512x512 pixels each, in several aspect ratios
MIXED_SIZES = [(512, 512), (448, 576), (576, 448), (384, 640), (640, 384)] * 4


def tutorial_config(path: Path, model: Path, dataset: Path, output: Path, overrides: dict[str, object]) -> Path:
    text = TUTORIAL_CONFIG
    paths = {"pretrained_model_name_or_path": str(model), "train_data_dir": str(dataset), "output_dir": str(output)}
    for key, value in {**paths, **overrides}.items():
        line = f"{key} = {json.dumps(value)}"
        text, count = re.subn(rf"^{key} = .*$", line, text, flags=re.M)
        if not count:  # a key the tutorial does not set: into the [training] table, the last one
            text += line + "\n"
    path.write_text(text)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="tutorial,single")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rentrain-bench-tutorial"))
    parser.add_argument("--model", default="sd15", help="train_speed.py's model to build (sd15), or builtin:tiny-sd15")
    add_override_option(parser, "config override (repeatable), as train_speed.py --set")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--patch", dest="patches", action="append", default=[], choices=sorted(PATCHES))
    args = parser.parse_args()
    overrides = dict(parse_override(item) for item in args.overrides)

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    if args.model.startswith("builtin:"):
        model: Path | str = args.model
    else:
        model = build_model(args.model, args.workdir / f"model-{args.model}")
    results = []
    for run in args.runs.split(","):
        sizes = MIXED_SIZES if run == "tutorial" else [(512, 512)] * len(MIXED_SIZES)
        dataset = args.workdir / f"data-{run}"
        if not dataset.exists():
            make_dataset(dataset, sizes)
        output = args.workdir / f"out-{run}-{int(time.time())}"
        config = tutorial_config(args.workdir / f"{run}.toml", Path(model), dataset, output, overrides)
        label = "tutorial TOML, 20 mixed-size images" if run == "tutorial" else "tutorial TOML, 20 images 512x512"
        case = Case(label, "sd15", 512, 2, True)
        result = run_case(case, config, args.warmup, None, gpu, tuple(args.patches))
        print(f"{run}: {result}", file=sys.stderr, flush=True)
        results.append(result)
    return report(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
