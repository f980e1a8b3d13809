"""The training config: kohya-style TOML in, one validated pydantic model out.

Accepted forms, all of which load unchanged:
- sectioned: ``[model] [dataset] [training] [sample]`` (rentrain's own spelling);
- the section names kohya's GUIs and notebooks write (``[model_arguments]``, ``[training_arguments]``...);
- kohya's flat form (every key at the top level).

As in kohya, sections are flattened one level, so a key may sit in any training section. Unlike kohya,
an unknown key is an error that names it, its section and the closest known key, and values are
type-checked. The ``[rentrain]`` table holds the job's own settings (provider, budget, GPU needs).

This module is standard library + pydantic only: it runs on the laptop and on the rented machine.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from remote.fetch_model import url_file_name
from remote.names import file_stem_problem
from remote.trainer.optimizer_args import optimizer_arg_problem

JOB_SECTION = "rentrain"
TOP_LEVEL = "top level"
FILE_KEY = "(file)"  # an issue with the file itself: missing, unreadable, not TOML

# kohya's spelling -> ours. Both are accepted; two spellings of one key in one file are an error.
KEY_ALIASES: dict[str, str] = {
    "train_batch_size": "batch_size",
    "lr_scheduler_type": "lr_scheduler",
}

# kohya keys that change nothing in rentrain. They load, and `rentrain check` says why they are ignored.
IGNORED_KOHYA_KEYS: dict[str, str] = {
    "xformers": "rentrain always uses PyTorch SDPA attention",
    "sdpa": "rentrain always uses PyTorch SDPA attention",
    "mem_eff_attn": "rentrain always uses PyTorch SDPA attention",
    "cache_latents": "rentrain always caches latents",
    "cache_latents_to_disk": "rentrain always caches latents on disk, keyed by image content",
    "cache_text_encoder_outputs": "rentrain caches text-encoder outputs whenever the text encoder is not trained "
    "and captions are not shuffled or dropped",
    "cache_text_encoder_outputs_to_disk": "rentrain caches text-encoder outputs in memory when it can",
    "lowram": "rentrain loads weights straight to the GPU",
    "lowvram": "rentrain plans memory from the card it rented",
    "max_data_loader_n_workers": "latents are cached, so no image-loading workers run during training",
    "persistent_data_loader_workers": "latents are cached, so no image-loading workers run during training",
    "logging_dir": "progress goes to <output_dir>/events.jsonl",
    "log_with": "progress goes to <output_dir>/events.jsonl",
    "log_prefix": "progress goes to <output_dir>/events.jsonl",
    "save_state": "rentrain always saves a resumable state with every checkpoint",
    "save_model_as_dtype": "use save_precision",
    "no_half_vae": "rentrain always encodes latents with the VAE in float32",
    "training_comment": "kept out of the file's metadata",
    "sample_sampler": "samples use DDIM (SD, SDXL) or the flow-matching Euler sampler (Flux.1)",
    "huggingface_repo_id": "rentrain does not upload to the Hugging Face hub",
    "async_upload": "rentrain does not upload to the Hugging Face hub",
    "shuffle_caption_separator": "use caption_separator",
    "ddp_timeout": "rentrain's data-parallel runs use torch.distributed's default timeout",
    "vae_batch_size": "rentrain picks the VAE batch size",
    "highvram": "rentrain plans memory from the card it rented",
    "blocks_to_swap": "rentrain keeps the whole Flux.1 transformer on the GPU and plans memory from the card it "
    "rented (fp8_base fits a 24 GB card); no blocks are swapped to CPU memory",
    "huber_c": "used by loss_type huber or smooth_l1 only; rentrain trains with the L2 loss",
    "huber_schedule": "used by loss_type huber or smooth_l1 only; rentrain trains with the L2 loss",
}

LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "Prodigy", "Adafactor")
KNOWN_PROVIDERS = ("local", "vast", "runpod", "gpuflow", "ssh")
BUILTIN_MODELS = ("builtin:tiny-sd15", "builtin:tiny-sdxl", "builtin:tiny-flux")
NETWORK_MODULES = ("networks.lora", "networks.lora_flux")
FLUX_NETWORK_MODULE = "networks.lora_flux"
FLUX_TINY = "builtin:tiny-flux"
# kohya's defaults for the T5-XXL prompt length (library/flux_train_utils.py, --t5xxl_max_token_length)
T5_TOKENS_DEV, T5_TOKENS_SCHNELL = 512, 256
# FLUX.1's transformer: 19 double-stream and 38 single-stream blocks (kohya's networks/lora_flux.py)
FLUX_DOUBLE_BLOCKS, FLUX_SINGLE_BLOCKS = 19, 38
# kohya's block swap moves n // 2 double and (n - n // 2) * 2 single blocks and keeps 2 of each on the GPU
BLOCK_SELECTION_ARGS = {
    "train_double_block_indices": FLUX_DOUBLE_BLOCKS,
    "train_single_block_indices": FLUX_SINGLE_BLOCKS,
}
CONV_ARGS = ("conv_dim", "conv_alpha")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")  # kohya's; rentrain trains l2
MAX_TOKEN_LENGTHS = (75, 150, 225)
MAX_CONFIG_BYTES = 1 << 20
MAX_PROMPT_FILE_BYTES = 1 << 20
MAX_RESOLUTION = 4096
MAX_EPOCHS = 10_000
MAX_STEPS = 1_000_000
MAX_LEARNING_RATE = 10.0
SEED_LIMIT = 2**32  # numpy's, which kohya seeds; torch takes these too
CAPTION_EXTENSION = re.compile(r"^\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,31}\Z")


class ConfigIssue(BaseModel):
    key: str
    section: str
    message: str
    unknown_key: bool = False

    def __str__(self) -> str:
        if self.key == FILE_KEY:
            return self.message
        where = f"[{self.section}]" if self.section != TOP_LEVEL else "the top level"
        if self.unknown_key:
            return f"{self.key}: unknown key in {where}{self.message}"
        return f"{self.key} in {where}: {self.message}"


class ConfigError(Exception):
    """Every problem found in one config file, each naming its key and section."""

    def __init__(self, path: Path | str, issues: list[ConfigIssue]):
        self.path = str(path)
        self.issues = issues
        lines = "\n".join(f"  - {issue}" for issue in issues)
        super().__init__(f"{self.path}: {len(issues)} problem(s) in the config:\n{lines}")


def _section(name: str, description: str, default: Any = ..., allowed: str | None = None, **kwargs: Any) -> Any:
    """A training key. `allowed` documents a range that a validator checks (ge/le/gt document themselves)."""
    extra: dict[str, Any] = {"section": name}
    if allowed is not None:
        extra["allowed"] = allowed
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def _model(description: str, default: Any = ..., **kw: Any) -> Any:
    return _section("model", description, default, **kw)


def _dataset(description: str, default: Any = ..., **kw: Any) -> Any:
    return _section("dataset", description, default, **kw)


def _training(description: str, default: Any = ..., **kw: Any) -> Any:
    return _section("training", description, default, **kw)


def _sample(description: str, default: Any = ..., **kw: Any) -> Any:
    return _section("sample", description, default, **kw)


def _refuse_bool_for_number(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """TOML's true/false are not numbers: pydantic would read `batch_size = true` as 1."""
    if isinstance(value, bool) and info.field_name is not None:
        annotation = cls.model_fields[info.field_name].annotation
        if _numeric(annotation) and not _accepts_bool(annotation):
            raise ValueError(f"must be a number, got {str(value).lower()}")
    return value


