"""Builders for on-disk datasets and configs used by the foundation tests."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

TUTORIAL_CONFIG = """\
[model]
pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"
v2 = false
v_parameterization = false

[dataset]
train_data_dir = "./dataset"
resolution = 512
batch_size = 2
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024

[training]
output_dir = "./output"
output_name = "my_lora"
max_train_epochs = 10
learning_rate = 1e-4
unet_lr = 1e-4
text_encoder_lr = 5e-5
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 100
network_dim = 32
network_alpha = 16
optimizer_type = "AdamW8bit"
mixed_precision = "fp16"
save_every_n_epochs = 2
save_model_as = "safetensors"
"""


def write_image(path: Path, size: tuple[int, int], color: tuple[int, int, int], fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def write_captioned(folder: Path, name: str, size: tuple[int, int], color: tuple[int, int, int], caption: str) -> Path:
    image = write_image(folder / f"{name}.png", size, color)
    (folder / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    return image


def make_dataset(root: Path, sizes: list[tuple[int, int]], repeats: int = 10, name: str = "sks dog") -> Path:
    """One N_name folder with distinct images (distinct colours, so no duplicates) and captions."""
    folder = root / f"{repeats}_{name}"
    for i, size in enumerate(sizes):
        write_captioned(folder, f"img_{i:03d}", size, (i * 7 % 256, i * 13 % 256, i * 29 % 256), f"sks dog, photo {i}")
    return folder


def write_config(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path
