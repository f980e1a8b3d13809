"""Fetch the base model on the instance: a Hugging Face hub id into the hub cache, or an https URL into a folder;
and Flux.1's separate files (ae, clip_l, t5xxl) given as URLs, each into DEST_DIR/<part>/.

    python3 fetch_model.py REFERENCE DEST_DIR [PART=URL ...]

REFERENCE "" fetches no base model (it is uploaded, or built in): only the parts.

Runs while the client uploads the dataset. A URL download resumes from a .part file. `HF_TOKEN`, when set,
goes to huggingface.co and its subdomains only, and not on to where they redirect.

Standard library only at import: the laptop's config check uses url_file_name too.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

# What loading the UNet or transformer, VAE, text encoders, tokenizers and scheduler needs; not the repo's
# single-file copies (FLUX.1-dev's flux1-dev.safetensors and ae.safetensors beside its diffusers folders).
DIFFUSERS_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/*",
    "tokenizer*/*",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder*/model.safetensors",
    # sharded weights (Flux.1's transformer and T5-XXL) and their indexes
    "transformer/diffusion_pytorch_model*.safetensors*",
    "text_encoder*/model-*-of-*.safetensors",
    "text_encoder*/model.safetensors.index.json",
]
# Flux.1's separate files, named as the config keys (remote/config.py FLUX_PARTS)
PARTS = ("ae", "clip_l", "t5xxl")


HF_HOST = "huggingface.co"
HF_HUB = f"https://{HF_HOST}"


def url_file_name(url: str) -> str:
    """The name a downloaded model is saved under: the last part of the URL's path (no query, no fragment).
    The client names the file in the instance's config with this same function."""
    name = Path(unquote(urlparse(url).path)).name
    if not name or name.startswith(".") or "\x00" in name:
        raise ValueError(f"cannot tell a file name from {url}")
    return name


def sends_hf_token(url: str) -> bool:
    """HF_TOKEN goes to https://huggingface.co and its subdomains, matched on the exact host name."""
    parsed = urlparse(url)
    host = (parsed.hostname or "").lower()
    return parsed.scheme == "https" and (host == HF_HOST or host.endswith("." + HF_HOST))


def download_request(url: str, offset: int = 0) -> urllib.request.Request:
    """A GET for `url` (from byte `offset`), with HF_TOKEN only where sends_hf_token allows it. The token
    is an unredirected header: urllib does not repeat it to the host a redirect points to."""
    request = urllib.request.Request(url, headers={"User-Agent": "rentrain"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    token = os.environ.get("HF_TOKEN", "").strip()
    if token and sends_hf_token(url):
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    return request


def fetch_url(url: str, dest_dir: Path) -> Path:
    target = dest_dir / url_file_name(url)
    if target.exists():
        return target
    partial = target.with_name(target.name + ".part")
    offset = partial.stat().st_size if partial.exists() else 0
    request = download_request(url, offset)
    with urllib.request.urlopen(request, timeout=60) as response:
        mode = "ab" if offset and response.status == 206 else "wb"
        with partial.open(mode) as handle:
            while block := response.read(1 << 20):
                handle.write(block)
    partial.rename(target)
    return target


def part_argument(part: str, url: str) -> str:
    """The command line's PART=URL for one of Flux.1's files."""
    if part not in PARTS:
        raise ValueError(f"unknown model part {part!r}; parts: {', '.join(PARTS)}")
    return f"{part}={url}"


def fetch_parts(arguments: list[str], dest_dir: Path) -> list[Path]:
    """Each PART=URL into DEST_DIR/PART/ (the name the client gives the instance's config: url_file_name)."""
    fetched = []
    for argument in arguments:
        part, _, url = argument.partition("=")
        if part not in PARTS or not url.startswith("https://"):
            raise ValueError(f"expected PART=https://... with PART one of {', '.join(PARTS)}, got {argument!r}")
        folder = dest_dir / part
        folder.mkdir(parents=True, exist_ok=True)
        fetched.append(fetch_url(url, folder))
    return fetched


def fetch_hub(repo_id: str) -> Path:
    """The repo's diffusers files. With HF_TOKEN set, from huggingface.co itself whatever HF_ENDPOINT the image
    sets: the token goes to Hugging Face only."""
    from huggingface_hub import snapshot_download

    endpoint = HF_HUB if os.environ.get("HF_TOKEN", "").strip() else None
    return Path(snapshot_download(repo_id, allow_patterns=DIFFUSERS_PATTERNS, endpoint=endpoint))


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: fetch_model.py REFERENCE DEST_DIR [PART=URL ...]", file=sys.stderr)
        return 2
    reference, dest = argv[1], Path(argv[2])
    dest.mkdir(parents=True, exist_ok=True)
    if reference:
        print(fetch_url(reference, dest) if reference.startswith("https://") else fetch_hub(reference))
    for path in fetch_parts(argv[3:], dest):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