def _type_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _numeric(annotation: Any) -> bool:
    return any(arg in (int, float) for arg in _type_args(annotation))


def _accepts_bool(annotation: Any) -> bool:
    return bool in _type_args(annotation)


class TrainConfig(BaseModel):
    """What the trainer needs. Field names are kohya's; defaults are kohya's unless the text says."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # [model]
    pretrained_model_name_or_path: str = _model(
        "Base model: a .safetensors/.ckpt file or diffusers folder (uploaded with the job), a Hugging Face "
        "hub id or an https:// URL (both fetched on the instance), or builtin:tiny-sd15 / builtin:tiny-sdxl / "
        "builtin:tiny-flux. Flux.1: flux1-dev.safetensors (the original single file, with ae, clip_l and t5xxl) "
        'or a diffusers folder / hub id such as "black-forest-labs/FLUX.1-dev".'
    )
    v2: bool = _model("SD 2.x architecture (OpenCLIP-H text encoder).", False)
    v_parameterization: bool = _model("v-prediction target (SD 2.x 768-v, v-pred SDXL models).", False)
    sdxl: bool | None = _model("SDXL base model. Unset: detected from the weights.", None)
    vae: str | None = _model("A separate VAE file or folder to encode latents with.", None)
    clip_skip: int | None = _model(
        "Use the text encoder's k-th layer from the end (kohya/A1111 meaning; 2 = penultimate). "
        "Ignored for SDXL, as in kohya.",
        None,
        ge=1,
        le=12,
    )
    max_token_length: int | None = _model(
        "Caption length in tokens: 75 (unset), 150 or 225.", None, allowed=", ".join(map(str, MAX_TOKEN_LENGTHS))
    )
    ae: str | None = _model(
        "Flux.1 only: the autoencoder file (ae.safetensors): a local file (uploaded) or an https:// URL (fetched "
        "on the instance). Needed with a single-file Flux.1 model.",
        None,
    )
    clip_l: str | None = _model("Flux.1 only: the CLIP-L text encoder file (clip_l.safetensors), as ae.", None)
    t5xxl: str | None = _model("Flux.1 only: the T5-XXL text encoder file (t5xxl_fp16.safetensors), as ae.", None)
    t5xxl_max_token_length: int | None = _model(
        f"Flux.1 only: T5-XXL prompt length in tokens (unset: {T5_TOKENS_DEV} for [dev], {T5_TOKENS_SCHNELL} for "
        "[schnell], as kohya).",
        None,
        ge=1,
        le=T5_TOKENS_DEV,
    )
    apply_t5_attn_mask: bool = _model(
        "Flux.1 only: mask the T5-XXL padding in its encoder and in the transformer's attention.", False
    )
    fp8_base: bool = _model(
        "Flux.1 only: keep the frozen transformer's weights in 8 bits (12 GB instead of 24 GB): what fits [dev] "
        "on a 24 GB card.",
        False,
    )

    # [dataset]
    train_data_dir: Path = _dataset("Parent folder of the `N_name` image folders (N = repeats).")
    reg_data_dir: Path | None = _dataset("Parent folder of regularisation `N_name` folders.", None)
    trigger_word: str | None = _dataset(
        "rentrain only: a word every caption should contain; `check` warns about captions without it.", None
    )
    resolution: tuple[int, int] = _dataset(
        'Training resolution: 512, "512", "512,512" or [512, 512] (width, height).',
        (512, 512),
        allowed=f"each side a multiple of 64, 64-{MAX_RESOLUTION}",
    )
    batch_size: int = _dataset("Images per step (kohya: train_batch_size).", 1, ge=1, le=256)
    enable_bucket: bool = _dataset("Aspect-ratio bucketing.", False)
    min_bucket_reso: int = _dataset("Smallest bucket side.", 256, ge=64, le=MAX_RESOLUTION)
    max_bucket_reso: int = _dataset("Largest bucket side.", 1024, ge=64, le=MAX_RESOLUTION)
    bucket_reso_steps: int = _dataset("Bucket side step; 64, or 32 for SDXL.", 64, allowed="32 or 64")
    bucket_no_upscale: bool = _dataset("Never upscale: each image gets a bucket no larger than itself.", False)
    caption_extension: str = _dataset(
        'Caption file extension. Default ".txt", as the tutorials use; kohya\'s own default is ".caption".',
        ".txt",
        allowed="a dot and up to 32 letters, digits, '.', '_', '-'",
    )
    shuffle_caption: bool = _dataset("Shuffle the comma-separated tags of each caption every step.", False)
    keep_tokens: int = _dataset("Tags at the start of a caption that shuffling keeps in place.", 0, ge=0, le=1000)
    caption_separator: str = _dataset("Tag separator for shuffling and tag dropout.", ",", allowed="not empty")
    caption_prefix: str | None = _dataset("Text put before every caption.", None)
    caption_suffix: str | None = _dataset("Text put after every caption.", None)
    caption_dropout_rate: float = _dataset('Probability that a caption is replaced by "".', 0.0, ge=0, le=1)
    caption_dropout_every_n_epochs: int = _dataset(
        "Drop every caption in every n-th epoch (0: never).", 0, ge=0, le=MAX_EPOCHS
    )
    caption_tag_dropout_rate: float = _dataset("Probability that each non-kept tag is dropped.", 0.0, ge=0, le=1)
    flip_aug: bool = _dataset("Random horizontal flips (both flips are cached).", False)
    prior_loss_weight: float = _dataset("Loss weight of regularisation images.", 1.0, ge=0, le=100)

    # [training]
    output_dir: Path = _training("Where checkpoints, the final LoRA, samples and events.jsonl go.", Path("output"))
    output_name: str | None = _training(
        "File name stem: <name>.safetensors and <name>-000001.safetensors. Unset: last / epoch-000001.",
        None,
        allowed="ASCII letters, digits, '.', '_', '-', starting with a letter or digit; at most 200 bytes",
    )
    max_train_epochs: int | None = _training(
        "Epochs to train. Wins over max_train_steps, as in kohya.", None, ge=1, le=MAX_EPOCHS
    )
    max_train_steps: int | None = _training("Steps to train when max_train_epochs is unset.", None, ge=1, le=MAX_STEPS)
    learning_rate: float | None = _training(
        "Learning rate; the fallback for unet_lr and text_encoder_lr.", None, gt=0, le=MAX_LEARNING_RATE
    )
    unet_lr: float | None = _training(
        "UNet LoRA learning rate (unset: learning_rate).", None, gt=0, le=MAX_LEARNING_RATE
    )
    text_encoder_lr: float | None = _training(
        "Text-encoder LoRA learning rate (unset: learning_rate; 0: train the UNet only).",
        None,
        ge=0,
        le=MAX_LEARNING_RATE,
    )
    lr_scheduler: str = _training(f"One of {', '.join(LR_SCHEDULERS)}.", "constant")
    lr_warmup_steps: int | float = _training(
        'Warm-up optimizer steps; a number below 1 (or "5%") is a fraction of the total.',
        0,
        allowed=f"0-{MAX_STEPS} steps, or a fraction below 1",
    )
    lr_scheduler_num_cycles: int = _training("Restarts of cosine_with_restarts.", 1, ge=1, le=1000)
    lr_scheduler_power: float = _training("Power of the polynomial scheduler.", 1.0, gt=0, le=100)
    network_module: str = _training(
        "networks.lora (kohya's LoRA) for SD models, networks.lora_flux for Flux.1 (which it selects).",
        "networks.lora",
        allowed=", ".join(NETWORK_MODULES),
    )
    network_dim: int = _training("LoRA rank.", 4, ge=1, le=1024)
    network_alpha: float = _training("LoRA alpha; scale = alpha / dim (0: alpha = dim).", 1.0, ge=0, le=4096)
    network_args: list[str] = _training(
        "SD: conv_dim=N and conv_alpha=X add LoRA to 3x3 convolutions. Flux.1: train_double_block_indices=S and "
        'train_single_block_indices=S pick the blocks that get LoRA (S: "all", "none", or indices and ranges '
        'such as "0-5,10"; unset: every block).',
        [],
        allowed=f"conv_dim 1-1024, conv_alpha above 0 and at most 4096; block indices 0-{FLUX_DOUBLE_BLOCKS - 1} "
        f"(double), 0-{FLUX_SINGLE_BLOCKS - 1} (single)",
    )
    network_train_unet_only: bool = _training("Train the UNet LoRA only.", False)
    network_train_text_encoder_only: bool = _training("Train the text-encoder LoRA only.", False)
    optimizer_type: str = _training(
        f"One of {', '.join(OPTIMIZERS)} (any case). Adafactor runs with a fixed learning rate "
        "(relative_step=False, scale_parameter=False), unlike kohya's bare default.",
        "AdamW",
    )
    optimizer_args: list[str] = _training(
        'Extra optimizer arguments: ["weight_decay=0.01", "betas=0.9,0.99"].',
        [],
        allowed="the keyword arguments of the optimizer's constructor (remote/trainer/optimizer_args.py)",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = _training("Compute precision of the frozen model.", "no")
    full_fp16: bool = _training("Not supported (kohya's full_fp16); use bf16 with full_bf16.", False)
    full_bf16: bool = _training("Keep the LoRA weights in bf16 too (kohya's full_bf16).", False)
    save_precision: Literal["float", "fp16", "bf16"] | None = _training(
        "dtype of saved files (unset: as trained, fp32).", None
    )
    save_every_n_epochs: int | None = _training("Save a checkpoint every n epochs.", None, ge=1, le=MAX_EPOCHS)
    save_every_n_steps: int | None = _training("Save a checkpoint every n steps.", None, ge=1, le=MAX_STEPS)
    save_last_n_epochs: int | None = _training(
        "Keep only the last n epoch checkpoints on the instance.", None, ge=1, le=MAX_EPOCHS
    )
    save_model_as: str = _training("Only safetensors.", "safetensors")
    gradient_checkpointing: bool = _training(
        "Recompute activations in backward to save memory. With fit_memory, rentrain turns it on where the card "
        "needs it and off where the card holds the activations without it (measured families only).",
        False,
    )
    cuda_graphs: bool = _training(
        "On NVIDIA GPUs, replay each step's forward and backward as a CUDA graph, one per batch shape "
        "(several times faster; rentrain's own key). false: plain eager steps.",
        True,
    )
    fit_memory: bool = _training(
        "On NVIDIA GPUs, pick the fastest setting that fits the card's memory and trains the same function: "
        "when the configured batch would not fit, each batch run as micro-batches (same batches, steps and "
        "gradient), gradient checkpointing, or for AdamW 8-bit optimizer state; when the card holds the "
        "activations, no gradient checkpointing even where configured. The start event says what was chosen "
        "(rentrain's own key). false: run exactly as configured.",
        True,
    )
    loss_type: str = _training("Only l2 (kohya's default; kohya's l1, huber and smooth_l1 are not supported).", "l2")
    timestep_sampling: Literal["sigma", "uniform", "sigmoid", "shift", "flux_shift"] = _training(
        "Flux.1 only: how noise levels are drawn: sigma, uniform, sigmoid, shift or flux_shift (kohya's).", "sigma"
    )
    sigmoid_scale: float = _training(
        "Flux.1 only: scale of the normal draw for sigmoid, shift and flux_shift sampling.", 1.0, gt=0, le=100
    )
    discrete_flow_shift: float = _training(
        "Flux.1 only: the shift of timestep_sampling = shift (and of sigma sampling's schedule).", 3.0, gt=0, le=100
    )
    model_prediction_type: Literal["raw", "additive", "sigma_scaled"] = _training(
        "Flux.1 only: how the prediction is read: raw, additive or sigma_scaled (kohya's).", "sigma_scaled"
    )
    guidance_scale: float = _training(
        "Flux.1 only: the guidance value [dev] (a guidance-distilled model) is trained at; [schnell] ignores it.",
        3.5,
        ge=0,
        le=100,
    )
    gradient_accumulation_steps: int = _training("Batches per optimizer step.", 1, ge=1, le=1024)
    max_grad_norm: float = _training("Gradient clipping norm (0: off).", 1.0, ge=0, le=1000)
    noise_offset: float | None = _training("Offset noise strength (0.05-0.1 typical).", None, ge=0, le=1)
    min_snr_gamma: float | None = _training("Min-SNR loss weighting gamma (5 typical).", None, gt=0, le=1000)
    seed: int | None = _training(
        "Random seed (unset: a random one, written to the metadata).", None, ge=0, lt=SEED_LIMIT
    )

    # [sample]
    sample_prompts: list[str] | Path | None = _sample(
        "Prompts for sample grids: a list, or a kohya prompt file (one prompt per line; --n/--w/... options "
        "after the prompt are read for --n only).",
        None,
        allowed="a list, or an existing UTF-8 text file of at most 1 MB",
    )
    sample_every_n_epochs: int | None = _sample(
        "Sample grid every n epochs (always one at the end).", None, ge=1, le=MAX_EPOCHS
    )
    sample_every_n_steps: int | None = _sample("Sample grid every n steps.", None, ge=1, le=MAX_STEPS)
    sample_weights: list[float] = _sample(
        "LoRA weights in the grid's columns.", [0.5, 0.7, 0.8, 1.0], allowed="1-16 numbers, each -10 to 10"
    )
    sample_seeds: list[int] = _sample(
        "Seeds; one grid row per prompt and seed.", [1, 2], allowed=f"1-16 seeds, each 0 to {SEED_LIMIT - 1}"
    )
    sample_steps: int = _sample("Sampler steps per image.", 20, ge=1, le=1000)
    sample_guidance_scale: float | None = _sample(
        "Guidance scale of the samples: classifier-free for SD (default 7.0); FLUX.1 [dev]'s embedded guidance "
        "(default 3.5).",
        None,
        ge=0,
        le=100,
    )

    _no_bools = field_validator("*", mode="before")(classmethod(_refuse_bool_for_number))

    @field_validator("resolution", mode="before")
    @classmethod
    def _parse_resolution(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError('must be a number, "W,H" or [W, H]')
        if isinstance(value, int):
            return (value, value)
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",")]
            if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
                raise ValueError(f'must be "512" or "512,768", got {value!r}')
            numbers = [int(p) for p in parts]
            return (numbers[0], numbers[-1])
        if isinstance(value, (list, tuple)) and len(value) == 1:
            return (value[0], value[0])
        return value

    @field_validator("resolution")
    @classmethod
    def _check_resolution(cls, value: tuple[int, int]) -> tuple[int, int]:
        for side in value:
            if side < 64 or side > MAX_RESOLUTION or side % 64:
                raise ValueError(
                    f"each side must be a multiple of 64 from 64 to {MAX_RESOLUTION}, got {value[0]},{value[1]}"
                )
        return value

    @field_validator("text_encoder_lr", mode="before")
    @classmethod
    def _te_lr(cls, value: Any) -> Any:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("one learning rate for all text encoders; per-encoder lists are not supported")
            value = value[0]
        return value

    @field_validator("lr_scheduler")
    @classmethod
    def _scheduler(cls, value: str) -> str:
        return _choice(value, LR_SCHEDULERS)

    @field_validator("optimizer_type")
    @classmethod
    def _optimizer(cls, value: str) -> str:
        if value == "":
            return "AdamW"
        return _choice(value, OPTIMIZERS)

    @field_validator("lr_warmup_steps", mode="before")
    @classmethod
    def _warmup(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if not text.endswith("%"):
                raise ValueError(f"must be a number of steps, a fraction below 1 or a percentage, got {value!r}")
            try:
                value = float(text[:-1]) / 100
            except ValueError:
                raise ValueError(f'must be a percentage such as "5%", got {value!r}') from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("must be a number of steps, a fraction below 1 or a percentage")
        if not math.isfinite(value) or value < 0 or value > MAX_STEPS:
            raise ValueError(f"must be 0 to {MAX_STEPS} steps or a fraction below 1, got {value}")
        if isinstance(value, float) and value >= 1:
            if not value.is_integer():
                raise ValueError(f"a fraction must be below 1, got {value}")
            return int(value)
        return value

    @field_validator("network_module")
    @classmethod
    def _network_module(cls, value: str) -> str:
        if value not in NETWORK_MODULES:
            raise ValueError(
                f"only networks.lora (kohya's LoRA) and networks.lora_flux (Flux.1) are supported, got {value!r}"
            )
        return value

    @field_validator("network_args")
    @classmethod
    def _network_args(cls, value: list[str]) -> list[str]:
        for item in value:
            name, sep, setting = item.partition("=")
            name = name.strip()
            if not sep or name not in (*CONV_ARGS, *BLOCK_SELECTION_ARGS):
                raise ValueError(
                    f"{item!r}: only conv_dim=N and conv_alpha=X (SD), train_double_block_indices=S and "
                    "train_single_block_indices=S (Flux.1) are supported"
                )
            if name in BLOCK_SELECTION_ARGS:
                parse_block_selection(setting, BLOCK_SELECTION_ARGS[name], name)
                continue
            try:
                parsed = float(setting)
            except ValueError:
                raise ValueError(f"{item!r}: {name} must be a number") from None
            if name == "conv_dim" and not (parsed.is_integer() and 1 <= parsed <= 1024):
                raise ValueError(f"{item!r}: conv_dim must be a whole number from 1 to 1024")
            if name == "conv_alpha" and not (0 < parsed <= 4096):
                raise ValueError(f"{item!r}: conv_alpha must be above 0 and at most 4096")
        return value

    @field_validator("loss_type")
    @classmethod
    def _loss_type(cls, value: str) -> str:
        chosen = _choice(value, LOSS_TYPES)
        if chosen != "l2":
            raise ValueError(f"{chosen!r} is not supported: rentrain trains with the l2 (mean squared error) loss")
        return chosen

    @field_validator("output_name")
    @classmethod
    def _output_name(cls, value: str | None) -> str | None:
        problem = None if value is None else file_stem_problem(value)
        if problem:
            raise ValueError(f"{value!r} {problem}")
        return value

    @field_validator("save_model_as")
    @classmethod
    def _save_model_as(cls, value: str) -> str:
        if value != "safetensors":
            raise ValueError(
                f"rentrain writes .safetensors only (it loads in AUTOMATIC1111, ComfyUI and diffusers), got {value!r}"
            )
        return value

    @field_validator("caption_extension")
    @classmethod
    def _caption_extension(cls, value: str) -> str:
        if not CAPTION_EXTENSION.match(value):
            raise ValueError(
                f"must start with a dot and have up to 32 letters, digits, '.', '_' or '-', such as \".txt\", "
                f"got {value!r}"
            )
        return value

    @field_validator("caption_separator")
    @classmethod
    def _caption_separator(cls, value: str) -> str:
        if not value:
            raise ValueError('is empty; the usual separator is ","')
        return value

    @field_validator("max_token_length")
    @classmethod
    def _token_length(cls, value: int | None) -> int | None:
        if value is not None and value not in MAX_TOKEN_LENGTHS:
            raise ValueError(f"must be 75, 150 or 225, got {value}")
        return value

    @field_validator("bucket_reso_steps")
    @classmethod
    def _bucket_steps(cls, value: int) -> int:
        if value not in (32, 64):
            raise ValueError(f"must be 64 or 32, got {value}")
        return value

    @field_validator("sample_weights")
    @classmethod
    def _sample_weights(cls, value: list[float]) -> list[float]:
        if not 1 <= len(value) <= 16 or not all(-10 <= weight <= 10 for weight in value):
            raise ValueError(f"must be 1 to 16 weights, each from -10 to 10, got {value}")
        return value

    @field_validator("sample_seeds")
    @classmethod
    def _sample_seeds(cls, value: list[int]) -> list[int]:
        if not 1 <= len(value) <= 16 or not all(0 <= seed < SEED_LIMIT for seed in value):
            raise ValueError(f"must be 1 to 16 seeds, each from 0 to {SEED_LIMIT - 1}, got {value}")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        problems: list[tuple[str, str]] = []
        if self.max_train_epochs is None and self.max_train_steps is None:
            problems.append(("max_train_epochs", "missing: set max_train_epochs or max_train_steps"))
        if self.min_bucket_reso > self.max_bucket_reso:
            problems.append(
                ("min_bucket_reso", f"{self.min_bucket_reso} is greater than max_bucket_reso {self.max_bucket_reso}")
            )
        elif self.enable_bucket and not self.bucket_no_upscale:
            if min(self.resolution) < self.min_bucket_reso:
                message = f"{self.min_bucket_reso} is above the resolution {self.resolution}"
                problems.append(("min_bucket_reso", message))
            if max(self.resolution) > self.max_bucket_reso:
                message = f"{self.max_bucket_reso} is below the resolution {self.resolution}"
                problems.append(("max_bucket_reso", message))
        if self.learning_rate is None and self.unet_lr is None and not self.network_train_text_encoder_only:
            problems.append(("learning_rate", "missing: set learning_rate (or unet_lr)"))
        if self.network_train_unet_only and self.network_train_text_encoder_only:
            problems.append(("network_train_unet_only", "contradicts network_train_text_encoder_only"))
        if self.network_train_text_encoder_only and self.effective_text_encoder_lr == 0:
            problems.append(("network_train_text_encoder_only", "set, but the text encoder learning rate is 0"))
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            message = 'warm-up needs lr_scheduler = "constant_with_warmup" or a decaying one'
            problems.append(("lr_warmup_steps", message))
        if self.full_fp16:
            problems.append(
                (
                    "full_fp16",
                    "not supported: fp16 LoRA weights need kohya's patched loss scaler; use mixed_precision = "
                    '"fp16" without it, or mixed_precision = "bf16" with full_bf16 = true',
                )
            )
        if self.full_bf16 and self.mixed_precision != "bf16":
            problems.append(("full_bf16", 'needs mixed_precision = "bf16"'))
        for item in self.optimizer_args:
            problem = optimizer_arg_problem(self.optimizer_type, item)
            if problem:
                problems.append(("optimizer_args", problem))
        problems += self._prodigy_problems()
        problems += self._family_problems()
        if problems:
            raise _CrossFieldError(problems)
        return self

    def _prodigy_problems(self) -> list[tuple[str, str]]:
        """Prodigy (prodigyopt) estimates one step size for all parameters and refuses parameter groups whose
        learning rates differ, other than 0: found on the first step, after the rental, without this check."""
        if self.optimizer_type.lower() != "prodigy" or not self.trains_text_encoder:
            return []
        unet, text = self.effective_unet_lr, self.effective_text_encoder_lr
        if unet == 0 or unet == text:
            return []
        message = (
            f"{text:g} while the UNet's is {unet:g}: Prodigy takes one learning rate for everything it trains "
            "(prodigyopt refuses two); set unet_lr and text_encoder_lr alike (Prodigy's usual is 1.0), or "
            "network_train_unet_only = true"
        )
        return [("text_encoder_lr", message)]

    def _family_problems(self) -> list[tuple[str, str]]:
        """Keys of the other family (Flux.1 against SD), and what a Flux.1 model needs."""
        set_keys = [key for key in self.model_fields_set if not _inactive(key, getattr(self, key))]
        if not self.is_flux:
            flux_module = f'network_module = "{FLUX_NETWORK_MODULE}"'
            message = f"Flux.1 only: set {flux_module} for a Flux.1 model"
            problems = [(key, message) for key in FLUX_ONLY_KEYS if key in set_keys]
            problems += [
                ("network_args", f"{name}: {message}")
                for name in BLOCK_SELECTION_ARGS
                if _network_arg_text(self.network_args, name) is not None
            ]
            return problems
        problems = [(key, f"SD/SDXL only: {why}") for key, why in SD_ONLY_KEYS.items() if key in set_keys]
        problems += [
            ("network_args", f"{name}: SD only; Flux.1 has no convolutions to put LoRA on")
            for name in CONV_ARGS
            if _network_arg_text(self.network_args, name) is not None
        ]
        if "network_module" in self.model_fields_set and self.network_module != FLUX_NETWORK_MODULE:
            problems.append(("network_module", f'{FLUX_TINY} is a Flux.1 model: use "{FLUX_NETWORK_MODULE}"'))
        if self.trains_text_encoder:
            problems.append(
                (
                    "network_train_unet_only",
                    "rentrain trains Flux.1's transformer only: set network_train_unet_only = true "
                    "(or text_encoder_lr = 0)",
                )
            )
        if _single_file(self.pretrained_model_name_or_path):
            problems += [
                (key, f"missing: a single-file Flux.1 model holds the transformer only; give the {what} file")
                for key, what in FLUX_PARTS.items()
                if getattr(self, key) is None
            ]
        return problems

    @property
    def is_flux(self) -> bool:
        """A Flux.1 config: kohya's Flux network module, or the built-in tiny Flux model."""
        return self.network_module == FLUX_NETWORK_MODULE or self.pretrained_model_name_or_path == FLUX_TINY

    @property
    def train_double_block_indices(self) -> frozenset[int] | None:
        """The double-stream blocks that get LoRA (network_args, kohya's syntax); None: every block (not given, or
        "all": the model's own count, which a smaller model than FLUX.1's 19 and 38 blocks has fewer of)."""
        return self._block_selection("train_double_block_indices")

    @property
    def train_single_block_indices(self) -> frozenset[int] | None:
        """The single-stream blocks that get LoRA; None: not given, every block."""
        return self._block_selection("train_single_block_indices")

    def _block_selection(self, name: str) -> frozenset[int] | None:
        text = _network_arg_text(self.network_args, name)
        if text is not None and text.strip() == "all":
            return None
        return None if text is None else parse_block_selection(text, BLOCK_SELECTION_ARGS[name], name)

    def t5_token_length(self, schnell: bool) -> int:
        """T5-XXL's prompt length: t5xxl_max_token_length, else kohya's default for the model."""
        if self.t5xxl_max_token_length is not None:
            return self.t5xxl_max_token_length
        return T5_TOKENS_SCHNELL if schnell else T5_TOKENS_DEV

    @property
    def effective_unet_lr(self) -> float:
        if self.network_train_text_encoder_only:
            return 0.0
        return self.unet_lr if self.unet_lr is not None else (self.learning_rate or 0.0)

    @property
    def effective_text_encoder_lr(self) -> float:
        if self.network_train_unet_only:
            return 0.0
        if self.text_encoder_lr is not None:
            return self.text_encoder_lr
        return self.learning_rate if self.learning_rate is not None else 0.0

    @property
    def trains_text_encoder(self) -> bool:
        return self.effective_text_encoder_lr > 0

    @property
    def captions_are_static(self) -> bool:
        """Whether each image's caption is the same every step (nothing shuffled or dropped): only then are the
        text encoders' outputs cached and the encoders sent off the GPU."""
        return not (
            self.shuffle_caption
            or self.caption_dropout_rate
            or self.caption_dropout_every_n_epochs
            or self.caption_tag_dropout_rate
        )

    @property
    def text_encoders_on_gpu(self) -> bool:
        """Whether the text encoders stay on the GPU while training: trained, or encoding changing captions."""
        return self.trains_text_encoder or not self.captions_are_static

    @property
    def conv_dim(self) -> int | None:
        value = _network_arg(self.network_args, "conv_dim")
        return int(value) if value is not None else None

    @property
    def conv_alpha(self) -> float:
        value = _network_arg(self.network_args, "conv_alpha")
        return value if value is not None else 1.0

    @property
    def scale_alpha(self) -> float:
        """The alpha actually used: kohya treats 0 as alpha = dim."""
        return self.network_alpha or float(self.network_dim)

    def warmup_steps_for(self, total_steps: int) -> int:
        if isinstance(self.lr_warmup_steps, float) and self.lr_warmup_steps < 1:
            return int(self.lr_warmup_steps * total_steps)  # kohya rounds down
        return int(self.lr_warmup_steps)


