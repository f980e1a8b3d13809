"""What goes up to the instance: the dataset's images and captions and the sample prompts file, nothing else.

A dataset folder is the user's own and may hold anything (a private key, a `.env`, `credentials.toml`, a
link into the home folder). The upload is an explicit list built from the same layout the dataset check and
the trainer read (remote.dataset.scan_layout): every image of an `N_name` folder and its caption file. A
symbolic link goes up only when it leads to an image (by extension and by content: it decodes, as the
dataset check requires) or to a caption file; anything else is skipped, and `rentrain check` says what.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, computed_field

from remote.config import TrainConfig
from remote.dataset import IMAGE_EXTENSIONS, CaptionError, printable, read_caption, scan_layout
from rentrain.dataset_check import decodes_as_image

SHOWN_SKIPPED = 10  # `check` and `run` list this many skipped files, then a count


class SkippedFile(BaseModel):
    path: str  # printable: a name that is not UTF-8 shows its bytes escaped
    reason: str


class UploadFolder(BaseModel):
    """One dataset folder (train_data_dir or reg_data_dir) as it goes up."""

    root: Path
    files: list[str] = Field(exclude=True)  # relative to root, as they land on the instance (N_name/x.png)
    file_count: int
    bytes: int
    skipped: list[SkippedFile]


class UploadPlan(BaseModel):
    folders: list[UploadFolder]
    sample_prompts: Path | None  # a prompts file named in the config; inline prompts travel in the config

    @computed_field  # type: ignore[prop-decorator]
    @property
    def file_count(self) -> int:
        return sum(f.file_count for f in self.folders) + (1 if self.sample_prompts else 0)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bytes(self) -> int:
        prompts = self.sample_prompts.stat().st_size if self.sample_prompts else 0
        return sum(f.bytes for f in self.folders) + prompts

    @property
    def skipped(self) -> list[SkippedFile]:
        return [s for f in self.folders for s in f.skipped]

    def summary(self) -> str:
        line = f"{self.file_count} files, {self.bytes / 1e6:.1f} MB will be uploaded"
        skipped = len(self.skipped)
        if skipped:
            line += f" ({skipped} other file(s) in the dataset folder stay here: `rentrain check` lists them)"
        return line


def plan_upload(train: TrainConfig) -> UploadPlan:
    folders = [list_dataset_files(train.train_data_dir, train.caption_extension)]
    if train.reg_data_dir is not None:
        folders.append(list_dataset_files(train.reg_data_dir, train.caption_extension))
    prompts = train.sample_prompts if isinstance(train.sample_prompts, Path) else None
    return UploadPlan(folders=folders, sample_prompts=prompts)


def list_dataset_files(root: Path, caption_extension: str) -> UploadFolder:
    """The images and captions of root's N_name folders that may go up, and every other file, skipped with why."""
    accepted: dict[Path, str] = {}  # path as listed -> its name relative to root
    skipped: dict[Path, str] = {}
    real_root = root.resolve()
    subsets = scan_layout(root, caption_extension).subsets
    subset_folders = {s.folder for s in subsets}
    for subset in subsets:
        for item in subset.images:
            refusal = _link_refusal(root, real_root, item.path, "image", caption_extension)
            if refusal:
                skipped[item.path] = refusal
                if item.caption_path is not None:
                    skipped[item.caption_path] = "its image is not uploaded"
                continue
            accepted[item.path] = _relative(root, item.path)
            if item.caption_path is None:
                continue
            refusal = _link_refusal(root, real_root, item.caption_path, "caption", caption_extension)
            if refusal:
                skipped[item.caption_path] = refusal
            else:
                accepted[item.caption_path] = _relative(root, item.caption_path)
    for path in _entries(root):
        if path in subset_folders:
            for inner in _entries(path):
                if inner not in accepted and inner not in skipped:
                    skipped[inner] = _why_not_used(inner, caption_extension)
        else:
            skipped[path] = _why_not_used(path, caption_extension, loose=True)
    files = sorted(accepted.values())
    return UploadFolder(
        root=root,
        files=files,
        file_count=len(files),
        bytes=sum((root / name).stat().st_size for name in files),
        skipped=[SkippedFile(path=printable(p), reason=why) for p, why in sorted(skipped.items())],
    )


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []  # the dataset check reports a folder it cannot list


def _relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _link_refusal(root: Path, real_root: Path, path: Path, kind: str, caption_extension: str) -> str | None:
    """Why a file reached through a symbolic link (itself or its folder) may not go up; None when it may."""
    target = path.resolve()
    if target == real_root / path.relative_to(root):
        return None  # no link on the way
    if not target.is_file():
        return f"a link to {printable(target)}, which is not a file"
    if kind == "caption":
        if target.suffix.lower() != caption_extension.lower():
            return f"a link to {printable(target)}, which is not a caption file ({caption_extension})"
        try:
            read_caption(target)
        except CaptionError:
            return f"a link to {printable(target)}, which is not a caption (one line of UTF-8 text)"
        return None
    if target.suffix.lower() not in IMAGE_EXTENSIONS or not decodes_as_image(target):
        return f"a link to {printable(target)}, which is not an image"
    return None


def _why_not_used(path: Path, caption_extension: str, loose: bool = False) -> str:
    if path.is_symlink() and not path.exists():
        return f"a link to {printable(os.readlink(path))}, which does not exist"
    if path.name.startswith("."):
        return "a hidden file or folder"
    if path.is_dir():
        return "not an N_name image folder" if loose else "a folder inside an image folder"
    if loose:
        return "not inside an N_name image folder"
    if path.suffix.lower() == caption_extension.lower():
        return "a caption with no image of the same name"
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return "an image the dataset check does not use"
    return "not an image or a caption"
