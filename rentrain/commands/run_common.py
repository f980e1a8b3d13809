"""What `rentrain run` does alike for one job and for a queue: keeping earlier results, and Ctrl-C."""

from __future__ import annotations

import shutil
import sys

import click
from rich.console import Console

from remote.config import LoadedConfig
from remote.events import EVENTS_FILE
from rentrain.job import JobRunner


def refuse_to_overwrite(loaded: LoadedConfig, overwrite: bool, console: Console) -> None:
    """The run writes <name>.safetensors and <name>-NNNNNN.safetensors: none may exist already, unless
    --overwrite asks to replace them (with their states, sample grids and events.jsonl)."""
    train = loaded.train
    stems = [train.output_name] if train.output_name else ["last", "epoch"]
    existing = sorted(train.output_dir.glob(f"{stems[0]}.safetensors"))
    for stem in stems:
        existing += sorted(train.output_dir.glob(f"{stem}-*.safetensors"))
    if not existing:
        return
    if not overwrite:
        names = ", ".join(p.name for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise click.ClickException(
            f"{train.output_dir} already holds {names}; rentrain never overwrites a result unless asked: move them "
            "away, change output_name, or run again with --overwrite"
        )
    for stem in stems:
        existing += sorted(train.output_dir.glob(f"{stem}-*-state"))
        existing += sorted(train.output_dir.glob(f"samples/{stem}*.png"))
    for path in [*existing, train.output_dir / EVENTS_FILE]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    console.print(f"--overwrite: removed {len(existing)} earlier results from {train.output_dir}", markup=False)


def ask_destroy(console: Console) -> bool:
    """Destroy (True) or detach (False). Without a terminal to ask: detach, the watchdog guards it.
    A second Ctrl-C at the question destroys."""
    if not sys.stdin.isatty():
        return False
    console.print()
    try:
        answer = click.prompt(
            "Stop the job and destroy the instance [d], or detach and let it run [a]?",
            type=click.Choice(["d", "a"]),
            default="a",
        )
    except (click.Abort, KeyboardInterrupt):
        return True
    return answer == "d"


def destroy_now(runner: JobRunner, console: Console) -> None:
    reason = "stopped by the user (Ctrl-C)"
    if runner.provider is None:  # a machine rented by hand: end our processes there
        session = runner.provisioner.reattach(runner.key.private_path) if runner.job.remote_dir else None
        if session is not None:
            runner.teardown.destroy(session, reason)
    for record in [i for i in runner.ledger.instances(runner.job.id) if i.ended_at is None]:
        runner.teardown.destroy_instance(record, reason)
    runner.close("cancelled", "stopped by the user")
    console.print("instance destroyed; checkpoints fetched so far are in the output folder")