# PyTorch's official image (docs/tested-versions.md): torch 2.11.0 built for CUDA 12.8. CUDA's minor-version
# compatibility runs it on any CUDA 12 driver (R525 and later), hence min_cuda's 12.1.
DEFAULT_IMAGE = "pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime"


class JobSettings(BaseModel):
    """The `[rentrain]` table: how and where the job runs. The trainer ignores it. The command line's
    options for these settings (rentrain/cli_types.py) take their ranges from here."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    provider: str | None = Field(None, description=f"One of {', '.join(KNOWN_PROVIDERS)}; --provider wins.")
    host: str | None = Field(None, description='For provider = "ssh": user@host[:port] of a machine rented by hand.')
    gpu: list[str] = Field([], description='GPU models to consider, such as ["RTX 4090", "RTX 3090"] (empty: any).')
    gpu_count: int = Field(
        1,
        ge=1,
        le=8,
        description="GPUs per instance; N > 1 trains data parallel (N x batch_size images per step); --gpus wins.",
    )
    min_vram_gb: float = Field(24, gt=0, le=1024, description="Minimum memory per GPU, in GB.")
    min_reliability: float = Field(0.98, ge=0, le=1, description="Minimum host reliability where the provider has one.")
    min_cuda: float = Field(12.1, ge=0, le=100, description="Minimum CUDA version the host driver supports.")
    verified_only: bool = Field(True, description="Only verified hosts (Vast).")
    include_interruptible: bool = Field(False, description="Consider interruptible (spot / bid) offers.")
    max_price_per_hour: float | None = Field(None, gt=0, le=1000, description="Skip offers above this USD per hour.")
    max_cost: float | None = Field(
        None,
        gt=0,
        le=100_000,
        description="USD budget for the whole job: checked before renting and enforced on the instance.",
    )
    max_hours: float | None = Field(None, gt=0, le=720, description="Hard deadline in hours, enforced on the instance.")
    idle_timeout_minutes: float = Field(
        20,
        gt=0,
        le=10_080,
        description="After training ends, minutes without the client before the instance ends itself.",
    )
    image: str = Field(DEFAULT_IMAGE, description="Container image to boot.")
    disk_gb: int = Field(40, ge=10, le=10_000, description="Disk to rent, in GB (priced into every offer).")
    max_offers: int = Field(5, ge=1, le=100, description="Offers to try before giving up when hosts fail.")
    max_retries: int = Field(2, ge=0, le=100, description="Times to resume on a new instance after a host dies.")

    _no_bools = field_validator("*", mode="before")(classmethod(_refuse_bool_for_number))

    @field_validator("gpu", mode="before")
    @classmethod
    def _gpu_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("provider")
    @classmethod
    def _provider(cls, value: str | None) -> str | None:
        return None if value is None else _choice(value, KNOWN_PROVIDERS)


class LoadedConfig(BaseModel):
    """A config file as understood: the training settings, the job settings, and where keys came from."""

    path: Path
    train: TrainConfig
    job: JobSettings
    key_sections: dict[str, str]
    ignored_keys: dict[str, str]


class _CrossFieldError(ValueError):
    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in problems))


def _choice(value: str, choices: tuple[str, ...]) -> str:
    by_lower = {c.lower(): c for c in choices}
    if value.lower() in by_lower:
        return by_lower[value.lower()]
    close = difflib.get_close_matches(value.lower(), list(by_lower), n=1)
    hint = f"; did you mean {by_lower[close[0]]}?" if close else ""
    raise ValueError(f"{value!r} is not one of {', '.join(choices)}{hint}")


def _network_arg(args: list[str], name: str) -> float | None:
    text = _network_arg_text(args, name)
    return None if text is None else float(text)


def _network_arg_text(args: list[str], name: str) -> str | None:
    for item in args:
        key, _, value = item.partition("=")
        if key.strip() == name:
            return value.strip()
    return None


def parse_block_selection(text: str, total: int, name: str) -> frozenset[int]:
    """kohya's block selection (networks/lora_flux.py): "all", "none" or "" (no block), or comma-separated
    indices and inclusive ranges such as "0-5,10". ValueError names ``name`` and the part that is wrong."""
    text = text.strip()
    if text == "all":
        return frozenset(range(total))
    if text in ("none", ""):
        return frozenset()
    chosen: set[int] = set()
    for part in text.split(","):
        first, dash, last = (piece.strip() for piece in part.partition("-"))
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f'{name}={text!r}: expected "all", "none", or indices and ranges such as "0-5,10"')
        start, end = int(first), int(last) if dash else int(first)
        if end >= total or start > end:
            raise ValueError(f"{name}={text!r}: {part.strip()!r} is outside the blocks 0-{total - 1}")
        chosen.update(range(start, end + 1))
    return frozenset(chosen)


# Keys that mean something for one family only. A Flux.1 key on an SD config (or the reverse) is refused
# unless its value changes nothing (_inactive).
FLUX_PARTS = {"ae": "autoencoder (ae.safetensors)", "clip_l": "CLIP-L", "t5xxl": "T5-XXL"}
FLUX_ONLY_KEYS = (
    *FLUX_PARTS,
    "t5xxl_max_token_length",
    "apply_t5_attn_mask",
    "fp8_base",
    "timestep_sampling",
    "sigmoid_scale",
    "discrete_flow_shift",
    "model_prediction_type",
    "guidance_scale",
)
SD_ONLY_KEYS: dict[str, str] = {
    "v2": "a Flux.1 model is not SD 2.x",
    "v_parameterization": "Flux.1 predicts the flow velocity; see model_prediction_type",
    "sdxl": "a Flux.1 model is not SDXL",
    "vae": "Flux.1's autoencoder is the ae key",
    "clip_skip": "Flux.1 uses CLIP-L's pooled output only",
    "max_token_length": "Flux.1's CLIP-L reads 77 tokens; T5-XXL's length is t5xxl_max_token_length",
    "min_snr_gamma": "Min-SNR weighting is for noise-prediction models; Flux.1 trains a flow (kohya ignores it too)",
    "noise_offset": "kohya's Flux.1 training does not offset the noise",
}


def _inactive(key: str, value: Any) -> bool:
    """The key's value changes nothing: its default (a config written back in full has every key), unset,
    false or 0, or clip_skip 1."""
    return (
        value == TrainConfig.model_fields[key].default
        or value is None
        or value is False
        or (value == 0 and not isinstance(value, str))
        or (key == "clip_skip" and value == 1)
    )


def _single_file(reference: str) -> bool:
    return model_source_kind(reference) in ("local_file", "url")


TRAIN_KEYS: frozenset[str] = frozenset(TrainConfig.model_fields)
JOB_KEYS: frozenset[str] = frozenset(JobSettings.model_fields)
PATH_KEYS = ("train_data_dir", "reg_data_dir", "output_dir")


def field_section(name: str) -> str:
    extra = TrainConfig.model_fields[name].json_schema_extra
    assert isinstance(extra, dict)
    return str(extra["section"])


def load_config(path: str | Path) -> LoadedConfig:
    """Read and validate a config file. Raises ConfigError listing every problem found."""
    path = Path(path).expanduser()
    try:
        raw = tomllib.loads(_config_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise _file_error(path, f"not valid TOML: {exc}") from None
    except RecursionError:
        raise _file_error(path, "not valid TOML: its tables or arrays nest too deeply") from None
    return parse_config(raw, path)


def _config_text(path: Path) -> str:
    """The file's text (a UTF-8 byte-order mark, as Windows editors write, is dropped)."""
    if path.is_dir():
        raise _file_error(path, "is a folder, not a config file")
    if not path.is_file():
        raise _file_error(path, "no such file" if not path.exists() else "not a regular file")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise _file_error(path, f"is {size} bytes; a config is a few KB (at most {MAX_CONFIG_BYTES})")
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _file_error(path, f"not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise _file_error(path, f"cannot be read: {exc.strerror}") from None


def _file_error(path: Path, message: str) -> ConfigError:
    return ConfigError(path, [ConfigIssue(key=FILE_KEY, section=TOP_LEVEL, message=message)])


def parse_config(raw: dict[str, Any], path: Path) -> LoadedConfig:
    issues: list[ConfigIssue] = []
    train_values: dict[str, Any] = {}
    spelled_as: dict[str, str] = {}
    key_sections: dict[str, str] = {}
    ignored: dict[str, str] = {}
    job_values: dict[str, Any] = {}

    for key, value in raw.items():
        if key == JOB_SECTION:
            if not isinstance(value, dict):
                issues.append(ConfigIssue(key=key, section=TOP_LEVEL, message="must be a table: [rentrain]"))
            else:
                job_values = value
            continue
        if isinstance(value, dict):
            for inner_key, inner_value in value.items():
                _take_key(inner_key, inner_value, key, train_values, spelled_as, key_sections, ignored, issues)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            issues.append(
                ConfigIssue(
                    key=key,
                    section=TOP_LEVEL,
                    message="kohya dataset_config tables ([[datasets]]) are not read; set train_data_dir, "
                    "resolution and batch_size in [dataset] instead",
                )
            )
        else:
            _take_key(key, value, TOP_LEVEL, train_values, spelled_as, key_sections, ignored, issues)

    for job_key in [k for k in job_values if k not in JOB_KEYS]:
        issues.append(_unknown_key_issue(job_key, JOB_SECTION, JOB_KEYS | TRAIN_KEYS, train_section_hint=True))
        del job_values[job_key]

    base_dir = path.parent.resolve()
    reported: set[str] = set()
    for key in (*PATH_KEYS, "sample_prompts", "pretrained_model_name_or_path", "vae", *FLUX_PARTS):
        if isinstance(train_values.get(key), str):
            try:
                train_values[key] = _resolve_reference(key, train_values[key], base_dir)
            except ValueError as exc:
                issues.append(ConfigIssue(key=spelled_as[key], section=key_sections[key], message=str(exc)))
                train_values.pop(key)
                reported.add(key)

    train = _validate(TrainConfig, train_values, spelled_as, key_sections, issues, reported)
    if train is not None and isinstance(train.sample_prompts, Path):
        problem = _prompt_file_problem(train.sample_prompts)
        if problem:
            key = spelled_as["sample_prompts"]
            issues.append(ConfigIssue(key=key, section=key_sections[key], message=problem))
    job_spelling = {k: k for k in job_values}
    job = _validate(JobSettings, job_values, job_spelling, {k: JOB_SECTION for k in job_values}, issues, set())
    if issues:
        raise ConfigError(path, issues)
    assert train is not None and job is not None
    return LoadedConfig(path=path.resolve(), train=train, job=job, key_sections=key_sections, ignored_keys=ignored)


def _take_key(
    key: str,
    value: Any,
    section: str,
    values: dict[str, Any],
    spelled_as: dict[str, str],
    key_sections: dict[str, str],
    ignored: dict[str, str],
    issues: list[ConfigIssue],
) -> None:
    if isinstance(value, dict):
        issues.append(ConfigIssue(key=key, section=section, message="tables nest one level only"))
        return
    canonical = KEY_ALIASES.get(key, key)
    if canonical in IGNORED_KOHYA_KEYS:
        ignored[key] = IGNORED_KOHYA_KEYS[canonical]
        return
    if canonical not in TRAIN_KEYS:
        if canonical in JOB_KEYS:
            message = f"; it belongs in [{JOB_SECTION}]"
            issues.append(ConfigIssue(key=key, section=section, message=message, unknown_key=True))
        else:
            known = TRAIN_KEYS | frozenset(KEY_ALIASES) | frozenset(IGNORED_KOHYA_KEYS)
            issues.append(_unknown_key_issue(key, section, known))
        return
    if canonical in values:
        first = spelled_as[canonical]
        where = key_sections[canonical]
        message = f"given twice: also as {first}" + (f" in [{where}]" if where != TOP_LEVEL else "")
        issues.append(ConfigIssue(key=key, section=section, message=message))
        return
    values[canonical] = value
    spelled_as[canonical] = key
    key_sections[canonical] = section


def _unknown_key_issue(key: str, section: str, known: frozenset[str], train_section_hint: bool = False) -> ConfigIssue:
    if train_section_hint and key in TRAIN_KEYS:
        hint = f"; it is a training setting: move it to [{field_section(key)}]"
    else:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigIssue(key=key, section=section, message=hint, unknown_key=True)


def _prompt_file_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"{path} is not a file" if path.exists() else f"{path} does not exist"
    try:
        if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
            return f"{path} is larger than {MAX_PROMPT_FILE_BYTES} bytes; a prompt file is a few lines"
        path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return f"{path} is not UTF-8 text"
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror}"
    return None


