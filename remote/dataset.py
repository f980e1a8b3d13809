"""The kohya DreamBooth folder layout: `train_data_dir/N_name/` holds images and same-stem captions.

This module only lists and names things (standard library + pydantic): the laptop's `rentrain check`
decodes and inspects the images on top of it, and the trainer loads them from the same listing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SUBSET_FOLDER = re.compile(r"^(\d+)_(.*)$")
MAX_REPEATS = 10_000
MAX_SAMPLES_PER_EPOCH = 1_000_000  # images x repeats, over all folders
MAX_CAPTION_BYTES = 1 << 20


def printable(text: str | Path) -> str:
    """Text safe to print and to put in JSON: bytes of a file name that are not UTF-8 appear as \\xNN."""
    text = str(text)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


class ImageItem(BaseModel):
    path: Path
    caption_path: Path | None


class Subset(BaseModel):
    folder: Path
    repeats: int
    class_tokens: str
    is_reg: bool
    images: list[ImageItem]


class Finding(BaseModel):
    """A problem found in the dataset, naming the file or folder it concerns."""

    severity: Literal["error", "warning"]
    path: Path
    message: str

    def __str__(self) -> str:
        return printable(f"{self.path}: {self.message}")


class DatasetLayout(BaseModel):
    subsets: list[Subset]
    problems: list[Finding]

    @property
    def errors(self) -> list[Finding]:
        return [p for p in self.problems if p.severity == "error"]

    def train_subsets(self) -> list[Subset]:
        return [s for s in self.subsets if not s.is_reg]

    def reg_subsets(self) -> list[Subset]:
        return [s for s in self.subsets if s.is_reg]


class CaptionError(ValueError):
    pass


def scan_layout(train_data_dir: Path, caption_extension: str, reg_data_dir: Path | None = None) -> DatasetLayout:
    """List the subsets of the training (and regularisation) folders, with every layout problem found."""
    subsets: list[Subset] = []
    problems: list[Finding] = []
    roots = [(train_data_dir, False)] + ([(reg_data_dir, True)] if reg_data_dir is not None else [])
    for root, is_reg in roots:
        _scan_root(root, is_reg, caption_extension, subsets, problems)
    samples = sum(len(s.images) * s.repeats for s in subsets)
    if samples > MAX_SAMPLES_PER_EPOCH:
        problems.append(
            Finding(
                severity="error",
                path=train_data_dir,
                message=f"{samples} samples per epoch (images x repeats); at most {MAX_SAMPLES_PER_EPOCH}: "
                "lower the repeat counts in the folder names",
            )
        )
    if not any(s.images for s in subsets if not s.is_reg) and not any(p.severity == "error" for p in problems):
        problems.append(Finding(severity="error", path=train_data_dir, message="no training images found"))
    return DatasetLayout(subsets=subsets, problems=problems)


def _scan_root(
    root: Path, is_reg: bool, caption_extension: str, subsets: list[Subset], problems: list[Finding]
) -> None:
    key = "reg_data_dir" if is_reg else "train_data_dir"
    if not root.exists():
        problems.append(Finding(severity="error", path=root, message=f"{key} does not exist"))
        return
    if not root.is_dir():
        problems.append(Finding(severity="error", path=root, message=f"{key} is not a folder"))
        return
    entries = _usable_entries(root, problems)
    loose_images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    folders = [p for p in entries if p.is_dir()]
    if loose_images:
        problems.append(
            Finding(
                severity="error" if not folders else "warning",
                path=root,
                message=f"{len(loose_images)} image(s) directly in {key} are not used: {key} must be the parent "
                "of folders named N_name (N = repeats), e.g. 10_mychar/",
            )
        )
    for folder in folders:
        subset = _scan_subset(folder, is_reg, caption_extension, problems)
        if subset is not None:
            subsets.append(subset)


def _scan_subset(folder: Path, is_reg: bool, caption_extension: str, problems: list[Finding]) -> Subset | None:
    match = SUBSET_FOLDER.match(folder.name)
    if not match:
        problems.append(
            Finding(
                severity="error",
                path=folder,
                message=f"folder name must start with the repeat count and an underscore, e.g. 10_{folder.name}",
            )
        )
        return None
    digits = match.group(1)
    repeats = int(digits) if len(digits) <= len(str(MAX_REPEATS)) else MAX_REPEATS + 1
    if not 1 <= repeats <= MAX_REPEATS:
        problems.append(
            Finding(severity="error", path=folder, message=f"repeat count {digits} must be from 1 to {MAX_REPEATS}")
        )
        return None
    images = []
    for path in _usable_entries(folder, problems):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            caption = path.with_suffix(caption_extension)
            if caption.exists() and not caption.is_file():
                problems.append(Finding(severity="error", path=caption, message="caption is not a file"))
            images.append(ImageItem(path=path, caption_path=caption if caption.is_file() else None))
    if not images:
        problems.append(Finding(severity="warning", path=folder, message="no images in this folder"))
    return Subset(folder=folder, repeats=repeats, class_tokens=match.group(2), is_reg=is_reg, images=images)


def _usable_entries(folder: Path, problems: list[Finding]) -> list[Path]:
    """The folder's entries, sorted, without hidden ones and without those refused here (each reported):
    a name that is not UTF-8, a symbolic link to nothing."""
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        problems.append(Finding(severity="error", path=folder, message=f"cannot be listed: {exc.strerror}"))
        return []
    usable = []
    for path in entries:
        if not _is_utf8(path.name):
            message = "the file name is not valid UTF-8 (shown escaped); rename it"
            problems.append(Finding(severity="error", path=path, message=message))
        elif path.is_symlink() and not path.exists():
            message = f"is a symbolic link to {os.readlink(path)}, which does not exist (or links back to itself)"
            problems.append(Finding(severity="error", path=path, message=message))
        else:
            usable.append(path)
    return usable


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_caption(path: Path) -> str:
    """kohya's rule: UTF-8, the first non-empty line, stripped. An empty file is an error, as in kohya."""
    try:
        if path.stat().st_size > MAX_CAPTION_BYTES:
            raise CaptionError(f"{path}: caption file is larger than {MAX_CAPTION_BYTES} bytes; a caption is one line")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CaptionError(f"{path}: caption is not UTF-8 text") from None
    except OSError as exc:
        raise CaptionError(f"{path}: caption cannot be read: {exc.strerror}") from None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    raise CaptionError(f"{path}: caption file is empty (delete it to use the folder name instead)")


