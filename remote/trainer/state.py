"""Resumable training state: one folder per checkpoint, next to the LoRA file it belongs to.

``<name>-000001-state/`` (epoch checkpoints) or ``<name>-step00000020-state/`` (step checkpoints,
and the state written when a run is stopped) holds:

- ``lora.safetensors``: the LoRA weights in full precision (kohya layout);
- ``training.pt``: optimizer, LR scheduler and loss-scaler states, the position in the run (step,
  epoch, batch within the epoch), this epoch's batch order, RNG states (torch CPU/CUDA, numpy, python);
- ``state.json``: the same position in readable form, plus what the run must match to resume
  (seed, total steps, steps per epoch, batch size, model).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

STATE_JSON = "state.json"


class ResumeError(Exception):
    """The state cannot be resumed with this config; the message says what differs."""


@dataclass
class Position:
    step: int  # optimizer steps done
    epoch: int  # 0-based epoch the next batch belongs to
    batch: int  # index of the next batch within that epoch's order
    seed: int
    total_steps: int
    steps_per_epoch: int
    batches_per_epoch: int
    batch_size: int
    model: str
    family: str
    processes: int = 1  # data-parallel processes the run had when saved
    optimizer_type: str = ""  # as trained (memory planning may have chosen AdamW8bit); "" in older states


def state_dir_name(name: str, step: int | None = None, epoch: int | None = None) -> str:
    if epoch is not None:
        return f"{name}-{epoch:06d}-state"
    return f"{name}-step{step:08d}-state"


def save_state(
    folder: Path, position: Position, network, optimizer, scheduler, scaler, epoch_order: list[list[int]] | None, losses
) -> Path:
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(network.kohya_state_dict(), str(tmp / "lora.safetensors"))
    rng = {
        "torch": torch.random.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    try:
        import numpy as np

        rng["numpy"] = np.random.get_state()
    except ImportError:
        pass
    torch.save(
        {
            "position": asdict(position),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch_order": epoch_order,
            "losses": list(losses),
            "rng": rng,
        },
        tmp / "training.pt",
    )
    (tmp / STATE_JSON).write_text(json.dumps(asdict(position), indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def read_position(folder: Path) -> Position:
    path = folder / STATE_JSON
    if not path.is_file():
        raise ResumeError(f"{folder} is not a rentrain training state (no {STATE_JSON})")
    return Position(**json.loads(path.read_text()))


def find_latest_state(output_dir: Path) -> Path | None:
    """The state folder in output_dir with the most steps done (for --resume last)."""
    best: tuple[int, Path] | None = None
    for candidate in output_dir.glob("*-state"):
        try:
            position = read_position(candidate)
        except (ResumeError, ValueError, TypeError):
            continue
        if best is None or position.step > best[0]:
            best = (position.step, candidate)
    return best[1] if best else None


def load_state(folder: Path, expected: Position, network, optimizer, scheduler, scaler) -> dict:
    """Restore everything; returns the saved dict (position, epoch_order, losses)."""
    from safetensors.torch import load_file

    saved = read_position(folder)
    keys: tuple[str, ...] = ("seed", "total_steps", "steps_per_epoch", "batches_per_epoch", "batch_size", "family")
    if saved.processes != expected.processes:  # steps are counted anew for the batches left
        keys = ("seed", "batches_per_epoch", "batch_size", "family")
    if saved.step >= saved.total_steps:  # saved with a run's final file: a longer run continues it
        keys = tuple(key for key in keys if key != "total_steps")
        if saved.processes == expected.processes and expected.total_steps <= saved.step:
            raise ResumeError(
                f"{folder}: its run ended at step {saved.step} and this config gives {expected.total_steps} steps; "
                "set more epochs (or steps) to continue it"
            )
    for key in keys:
        if getattr(saved, key) != getattr(expected, key):
            raise ResumeError(
                f"{folder}: the state was saved with {key} = {getattr(saved, key)}, this config gives "
                f"{getattr(expected, key)}; resume with the config the run started with"
            )
    if saved.optimizer_type and saved.optimizer_type.lower() != expected.optimizer_type.lower():
        raise ResumeError(
            f"{folder}: the state was trained with optimizer_type = {saved.optimizer_type}, this config gives "
            f"{expected.optimizer_type}; an optimizer's saved state cannot be used by another optimizer"
        )
    lora = load_file(str(folder / "lora.safetensors"))
    own = network.state_dict()
    if set(lora) != set(own):
        raise ResumeError(
            f"{folder}: its LoRA modules differ from this config's (network_dim, conv_dim or TE/UNet choice)"
        )
    network.load_state_dict({k: v.to(own[k].dtype) for k, v in lora.items()})
    data = torch.load(folder / "training.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    if scaler is not None and data.get("scaler"):
        scaler.load_state_dict(data["scaler"])
    rng = data["rng"]
    torch.random.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "numpy" in rng:
        import numpy as np

        np.random.set_state(rng["numpy"])
    return data
