"""How much a job may bring home: caps from what the trainer can write for this config, with a margin.

A host that offers more (a checkpoint of many GB for a rank-4 LoRA, a sample grid the size of a disk,
thousands of files in a training state) is hostile or broken: rentrain.transport refuses the file
(FetchRefused) and the job ends. The caps are upper bounds, loose on purpose: an honest run never meets one.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from remote.config import MAX_STEPS, TrainConfig
from remote.trainer.memory import ARCHITECTURES
from rentrain.transport import FileLimit, TreeLimit

MARGIN = 2
BYTES_PER_VALUE = 4  # float32, the widest dtype a LoRA is saved in
# The safetensors header and kohya's metadata (ss_tag_frequency grows with the captions).
FILE_SLACK_BYTES = 64 << 20
# A training state: the LoRA, the optimizer's state (at most 4 values per parameter: Prodigy), the position.
STATE_VALUES_PER_PARAMETER = 5
STATE_SLACK_BYTES = 256 << 20  # the position, the step order and the losses: they grow with the steps
STATE_MAX_FILES = 32
# LoRA parameters per unit of conv_dim on the 3x3 convolutions of ResnetBlock2D / Downsample2D / Upsample2D,
# and per unit of network_dim on the Linear and 1x1 convolutions those blocks add: the larger of SD 1.x/2.x
# (544,000 and 82,880) and SDXL (355,840 and 58,560), counted with remote.trainer.lora.select_unet_targets
# on the full-size UNets that bench/train_speed.py builds.
CONV_PARAMETERS_PER_RANK = 544_000
CONV_BLOCK_PARAMETERS_PER_RANK = 82_880
EVENT_BYTES = 4096  # one events.jsonl line, generously
LABEL_PIXELS = 512  # a sample grid's title row and prompt column, beyond its images


class FetchLimits(BaseModel):
    lora: FileLimit
    sample: FileLimit
    state: TreeLimit
    events_bytes: int
    total_bytes: int  # everything one job brings home


def fetch_limits(train: TrainConfig, total_steps: int | None) -> FetchLimits:
    """`total_steps`: the job's step count as planned (None when unknown: the largest a config may ask)."""
    lora_bytes = _lora_bytes(train)
    lora = FileLimit(what="LoRA file", max_bytes=lora_bytes, suffix=".safetensors")
    sample = FileLimit(what="sample grid", max_bytes=_sample_grid_bytes(train), suffix=".png")
    state_bytes = lora_bytes * STATE_VALUES_PER_PARAMETER + STATE_SLACK_BYTES
    state = TreeLimit(what="training state", max_bytes=state_bytes, max_files=STATE_MAX_FILES)
    steps = total_steps or (train.max_train_steps if train.max_train_epochs is None else None) or MAX_STEPS
    epochs = train.max_train_epochs or steps  # an epoch has at least one step
    checkpoints = 1 + _every(epochs, train.save_every_n_epochs) + _every(steps, train.save_every_n_steps)
    grids = 1 + checkpoints + _every(epochs, train.sample_every_n_epochs) + _every(steps, train.sample_every_n_steps)
    events_bytes = (steps + epochs + checkpoints + grids + 16) * EVENT_BYTES
    total = checkpoints * (lora.max_bytes + state.max_bytes) + grids * sample.max_bytes + events_bytes
    return FetchLimits(lora=lora, sample=sample, state=state, events_bytes=events_bytes, total_bytes=total)


def _every(count: int, period: int | None) -> int:
    return count // period if period else 0


def _lora_bytes(train: TrainConfig) -> int:
    """An upper bound for a LoRA file of this config: the parameters of the largest architecture it may be
    trained on (SD 1.x only where the config says so; the weights may turn out SDXL otherwise)."""
    sd1_only = train.pretrained_model_name_or_path == "builtin:tiny-sd15" or (train.sdxl is False and not train.v2)
    _, _, unet_per_rank, text_per_rank = ARCHITECTURES["sd15" if sd1_only else "sdxl"]
    parameters = train.network_dim * (unet_per_rank + text_per_rank)
    if train.conv_dim:
        parameters += train.conv_dim * CONV_PARAMETERS_PER_RANK + train.network_dim * CONV_BLOCK_PARAMETERS_PER_RANK
    return parameters * BYTES_PER_VALUE * MARGIN + FILE_SLACK_BYTES


def _sample_grid_bytes(train: TrainConfig) -> int:
    """An upper bound for one grid PNG: rows of prompts x seeds, columns of weights, each image at the
    training resolution, stored uncompressed (3 bytes a pixel), with its labels."""
    width, height = train.resolution
    rows = _prompt_count(train.sample_prompts) * len(train.sample_seeds)
    pixels = (width * len(train.sample_weights) + width + LABEL_PIXELS) * (height * rows + height + LABEL_PIXELS)
    return pixels * 3 * MARGIN + FILE_SLACK_BYTES


def _prompt_count(prompts: list[str] | Path | None) -> int:
    """At most this many prompts: a prompts file has at most one per non-empty line."""
    if prompts is None:
        return 0
    if isinstance(prompts, Path):
        try:
            return sum(1 for line in prompts.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
        except OSError:
            return 0  # the check refuses a prompts file it cannot read
    return len(prompts)
