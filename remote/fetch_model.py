"""Fetch the base model on the instance: a Hugging Face hub id into the hub cache, or an https URL into a folder.

    python3 fetch_model.py REFERENCE DEST_DIR

Runs while the client uploads the dataset. A URL download resumes from a .part file.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

# What loading the UNet, VAE, text encoders, tokenizers and scheduler needs; not the repo's single-file copies.
DIFFUSERS_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/*",
    "tokenizer*/*",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder*/model.safetensors",
]


def url_file_name(url: str) -> str:
    name = Path(unquote(urlparse(url).path)).name
    if not name or name.startswith("."):
        raise ValueError(f"cannot tell a file name from {url}")
    return name


def fetch_url(url: str, dest_dir: Path) -> Path:
    target = dest_dir / url_file_name(url)
    if target.exists():
        return target
    partial = target.with_name(target.name + ".part")
    offset = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        mode = "ab" if offset and response.status == 206 else "wb"
        with partial.open(mode) as handle:
            while block := response.read(1 << 20):
                handle.write(block)
    partial.rename(target)
    return target


def fetch_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=DIFFUSERS_PATTERNS))


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: fetch_model.py REFERENCE DEST_DIR", file=sys.stderr)
        return 2
    reference, dest = argv[1], Path(argv[2])
    dest.mkdir(parents=True, exist_ok=True)
    path = fetch_url(reference, dest) if reference.startswith("https://") else fetch_hub(reference)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
