"""The training data, kohya's way: images in buckets, repeats from folder names, processed captions,
latents cached on disk (keyed by image content, bucket and VAE) and batches that never mix buckets.

Every random choice (batch order, caption shuffle/dropout, flips) is a pure function of the run's seed
and the position in the run, so a resumed run draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from remote.buckets import BucketPlanner, StepPlan, plan_steps
from remote.dataset import CaptionError, DatasetLayout, balanced_reg_repeats, caption_for, repeats_of, scan_layout
from remote.hashing import file_sha256

from .tokenizers import cache_root

if TYPE_CHECKING:
    from remote.config import TrainConfig


class DataError(Exception):
    """The dataset cannot be trained on; the message names the file or folder."""


@dataclass
class ImageRecord:
    path: Path
    caption: str  # the caption file's text (or the folder's class tokens), before caption options
    repeats: int
    is_reg: bool
    original_size: tuple[int, int]  # (w, h) after EXIF orientation
    bucket: tuple[int, int]  # (w, h)
    resized: tuple[int, int]  # (w, h) before the centre crop
    crop_ltrb: tuple[float, float, float, float]
    content_hash: str = ""
    latent: torch.Tensor | None = None
    latent_flipped: torch.Tensor | None = None
    subset: str = ""


@dataclass
class Dataset:
    records: list[ImageRecord]
    plan: StepPlan
    buckets: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # bucket -> record index per repeat
    warnings: list[str] = field(default_factory=list)


# Part of each latent cache key: latents made by an earlier way of turning files into pixels are not reused.
PIXELS_VERSION = "p3"  # p2: JPEGs decoded at a reduced scale (open_image's at_least); p3: 16-bit greyscale scaled

# Pillow's modes for 16-bit greyscale PNGs: values 0-65535, which convert("RGB") clips to white.
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def open_image(path: Path, at_least: tuple[int, int] | None = None):
    """The image as shown (EXIF-rotated), in RGB. With ``at_least`` (w, h as shown), a JPEG is decoded at
    the smallest of its built-in 1/2, 1/4, 1/8 scales that still covers that size: a camera photo bound for
    a 512px bucket decodes several times faster, and is then resized as any other image."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            if at_least is not None and image.format in ("JPEG", "MPO"):  # MPO: phones' multi-picture JPEG
                rotated = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
                image.draft("RGB", (at_least[1], at_least[0]) if rotated else at_least)
            shown = ImageOps.exif_transpose(image)
            if shown.mode in WIDE_GREY_MODES:
                shown = shown.convert("I").point(lambda value: value / 257, "L")
            return shown.convert("RGB")
    except Exception as exc:
        raise DataError(f"{path}: cannot read the image: {exc}") from exc


