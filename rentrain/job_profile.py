"""What a job's cost depends on, read from its config and its dataset: the model family, the steps, the settings
that change the step time, and the sizes that change the setup."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, field_validator

from remote.config import BUILTIN_MODELS, FLUX_PARTS, model_source_kind
from remote.trainer.families import family_facts

if TYPE_CHECKING:
    from remote.config import TrainConfig
    from rentrain.dataset_check import DatasetReport


class JobProfile(BaseModel):
    """What the cost depends on, taken from the config and the dataset."""

    family: str  # a name in remote.trainer.families (sd15, sd2, sdxl, flux)
    builtin_tiny: bool = False  # one of the builtin tiny models: its figures are the tiny models' own
    steps: int  # optimizer steps on one GPU
    # Set when max_train_epochs fixes the length: with N GPUs an epoch then has fewer steps (steps_on).
    # Unset when max_train_steps does: the step count stays and each step trains N x batch_size samples.
    epochs: int | None = None
    batches_per_epoch: int | None = None
    batch_size: int = 1
    resolution: tuple[int, int] = (512, 512)
    gradient_checkpointing: bool = False
    fit_memory: bool = True  # the trainer's memory planning (remote/trainer/memory.py) picks the card's setting
    gradient_accumulation_steps: int = 1
    network_dim: int = 32
    trains_text_encoder: bool = False
    text_encoders_on_gpu: bool = False  # trained, or encoding captions that change every step (not cached)
    bytes_per_value: int = 2  # of the frozen model and activations: 4 without mixed precision
    fp8_base: bool = False  # the frozen denoiser's weights in 8 bits (Flux.1): 1 byte each, upcast as they run
    images: int = 0
    dataset_bytes: int = 0
    local_model_bytes: int = 0  # uploaded from the user's machine instead of downloaded on the instance
    # the model's files that are uploaded rather than downloaded: "model", and Flux.1's "ae", "clip_l", "t5xxl"
    local_parts: tuple[str, ...] = ()
    checkpoints: int = 1  # LoRA files saved, the final one included: each comes home with its training state
    save_bytes_per_value: int = 4  # of the saved LoRA: 2 with save_precision fp16 / bf16
    sample_grids: int = 0
    sample_images: int = 0  # images in all the job's sample grids
    sample_steps: int = 20  # sampler steps per sample image

    @property
    def model_key(self) -> str:
        """The family, and "-tiny" for a builtin tiny model: what the setup's download and load depend on."""
        return f"{self.family}-tiny" if self.builtin_tiny else self.family

    @field_validator("family")
    @classmethod
    def _known_family(cls, name: str) -> str:
        try:
            family_facts(name)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        return name


def guess_model_family(train: TrainConfig) -> str:
    """The family's name (remote.trainer.families) from the config: Flux.1 for kohya's Flux network module (or
    the Flux.1 keys that need it) or a model named so; then `sdxl` if set, else the model reference (an SDXL
    checkpoint nearly always says 'xl'); `v2` marks SD 2.x."""
    model = train.pretrained_model_name_or_path
    name = Path(model).name.lower() if not model.startswith("https://") else model.lower()
    if model in BUILTIN_MODELS:
        return model.removeprefix("builtin:tiny-")
    if train.is_flux or train.ae is not None or train.t5xxl is not None or "flux" in name:
        return "flux"
    if train.sdxl is not None or train.v2:
        return "sdxl" if train.sdxl else "sd2" if train.v2 else "sd15"
    return "sdxl" if ("xl" in name or "pony" in name or "illustrious" in name) else "sd15"


def steps_per_epoch(batches_per_epoch: int, gpus: int, gradient_accumulation_steps: int = 1) -> int:
    """Optimizer steps per epoch with `gpus` data-parallel ranks: ceil(batches / ranks / accumulation), as
    kohya counts under accelerate (each rank gets ceil(batches / ranks) batches, the last ones padded)."""
    return math.ceil(batches_per_epoch / (gpus * gradient_accumulation_steps))


def steps_on(profile: JobProfile, gpus: int) -> int:
    """The job's optimizer steps with `gpus` ranks: fewer per epoch when epochs fix the length."""
    if gpus == 1 or profile.epochs is None or profile.batches_per_epoch is None:
        return profile.steps
    return profile.epochs * steps_per_epoch(profile.batches_per_epoch, gpus, profile.gradient_accumulation_steps)


