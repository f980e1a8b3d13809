"""Fixtures for the trainer tests: tiny datasets and configs, a shared cache of derived files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tomli_w


@pytest.fixture(scope="session", autouse=True)
def _shared_cache(tmp_path_factory: pytest.TempPathFactory):
    """One tokenizer/latent cache for the session (HOME changes per test; rebuilding is slow)."""
    folder = tmp_path_factory.mktemp("rentrain-cache")
    old = os.environ.get("RENTRAIN_CACHE_DIR")
    os.environ["RENTRAIN_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("RENTRAIN_CACHE_DIR", None)
    else:
        os.environ["RENTRAIN_CACHE_DIR"] = old


COLORS = [(220, 40, 40), (40, 60, 220), (40, 180, 60), (230, 210, 40), (160, 60, 200), (30, 30, 30)]


def make_images(folder: Path, sizes: list[tuple[int, int]], captions: list[str] | None = None) -> list[Path]:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (w, h) in enumerate(sizes):
        image = Image.new("RGB", (w, h), (245, 245, 240))
        draw = ImageDraw.Draw(image)
        color = COLORS[index % len(COLORS)]
        draw.ellipse((w * 0.2, h * 0.2, w * 0.8, h * 0.8), fill=color)
        path = folder / f"img_{index:02d}.png"
        image.save(path)
        if captions is not None:
            path.with_suffix(".txt").write_text(captions[index % len(captions)] + "\n", encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture
def make_config(tmp_path: Path):
    """make_config(**keys) -> (config path, TrainConfig); a 4-image dataset at 64 px unless told."""

    def build(sizes=None, captions=None, repeats=2, folder_name="toy", **keys):
        from remote.config import load_config

        data = tmp_path / "data"
        sub = data / f"{repeats}_{folder_name}"
        if not sub.exists():
            make_images(
                sub,
                sizes or [(64, 64), (96, 96), (80, 64), (64, 80)],
                captions or ["rtoy, red circle, plain", "rtoy, blue circle, plain"],
            )
        values = {
            "pretrained_model_name_or_path": "builtin:tiny-sd15",
            "train_data_dir": str(data),
            "resolution": 64,
            "batch_size": 2,
            "output_dir": str(tmp_path / "out"),
            "output_name": "t",
            "max_train_steps": 4,
            "learning_rate": 1e-3,
            "network_dim": 4,
            "network_alpha": 2,
            "seed": 7,
        }
        values.update(keys)
        values = {k: v for k, v in values.items() if v is not None}
        path = tmp_path / "config.toml"
        path.write_text(tomli_w.dumps(values), encoding="utf-8")
        return path, load_config(path).train

    return build