def image_size(path: Path) -> tuple[int, int]:
    """(w, h) as shown, i.e. after EXIF orientation, read from the header without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception as exc:
        raise DataError(f"{path}: cannot read the image: {exc}") from exc
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def crop_ltrb(bucket: tuple[int, int], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """kohya's BucketManager.get_crop_ltrb (SDXL's crop conditioning; a letterbox-style offset)."""
    bucket_ar = bucket[0] / bucket[1]
    image_ar = image_size[0] / image_size[1]
    resized_w: float
    resized_h: float
    if bucket_ar > image_ar:
        resized_w, resized_h = bucket[1] * image_ar, bucket[1]
    else:
        resized_w, resized_h = bucket[0], bucket[0] / image_ar
    left = (bucket[0] - resized_w) // 2
    top = (bucket[1] - resized_h) // 2
    return left, top, left + resized_w, top + resized_h


def load_pixels(record: ImageRecord) -> torch.Tensor:
    """The image scaled to cover its bucket and centre-cropped, as a [3, H, W] tensor in [-1, 1]."""
    from PIL import Image

    image = open_image(record.path, at_least=record.resized)
    if image.size != record.resized:
        enlarge = record.resized[0] > image.size[0] or record.resized[1] > image.size[1]
        resample = Image.Resampling.LANCZOS if enlarge else Image.Resampling.BOX  # BOX ~ cv2 INTER_AREA
        image = image.resize(record.resized, resample=resample)
    width, height = image.size
    left = (width - record.bucket[0]) // 2 if width > record.bucket[0] else 0
    top = (height - record.bucket[1]) // 2 if height > record.bucket[1] else 0
    image = image.crop((left, top, left + record.bucket[0], top + record.bucket[1]))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(record.bucket[1], record.bucket[0], 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


def planner_for(cfg: TrainConfig) -> BucketPlanner:
    return BucketPlanner(
        cfg.resolution,
        cfg.enable_bucket,
        cfg.min_bucket_reso,
        cfg.max_bucket_reso,
        cfg.bucket_reso_steps,
        cfg.bucket_no_upscale,
    )


def build_dataset(cfg: TrainConfig, layout: DatasetLayout | None = None, processes: int = 1) -> Dataset:
    """Scan the kohya layout, size every image into its bucket and count steps with remote.buckets."""
    if layout is None:
        layout = scan_layout(cfg.train_data_dir, cfg.caption_extension, cfg.reg_data_dir)
    if layout.errors:
        raise DataError("; ".join(str(p) for p in layout.errors))
    planner = planner_for(cfg)
    reg_repeats = balanced_reg_repeats(layout)
    records: list[ImageRecord] = []
    for subset in layout.subsets:
        for item in subset.images:
            repeats = repeats_of(item, subset, reg_repeats)
            if repeats == 0:
                continue  # a reg image kohya never adds: reg samples already match the training samples
            try:
                caption = caption_for(item, subset)
            except CaptionError as exc:
                raise DataError(str(exc)) from exc
            size = image_size(item.path)
            choice = planner.assign(*size)
            records.append(
                ImageRecord(
                    path=item.path,
                    caption=caption,
                    repeats=repeats,
                    is_reg=subset.is_reg,
                    original_size=size,
                    bucket=choice.bucket,
                    resized=choice.resized,
                    crop_ltrb=crop_ltrb(choice.bucket, size),
                    subset=subset.folder.name,
                )
            )
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        buckets[record.bucket].extend([index] * record.repeats)
    plan = plan_steps(
        (r.bucket for r in records for _ in range(r.repeats)),
        cfg.batch_size,
        cfg.gradient_accumulation_steps,
        cfg.max_train_epochs,
        cfg.max_train_steps,
        processes=processes,
    )
    warnings = [str(p) for p in layout.problems if p.severity == "warning"]
    return Dataset(records=records, plan=plan, buckets=dict(sorted(buckets.items())), warnings=warnings)


def epoch_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """kohya's per-epoch order: shuffle each bucket's items and the batch order with seed + epoch."""
    rng = random.Random(seed + epoch)
    batches: list[list[int]] = []
    for _, items in dataset.buckets.items():
        items = list(items)
        rng.shuffle(items)
        for start in range(0, len(items), batch_size):
            batches.append(items[start : start + batch_size])
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------------------
# Captions


def base_caption(cfg: TrainConfig, caption: str) -> str:
    if cfg.caption_prefix:
        caption = cfg.caption_prefix + " " + caption
    if cfg.caption_suffix:
        caption = caption + " " + cfg.caption_suffix
    return caption


def process_caption(cfg: TrainConfig, caption: str, rng: random.Random, epoch: int) -> str:
    """kohya's process_caption: prefix/suffix, dropout, keep_tokens + shuffle + tag dropout, ", " join.

    ``epoch`` is 1-based, as kohya's current_epoch.
    """
    caption = base_caption(cfg, caption)
    dropped = cfg.caption_dropout_rate > 0 and rng.random() < cfg.caption_dropout_rate
    dropped = dropped or (cfg.caption_dropout_every_n_epochs > 0 and epoch % cfg.caption_dropout_every_n_epochs == 0)
    if dropped:
        return ""
    if cfg.shuffle_caption or cfg.caption_tag_dropout_rate > 0:
        tokens = [t.strip() for t in caption.strip().split(cfg.caption_separator)]
        tokens = [t for t in tokens if t]
        fixed, flex = tokens[: cfg.keep_tokens], tokens[cfg.keep_tokens :]
        if cfg.shuffle_caption:
            rng.shuffle(flex)
        if cfg.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= cfg.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex)
    return caption


def caption_rng(seed: int, epoch: int, batch_index: int, slot: int) -> random.Random:
    return random.Random(f"caption:{seed}:{epoch}:{batch_index}:{slot}")


def tag_frequency(records: list[ImageRecord]) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per subset folder, how many captions hold each comma-separated tag."""
    out: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        for tag in {t.strip() for t in record.caption.split(",") if t.strip()}:
            out[record.subset][tag] += 1
    return {k: dict(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------
# Latent cache


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A cheap content hash of the VAE's weights, so cached latents are never reused across VAEs."""
    digest = hashlib.sha256()
    for name, tensor in vae.state_dict().items():
        flat = tensor.detach().reshape(-1)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        sample = torch.cat([flat[:64], flat[-64:]]).to("cpu", torch.float32)
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def latent_cache_dir() -> Path:
    return cache_root() / "latents"


def cache_latents(
    dataset: Dataset,
    vae,
    scaling_factor: float,
    device: torch.device,
    flip: bool,
    batch_size: int | None = None,
    shift_factor: float = 0.0,
) -> tuple[int, int]:
    """Fill record.latent (and latent_flipped) from the disk cache, encoding only what is missing.

    Returns (encoded, reused). Latents are encoded with the VAE in float32 and sampled with a generator
    seeded from the cache key, so the same image always gives the same latent. Hashing, decoding and
    writing run on worker threads (PIL and hashlib release the GIL): the next chunk's images are decoded
    while the GPU encodes this one. The VAE stays NCHW: its GroupNorms would copy a channels_last input
    to NCHW and back (bench/latent_cache_speed.py: the encoder alone is 20% slower channels_last).
    """
    from concurrent.futures import ThreadPoolExecutor

    shift = f"-{shift_factor:g}" if shift_factor else ""  # (latent - shift) * scale: Flux's AE shifts
    folder = latent_cache_dir() / f"{vae_fingerprint(vae)}-{scaling_factor:g}{shift}"
    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for record, digest in zip(
            dataset.records, pool.map(lambda r: r.content_hash or file_sha256(r.path), dataset.records), strict=True
        ):
            record.content_hash = digest
        found = list(pool.map(lambda r: _read_cached_latent(folder, r, flip), dataset.records))
        missing: dict[tuple[int, int], list[tuple[ImageRecord, Path]]] = defaultdict(list)
        for record, (path, hit) in zip(dataset.records, found, strict=True):
            if not hit:
                missing[record.bucket].append((record, path))
        reused = len(dataset.records) - sum(len(items) for items in missing.values())
        chunks = []
        for bucket, items in missing.items():
            # the fp32 VAE's activations are large: 4 images at 512x512, 1 at 1024x1024
            size = batch_size or max(1, (4 * 512 * 512) // (bucket[0] * bucket[1]))
            chunks += [items[start : start + size] for start in range(0, len(items), size)]
        vae_dtype = next(vae.parameters()).dtype
        vae.to(device, torch.float32)
        writes = []
        try:
            decoded = pool.submit(_decode_chunk, chunks[0]) if chunks else None
            for index, chunk in enumerate(chunks):
                assert decoded is not None, "each chunk's decode is submitted before its turn"
                pixels = decoded.result().to(device, non_blocking=True)
                if index + 1 < len(chunks):
                    decoded = pool.submit(_decode_chunk, chunks[index + 1])
                outs = _encode_views(vae, pixels, chunk, scaling_factor, device, flip, shift_factor)
                for row, (record, path) in enumerate(chunk):
                    record.latent = outs[0][row].contiguous()
                    record.latent_flipped = outs[1][row].contiguous() if flip else None
                    writes.append(pool.submit(_write_latent, path, record.latent, record.latent_flipped))
        finally:
            vae.to("cpu", vae_dtype)
        for write in writes:
            write.result()
    return len(writes), reused


def _read_cached_latent(folder: Path, record: ImageRecord, flip: bool) -> tuple[Path, bool]:
    """(the record's cache file, whether it was read into the record)."""
    from safetensors.torch import load_file

    key = (
        f"{record.content_hash}_{record.bucket[0]}x{record.bucket[1]}_"
        f"{record.resized[0]}x{record.resized[1]}_{PIXELS_VERSION}"
    )
    path = folder / f"{key}.safetensors"
    if path.is_file():
        try:
            data = load_file(str(path))
        except Exception:
            return path, False
        if not flip or "flipped" in data:
            record.latent = data["latent"]
            record.latent_flipped = data.get("flipped")
            return path, True
    return path, False


def _decode_chunk(chunk: list[tuple[ImageRecord, Path]]) -> torch.Tensor:
    pixels = torch.stack([load_pixels(record) for record, _ in chunk])
    return pixels.pin_memory() if torch.cuda.is_available() else pixels


def _encode_views(
    vae, pixels: torch.Tensor, chunk, scaling_factor: float, device: torch.device, flip: bool, shift_factor: float
) -> list[torch.Tensor]:
    """[latents] or [latents, latents of the mirrored images], on the CPU in float32."""
    outs = []
    with torch.no_grad():
        for view in [pixels, pixels.flip(-1)] if flip else [pixels]:
            dist = vae.encode(view).latent_dist
            latents = []
            for row, (record, _) in enumerate(chunk):
                gen = torch.Generator(device=device).manual_seed(int(record.content_hash[:12], 16))
                noise = torch.randn(dist.mean[row].shape, generator=gen, device=device)
                latents.append(dist.mean[row] + dist.std[row] * noise)
            latent = torch.stack(latents)
            latent = (latent - shift_factor) * scaling_factor if shift_factor else latent * scaling_factor
            outs.append(torch.nan_to_num(latent, nan=0.0).to("cpu", torch.float32))
    return outs


def _write_latent(path: Path, latent: torch.Tensor, flipped: torch.Tensor | None) -> None:
    from safetensors.torch import save_file

    tensors = {"latent": latent} if flipped is None else {"latent": latent, "flipped": flipped}
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # jobs, and duplicate images, share files
    save_file(tensors, str(tmp))
    tmp.replace(path)
