"""``python -m remote.trainer CONFIG.toml [--resume STATE_DIR | --resume last]``

stdout carries the event protocol only (remote/events.py): one JSON object per line, also appended to
<output_dir>/events.jsonl. Everything else (library warnings, progress bars) goes to stderr.
Exit status: 0 done, 2 config/model/data error, 3 out of memory, 130 stopped (state saved), 1 other.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from remote.events import EVENTS_FILE, ErrorEvent, EventWriter

if TYPE_CHECKING:
    from remote.config import TrainConfig


def set_library_defaults() -> None:
    """Library settings the trainer relies on, unless the environment already sets them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # With the `kernels` package installed (bitsandbytes brings it), transformers swaps its activations on CUDA
    # for code downloaded from the Hugging Face Hub at run time: a network fetch and foreign code in every run,
    # and a failure offline (seen on an H100: "kernels-community/activation is not available"). The trainer
    # runs the libraries' own code only.
    os.environ.setdefault("USE_HUB_KERNELS", "NO")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m remote.trainer", description="Train a kohya-format LoRA.")
    parser.add_argument("config", type=Path, help="the training TOML (rentrain / kohya keys)")
    parser.add_argument(
        "--resume",
        metavar="STATE_DIR",
        help="continue from a *-state folder written with a checkpoint, or 'last' for the newest in output_dir",
    )
    args = parser.parse_args(argv)

    events_out = sys.stdout
    sys.stdout = sys.stderr  # libraries print; only events go to the real stdout
    set_library_defaults()
    writer = EventWriter(None, stream=events_out)
    rank_zero = os.environ.get("RANK", "0") == "0"  # under accelerate launch, rank 0 alone reports
    if not rank_zero:
        writer = EventWriter(None, stream=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    try:
        from remote.config import ConfigError, load_config

        try:
            loaded = load_config(args.config)
        except ConfigError as exc:
            writer.emit(ErrorEvent(kind="config", message=str(exc)))
            return 2
        cfg = loaded.train
        if rank_zero:
            writer.log_path = Path(cfg.output_dir) / EVENTS_FILE
        return _train(cfg, writer, args.resume)
    finally:
        sys.stdout = events_out


def _train(cfg: TrainConfig, writer: EventWriter, resume: str | None) -> int:
    try:
        from .distributed import leave  # imports torch
    except ImportError as exc:
        writer.emit(ErrorEvent(kind="internal", message=f"the trainer's dependencies are missing: {exc}"))
        return 1
    try:
        return _train_and_report(cfg, writer, resume)
    finally:
        leave()


def _train_and_report(cfg: TrainConfig, writer: EventWriter, resume: str | None) -> int:
    try:
        import torch

        from .data import DataError
        from .divergence import Diverged
        from .loop import OutputExistsError, Stopped, train
        from .models import ModelError
        from .optim import OptimizerError
        from .state import ResumeError
    except ImportError as exc:
        writer.emit(ErrorEvent(kind="internal", message=f"the trainer's dependencies are missing: {exc}"))
        return 1
    try:
        train(cfg, writer, resume=resume)
        return 0
    except (OutputExistsError, OptimizerError, ResumeError) as exc:
        writer.emit(ErrorEvent(kind="config", message=str(exc)))
        return 2
    except ModelError as exc:
        writer.emit(ErrorEvent(kind="model", message=str(exc)))
        return 2
    except DataError as exc:
        writer.emit(ErrorEvent(kind="data", message=str(exc)))
        return 2
    except Diverged as exc:
        writer.emit(ErrorEvent(kind="diverged", message=str(exc)))
        # every rank diverges at once: rank 0 alone exits non-zero, so that no other rank's exit gets it killed
        # before its event is written (as for Stopped, below)
        return 2 if os.environ.get("RANK", "0") == "0" else 0
    except Stopped as exc:
        state = str(exc.state_dir) if exc.state_dir is not None else None
        writer.emit(ErrorEvent(kind="interrupted", message=str(exc), state_dir=state))
        # under a launcher, another rank's non-zero exit gets rank 0 killed while it reports: rank 0 alone says 130
        return 130 if os.environ.get("RANK", "0") == "0" else 0
    except torch.OutOfMemoryError as exc:
        writer.emit(
            ErrorEvent(
                kind="out_of_memory",
                message=f"{exc}. Lower batch_size or network_dim, or set gradient_checkpointing = true with "
                'fit_memory = false (the memory plan may have turned it off), or mixed_precision = "bf16"',
            )
        )
        return 3
    except KeyboardInterrupt:
        writer.emit(ErrorEvent(kind="interrupted", message="interrupted before a state could be saved"))
        return 130
    except Exception as exc:
        traceback.print_exc()
        writer.emit(ErrorEvent(kind="internal", message=f"{type(exc).__name__}: {exc}"))
        return 1


def exit_process(code: int) -> None:
    """Under a multi-process launcher, leave without the interpreter's teardown: there, gloo's threads can
    abort the process ("terminate called without an active exception", seen about 1 run in 10), and the
    launcher then kills the other ranks. By now every rank has passed the final barrier and everything
    is written; only the streams need flushing."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
