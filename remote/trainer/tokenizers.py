"""CLIP BPE tokenizers built offline from OpenAI's vocabulary (TRAINER.md §5.3).

The openai-clip package ships ``clip/bpe_simple_vocab_16e6.txt.gz``; we derive the vocab.json and
merges.txt that Hugging Face's CLIPTokenizer reads, once, into a cache folder. The package is located
with importlib without importing it (importing it pulls torchvision).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BOS_ID = 49406
EOS_ID = 49407


def cache_root() -> Path:
    """Where rentrain keeps derived files: $RENTRAIN_CACHE_DIR, else ~/.cache/rentrain."""
    env = os.environ.get("RENTRAIN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rentrain"


def find_bpe_vocab() -> Path:
    for package in ("clip", "open_clip"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            candidate = Path(location) / VOCAB_FILE_NAME
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"{VOCAB_FILE_NAME} not found: install the openai-clip package (pip install openai-clip), "
        "which ships OpenAI's CLIP BPE vocabulary"
    )


def build_vocab_files(target: Path, source: Path | None = None) -> Path:
    """Write vocab.json + merges.txt (+ tokenizer configs) into ``target``; returns ``target``."""
    source = source or find_bpe_vocab()
    with gzip.open(source) as packed:
        lines = packed.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    byte_chars = list(_bytes_to_unicode_ordered())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(p) for p in pairs]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == EOS_ID, len(vocab)
    target.mkdir(parents=True, exist_ok=True)
    # per-process temporary names: the ranks of a multi-GPU run build the same cache at the same time
    suffix = f".{os.getpid()}.tmp"
    (target / f"vocab.json{suffix}").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (target / f"merges.txt{suffix}").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    os.replace(target / f"merges.txt{suffix}", target / "merges.txt")
    os.replace(target / f"vocab.json{suffix}", target / "vocab.json")
    return target


def _bytes_to_unicode_ordered() -> list[str]:
    # OpenAI's SimpleTokenizer: vocab = list(bytes_to_unicode().values()), i.e. in the dict's insertion
    # order (printable bytes first, then the remapped ones), not in byte order.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def vocab_dir() -> Path:
    target = cache_root() / "clip-bpe"
    if not ((target / "vocab.json").is_file() and (target / "merges.txt").is_file()):
        build_vocab_files(target)
    return target


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer equal to openai/clip-vit-large-patch14's; pad_token="!" gives SDXL's tokenizer_2."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(vocab_dir()), model_max_length=77, pad_token=pad_token)