def profile_from_config(config_path: str | Path) -> JobProfile:
    """Read the config and count the dataset's steps exactly as the trainer will (rentrain.dataset_check)."""
    from remote.config import load_config
    from rentrain.dataset_check import inspect_dataset

    loaded = load_config(config_path)
    return profile_from_check(loaded.train, inspect_dataset(loaded.train))


def profile_from_check(train: TrainConfig, report: DatasetReport) -> JobProfile:
    """The cost profile of a config whose dataset was already inspected."""
    if report.step_plan is None:
        problems = "; ".join(str(f.message) for f in report.findings if f.severity == "error") or "no images found"
        raise ValueError(f"cannot count training steps: {problems}")
    images = sum(s.images for s in report.subsets)
    dataset_bytes = _folder_bytes(train.train_data_dir) + (
        _folder_bytes(train.reg_data_dir) if train.reg_data_dir else 0
    )
    model = train.pretrained_model_name_or_path
    local_parts = _local_parts(train)
    local_model_bytes = sum(_path_bytes(Path(reference)) for reference in _local_references(train))
    plan = report.step_plan
    # the final file and grid, and those every n epochs or steps before the last (remote/trainer/loop.py)
    grids = (
        1
        + _before_last(plan.epochs, train.sample_every_n_epochs)
        + _before_last(plan.total_steps, train.sample_every_n_steps)
    )
    prompts = _prompt_count(train.sample_prompts)
    return JobProfile(
        family=guess_model_family(train),
        builtin_tiny=model in BUILTIN_MODELS,
        steps=plan.total_steps,
        epochs=plan.epochs if train.max_train_epochs is not None else None,
        batches_per_epoch=plan.batches_per_epoch if train.max_train_epochs is not None else None,
        batch_size=train.batch_size,
        resolution=train.resolution,
        gradient_checkpointing=train.gradient_checkpointing,
        fit_memory=train.fit_memory,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        network_dim=train.network_dim,
        trains_text_encoder=train.trains_text_encoder,
        text_encoders_on_gpu=train.text_encoders_on_gpu,
        bytes_per_value=4 if train.mixed_precision == "no" else 2,
        fp8_base=train.fp8_base,
        images=images,
        dataset_bytes=dataset_bytes,
        local_model_bytes=local_model_bytes,
        local_parts=local_parts,
        checkpoints=1
        + _before_last(plan.epochs, train.save_every_n_epochs)
        + _before_last(plan.total_steps, train.save_every_n_steps),
        save_bytes_per_value=4 if train.save_precision in (None, "float") else 2,
        sample_grids=grids if prompts else 0,
        sample_images=(grids if prompts else 0) * prompts * len(train.sample_seeds) * len(train.sample_weights),
        sample_steps=train.sample_steps,
    )


def _local_references(train: TrainConfig) -> list[str]:
    """The model files named in the config that are on this machine (uploaded with the job)."""
    references = [train.pretrained_model_name_or_path, *(getattr(train, key) for key in FLUX_PARTS)]
    return [r for r in references if r is not None and model_source_kind(r) in ("local_file", "local_dir")]


def _local_parts(train: TrainConfig) -> tuple[str, ...]:
    """Which of the model's parts are uploaded: the model itself, and each Flux.1 file the config names that is
    local, or that it leaves to a local model folder."""
    model_local = model_source_kind(train.pretrained_model_name_or_path) in ("local_file", "local_dir")
    parts = ["model"] if model_local else []
    for key in FLUX_PARTS:
        reference = getattr(train, key)
        if (reference is None and model_local) or (reference is not None and model_source_kind(reference) != "url"):
            parts.append(key)
    return tuple(parts)


def _path_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else _folder_bytes(path)


def _before_last(count: int, every: int | None) -> int:
    return (count - 1) // every if every else 0


def _prompt_count(prompts: list[str] | Path | None) -> int:
    """Sample prompts: a list, or a prompt file's lines that are neither blank nor comments."""
    if prompts is None:
        return 0
    if isinstance(prompts, Path):
        try:
            lines = prompts.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return 0  # the config check refuses a prompt file it cannot read
        return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))
    return len(prompts)


def _folder_bytes(folder: Path | None) -> int:
    if folder is None or not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
