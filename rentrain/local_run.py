"""`rentrain run --provider local`: the bundled trainer on this machine, through the same event protocol."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path

from remote.events import parse_event
from rentrain.multigpu import trainer_argv
from rentrain.progress import RunProgress

TRAINER_LOG = "trainer.log"


class LocalTrainingUnavailable(RuntimeError):
    pass


def ensure_training_stack(gpus: int = 1) -> None:
    needed = ("torch", "diffusers", "transformers", "peft") + (("accelerate",) if gpus > 1 else ())
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise LocalTrainingUnavailable(
            f'training on this machine needs {", ".join(missing)}: pip install "rentrain[train]" '
            "(or rent a GPU with --provider vast / runpod, which needs none of it here)"
        )


def trainer_process_command(config_path: Path, resume: Path | None, gpus: int) -> list[str]:
    """This Python running the trainer: `-m remote.trainer`, or N ranks under `-m accelerate.commands.launch`."""
    return trainer_argv(sys.executable, str(config_path), None if resume is None else str(resume), gpus)


def run_trainer(
    config_path: Path, output_dir: Path, view: RunProgress, resume: Path | None = None, gpus: int = 1
) -> int:
    """Run the trainer as a child process (with `gpus` > 1: under `accelerate launch`, one process per GPU, or
    per CPU process without CUDA) and feed its events to `view`. Returns its exit code.

    Lines on stdout that are not events (a library's print) and everything on stderr go to
    <output_dir>/trainer.log. Ctrl-C is passed on to the trainer, which stops cleanly.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    command = trainer_process_command(config_path, resume, gpus)
    with (output_dir / TRAINER_LOG).open("a", encoding="utf-8") as log:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        assert child.stdout is not None
        try:
            for line in child.stdout:
                _dispatch(line, view, log)
            return child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)
            try:
                for line in child.stdout:
                    _dispatch(line, view, log)
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
            raise


def _dispatch(line: str, view: RunProgress, log: object) -> None:
    text = line.strip()
    if not text:
        return
    try:
        event = parse_event(text)
    except (ValueError, json.JSONDecodeError):
        log.write(line)  # type: ignore[attr-defined]
        return
    view.handle(event)
