"""`rentrain init DIR`: a commented starter config and the dataset folder skeleton."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import click

from remote.dataset import MAX_REPEATS
from rentrain.cli_types import Number

STARTERS = {
    "sd15": {
        "model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "sdxl_line": "",
        "resolution": 512,
        "batch_size": 2,
        "max_bucket": 1024,
        "te_lr": "5e-5",
        "dim": 32,
        "alpha": 16,
    },
    "sdxl": {
        "model": "stabilityai/stable-diffusion-xl-base-1.0",
        "sdxl_line": "sdxl = true\n",
        "resolution": 1024,
        "batch_size": 2,
        "max_bucket": 2048,
        "te_lr": "0  # UNet only: kohya's advice for SDXL",
        "dim": 32,
        "alpha": 16,
    },
}
TRIGGER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\Z")


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--sdxl", is_flag=True, help="Start from SDXL settings instead of SD 1.5.")
@click.option("--trigger", default="mysubject", show_default=True, help="Trigger word; also the output name.")
@click.option(
    "--repeats", default=10, show_default=True, type=Number(1, MAX_REPEATS, whole=True), help="Repeats per epoch."
)
def init(directory: Path, sdxl: bool, trigger: str, repeats: int) -> None:
    """Write DIRECTORY/config.toml and the folder DIRECTORY/dataset/<repeats>_<trigger>/ for your images.

    Never overwrites: an existing config.toml is an error.
    """
    if not TRIGGER.match(trigger):
        raise click.BadParameter(
            "letters, digits, '_' and '-' only, starting with a letter or digit", param_hint="--trigger"
        )
    config_path = directory / "config.toml"
    if config_path.exists():
        raise click.ClickException(f"{config_path} already exists; rentrain init never overwrites a file")
    image_dir = directory / "dataset" / f"{repeats}_{trigger}"
    template = resources.files("rentrain").joinpath("templates/config.toml").read_text(encoding="utf-8")
    text = template.format(trigger=trigger, **STARTERS["sdxl" if sdxl else "sd15"])
    image_dir.mkdir(parents=True, exist_ok=True)
    with config_path.open("x", encoding="utf-8") as handle:
        handle.write(text)
    click.echo(f"Wrote {config_path}")
    click.echo(f"Put 20-100 images in {image_dir}/, each with a caption file of the same name ending in .txt")
    click.echo(f'(photo_01.png + photo_01.txt containing e.g. "{trigger}, a photo of ...").')
    click.echo(f"Then: rentrain check {config_path}")