def caption_for(item: ImageItem, subset: Subset) -> str:
    """The caption kohya trains with: the caption file's, or the folder's class tokens when there is none."""
    if item.caption_path is not None:
        return read_caption(item.caption_path)
    return subset.class_tokens


def balanced_reg_repeats(layout: DatasetLayout) -> dict[Path, int]:
    """kohya raises regularisation repeats round-robin until reg samples >= training samples per epoch.
    Every reg image is in the map; 0 means kohya never adds it ("some of reg images are not used")."""
    train_samples = sum(len(s.images) * s.repeats for s in layout.train_subsets())
    reg_items = [(s, item) for s in layout.reg_subsets() for item in s.images]
    repeats: dict[Path, int] = {item.path: 0 for _, item in reg_items}
    if not reg_items:
        return repeats
    count = 0
    first_loop = True
    per_image: dict[Path, int] = {}
    while count < train_samples:
        for subset, item in reg_items:
            if first_loop:
                per_image[item.path] = subset.repeats
                count += subset.repeats
            else:
                per_image[item.path] += 1
                count += 1
            if count >= train_samples:
                break
        first_loop = False
    repeats.update(per_image)
    return repeats


def repeats_of(item: ImageItem, subset: Subset, reg_repeats: dict[Path, int]) -> int:
    """Samples of this image per epoch: the folder's repeats, or for reg images kohya's balanced count."""
    return reg_repeats.get(item.path, 0) if subset.is_reg else subset.repeats