def _validate(
    model: type[BaseModel],
    values: dict[str, Any],
    spelled_as: dict[str, str],
    key_sections: dict[str, str],
    issues: list[ConfigIssue],
    reported: set[str],
) -> Any:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        for error in exc.errors():
            ctx_error = (error.get("ctx") or {}).get("error")
            if isinstance(ctx_error, _CrossFieldError):
                for key, message in ctx_error.problems:
                    section = key_sections.get(key, _default_section(model, key))
                    issues.append(ConfigIssue(key=spelled_as.get(key, key), section=section, message=message))
                continue
            field = str(error["loc"][0]) if error["loc"] else "(config)"
            if field in reported and error["type"] == "missing":
                continue  # its value was refused before validation
            section = key_sections.get(field, _default_section(model, field))
            message = _describe(error, values.get(field))
            issues.append(ConfigIssue(key=spelled_as.get(field, field), section=section, message=message))
        return None


def _default_section(model: type[BaseModel], field: str) -> str:
    if model is JobSettings:
        return JOB_SECTION
    return field_section(field) if field in TRAIN_KEYS else TOP_LEVEL


def _describe(error: Any, value: Any) -> str:
    kind = error["type"]
    if kind == "missing":
        return "missing (required)"
    message = str(error["msg"])
    message = re.sub(r"^Value error, ", "", message)
    if kind in ("value_error", "assertion_error"):
        return message
    return f"{message[0].lower()}{message[1:]} (got {value!r})"


