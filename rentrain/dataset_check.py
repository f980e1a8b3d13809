"""The dataset check run on the laptop before any money is spent.

Decodes every image, reads every caption, finds duplicates and rotated images, and counts the
training steps exactly as the trainer (and kohya) will.
"""

from __future__ import annotations

import glob
import hashlib
import io
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from pydantic import BaseModel

from remote.buckets import BucketPlanner, StepPlan, plan_steps
from remote.config import TrainConfig
from remote.dataset import (
    IMAGE_EXTENSIONS,
    CaptionError,
    Finding,
    ImageItem,
    Subset,
    balanced_reg_repeats,
    read_caption,
    repeats_of,
    scan_layout,
)

MIN_RECOMMENDED_IMAGES = 15
MAX_IMAGE_BYTES = 256 << 20
MIN_IMAGE_SIDE = 64  # the smallest bucket side; a smaller image gets an empty bucket with bucket_no_upscale
MAX_ASPECT_RATIO = 8  # beyond it, scaling to cover a bucket makes an image of hundreds of megapixels
EXIF_ORIENTATION = 0x0112
ROTATING_ORIENTATIONS = {5, 6, 7, 8}
PIL_FORMAT_EXTENSIONS = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "WEBP": (".webp",), "BMP": (".bmp",)}


class ImageInfo(BaseModel):
    path: Path
    width: int  # as trained: after the EXIF orientation is applied
    height: int
    sha256: str


class SubsetReport(BaseModel):
    folder: Path
    repeats: int
    class_tokens: str
    is_reg: bool
    images: int
    captions: int
    smallest: str | None  # "WxH" of the image with the fewest pixels
    largest: str | None


class DatasetReport(BaseModel):
    subsets: list[SubsetReport]
    findings: list[Finding]
    step_plan: StepPlan | None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def training_images(self) -> int:
        return sum(s.images for s in self.subsets if not s.is_reg)