def _resolve_reference(key: str, value: str, base_dir: Path) -> Path | str:
    """A path key made absolute (relative to the config's folder); the base model and VAE may also be a hub
    id, an https URL or a built-in. ValueError says what is wrong with the value."""
    if key in ("pretrained_model_name_or_path", "vae"):
        return resolve_model_reference(value, base_dir)
    if key in FLUX_PARTS:
        return resolve_file_reference(value, base_dir)
    return _resolve_path(value, base_dir)


def _resolve_path(value: str, base_dir: Path) -> Path:
    if "\x00" in value:
        raise ValueError(f"{value!r} contains a NUL character")
    candidate = Path(value).expanduser()
    return candidate if candidate.is_absolute() else (base_dir / candidate).resolve()


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def resolve_model_reference(value: str, base_dir: Path) -> str:
    """Return the model reference with a local path made absolute; ValueError when a local path is missing."""
    value = value.strip()
    if not value:
        raise ValueError("is empty")
    if value.startswith("http://"):
        raise ValueError("use an https:// URL")
    if value.startswith("builtin:"):
        if value not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model {value!r}; built-ins: {', '.join(BUILTIN_MODELS)}")
        return value
    if value.startswith("https://"):
        name = url_file_name(value)
        if not name.lower().endswith(MODEL_FILE_SUFFIXES):
            raise ValueError(
                f"the URL's file name {name!r} does not end in {', '.join(MODEL_FILE_SUFFIXES)}: give the URL of "
                "the file itself, whose path ends in its name (the instance saves it under that name)"
            )
        return value
    local = _resolve_path(value, base_dir)
    if local.exists():
        return str(local)
    looks_local = (
        value.startswith(("/", "./", "../", "~", "\\"))
        or "\\" in value
        or value.lower().endswith(MODEL_FILE_SUFFIXES)
        or not HUB_ID.match(value)
    )
    if looks_local:
        raise ValueError(
            f"{local} does not exist. It must be a local .safetensors/.ckpt file or diffusers folder, "
            'a Hugging Face hub id such as "stable-diffusion-v1-5/stable-diffusion-v1-5", or an https:// URL'
        )
    return value


def resolve_file_reference(value: str, base_dir: Path) -> str:
    """A single model file (Flux.1's ae, clip_l, t5xxl): a local file made absolute, or an https:// URL of the
    file. ValueError says what is wrong."""
    reference = resolve_model_reference(value, base_dir)
    kind = model_source_kind(reference)
    if kind in ("local_file", "url"):
        return reference
    if kind == "local_dir":
        raise ValueError(f"{reference} is a folder; give the .safetensors file itself")
    raise ValueError(
        f"{value!r} is not a file: give a local .safetensors file or the https:// URL of one, such as "
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"
    )


def model_source_kind(reference: str) -> Literal["builtin", "url", "local_file", "local_dir", "hub"]:
    """How the trainer gets the base model: uploaded (local), fetched on the instance (url, hub), or built."""
    if reference.startswith("builtin:"):
        return "builtin"
    if reference.startswith("https://"):
        return "url"
    path = Path(reference)
    if path.is_absolute() and path.exists():
        return "local_dir" if path.is_dir() else "local_file"
    return "hub"