def inspect_dataset(train: TrainConfig) -> DatasetReport:
    layout = scan_layout(train.train_data_dir, train.caption_extension, train.reg_data_dir)
    findings = list(layout.problems)

    items = [(subset, item) for subset in layout.subsets for item in subset.images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = list(pool.map(lambda pair: _inspect_image(pair[1].path), items))
    infos: dict[Path, ImageInfo] = {}
    for (_, item), (info, image_findings) in zip(items, decoded, strict=True):
        findings.extend(image_findings)
        if info is not None:
            infos[item.path] = info
            findings.extend(_size_findings(info, train))

    for subset, item in items:
        findings.extend(_caption_findings(item, subset, train))

    findings.extend(_duplicate_findings(infos.values()))
    training_count = sum(len(s.images) for s in layout.train_subsets())
    if 0 < training_count < MIN_RECOMMENDED_IMAGES:
        findings.append(
            Finding(
                severity="warning",
                path=train.train_data_dir,
                message=f"only {training_count} training images; {MIN_RECOMMENDED_IMAGES}-100 is the usual range "
                "for a LoRA that generalises",
            )
        )

    reg_repeats = balanced_reg_repeats(layout) if not layout.errors else {}
    unused = [path for path, n in reg_repeats.items() if n == 0]
    if unused:
        findings.append(
            Finding(
                severity="warning",
                path=train.reg_data_dir or train.train_data_dir,
                message=f"{len(unused)} regularisation image(s) are not used: as in kohya, reg images are added only "
                "until they match the training images per epoch",
            )
        )
    subsets = [_subset_report(subset, infos) for subset in layout.subsets]
    has_errors = any(f.severity == "error" for f in findings)
    step_plan = None if has_errors else count_steps(train, layout.subsets, infos, reg_repeats)
    return DatasetReport(subsets=subsets, findings=findings, step_plan=step_plan)


def count_steps(
    train: TrainConfig, subsets: list[Subset], infos: dict[Path, ImageInfo], reg_repeats: dict[Path, int]
) -> StepPlan:
    planner = BucketPlanner(
        train.resolution,
        train.enable_bucket,
        train.min_bucket_reso,
        train.max_bucket_reso,
        train.bucket_reso_steps,
        train.bucket_no_upscale,
    )
    samples = []
    for subset in subsets:
        for item in subset.images:
            info = infos[item.path]
            repeats = repeats_of(item, subset, reg_repeats)
            samples.extend([planner.assign(info.width, info.height).bucket] * repeats)
    return plan_steps(
        samples,
        train.batch_size,
        train.gradient_accumulation_steps,
        train.max_train_epochs,
        train.max_train_steps,
    )


def _inspect_image(path: Path) -> tuple[ImageInfo | None, list[Finding]]:
    findings: list[Finding] = []
    try:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            return None, [Finding(severity="error", path=path, message=f"is larger than {MAX_IMAGE_BYTES >> 20} MB")]
        data = path.read_bytes()
    except OSError as exc:
        return None, [Finding(severity="error", path=path, message=f"cannot be read: {exc.strerror}")]
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format or "unknown"
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            width, height = image.size
            image.load()
    except Exception as exc:  # PIL raises many kinds for a bad file (struct.error, IndexError, EOFError...)
        return None, [Finding(severity="error", path=path, message=f"cannot be decoded as an image ({exc})")]
    expected = PIL_FORMAT_EXTENSIONS.get(image_format, ())
    if path.suffix.lower() not in expected:
        findings.append(
            Finding(
                severity="warning",
                path=path,
                message=f"is a {image_format} file with a {path.suffix} name; it decodes, but rename it to be safe",
            )
        )
    if orientation in ROTATING_ORIENTATIONS:
        width, height = height, width
    if orientation != 1:
        findings.append(
            Finding(
                severity="warning",
                path=path,
                message=f"has an EXIF orientation ({orientation}); it is trained as image viewers show it, "
                f"{width}x{height}, not as the pixels are stored",
            )
        )
    info = ImageInfo(path=path, width=width, height=height, sha256=hashlib.sha256(data).hexdigest())
    return info, findings


def _size_findings(info: ImageInfo, train: TrainConfig) -> list[Finding]:
    target_w, target_h = train.resolution
    if min(info.width, info.height) < MIN_IMAGE_SIDE:
        message = f"{info.width}x{info.height} is too small to train on: each side must be at least {MIN_IMAGE_SIDE} px"
        return [Finding(severity="error", path=info.path, message=message)]
    if max(info.width, info.height) > MAX_ASPECT_RATIO * min(info.width, info.height):
        message = f"{info.width}x{info.height} is more than {MAX_ASPECT_RATIO} times as long as it is wide: crop it"
        return [Finding(severity="error", path=info.path, message=message)]
    if info.width * info.height < target_w * target_h:
        return [
            Finding(
                severity="warning",
                path=info.path,
                message=f"{info.width}x{info.height} is smaller than the training resolution {target_w}x{target_h}; "
                "it will be upscaled and look soft",
            )
        ]
    return []


def _caption_findings(item: ImageItem, subset: Subset, train: TrainConfig) -> list[Finding]:
    if item.caption_path is None:
        message = (
            f"no caption file ({item.path.with_suffix(train.caption_extension).name}); "
            f"it is trained with the folder's name as its caption: {subset.class_tokens!r}"
        )
        other = _other_caption_files(item.path, train.caption_extension)
        if other:
            message += f'. Found {other[0].name}: set caption_extension = "{other[0].suffix}" if that is the caption'
        caption = subset.class_tokens
        findings = [Finding(severity="warning", path=item.path, message=message)]
    else:
        try:
            caption = read_caption(item.caption_path)
        except CaptionError as exc:
            return [Finding(severity="error", path=item.caption_path, message=str(exc).split(": ", 1)[-1])]
        findings = []
    if train.trigger_word and train.trigger_word.lower() not in caption.lower():
        where = item.caption_path or item.path
        findings.append(
            Finding(
                severity="warning",
                path=where,
                message=f"caption does not contain the trigger word {train.trigger_word!r}",
            )
        )
    return findings


def _other_caption_files(image: Path, caption_extension: str) -> list[Path]:
    return sorted(
        p
        for p in image.parent.glob(f"{glob.escape(image.stem)}.*")
        if p != image and p.suffix != caption_extension and p.suffix.lower() not in IMAGE_EXTENSIONS and p.is_file()
    )


def _duplicate_findings(infos: Iterable[ImageInfo]) -> list[Finding]:
    by_hash: dict[str, list[Path]] = defaultdict(list)
    for info in infos:
        by_hash[info.sha256].append(info.path)
    findings = []
    for paths in by_hash.values():
        if len(paths) > 1:
            first, *others = sorted(paths)
            for other in others:
                findings.append(
                    Finding(severity="warning", path=other, message=f"same content as {first}; it is trained twice")
                )
    return findings


def _subset_report(subset: Subset, infos: dict[Path, ImageInfo]) -> SubsetReport:
    sized = [infos[i.path] for i in subset.images if i.path in infos]
    smallest = min(sized, key=lambda i: i.width * i.height, default=None)
    largest = max(sized, key=lambda i: i.width * i.height, default=None)
    return SubsetReport(
        folder=subset.folder,
        repeats=subset.repeats,
        class_tokens=subset.class_tokens,
        is_reg=subset.is_reg,
        images=len(subset.images),
        captions=sum(1 for i in subset.images if i.caption_path is not None),
        smallest=f"{smallest.width}x{smallest.height}" if smallest else None,
        largest=f"{largest.width}x{largest.height}" if largest else None,
    )


def decodes_as_image(path: Path) -> bool:
    """Whether the file decodes as an image, as the check requires of every image (whatever its name says)."""
    info, _ = _inspect_image(path)
    return info is not None
