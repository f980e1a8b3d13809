"""`rentrain run CONFIG`: check, then train (on this machine with --provider local)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from remote.config import KNOWN_PROVIDERS
from rentrain.commands.check import print_check, run_check
from rentrain.local_run import LocalTrainingUnavailable, ensure_training_stack, run_trainer
from rentrain.progress import RunProgress


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "--provider",
    type=click.Choice(KNOWN_PROVIDERS, case_sensitive=False),
    help="Where to train. Default: [rentrain] provider in the config.",
)
@click.option(
    "--resume",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="Continue from a checkpoint's state folder (<output_dir>/<name>-<epoch>-state).",
)
def run(config: Path, provider: str | None, resume: Path | None) -> None:
    """Check CONFIG and its dataset, then train the LoRA.

    Nothing starts when the check finds an error.
    """
    console = Console()
    result, loaded = run_check(config)
    if not result.ok or loaded is None:
        print_check(result, loaded, console)
        sys.exit(1)
    chosen = (provider or loaded.job.provider or "").lower()
    if not chosen:
        raise click.UsageError("say where to train: --provider local|vast|runpod|ssh, or provider in [rentrain]")
    if chosen != "local":
        raise click.ClickException(
            f"--provider {chosen}: renting is not built into `run` yet; only --provider local trains today. "
            "`rentrain check` validates the job on this machine."
        )
    try:
        ensure_training_stack()
    except LocalTrainingUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    train = loaded.train
    final = train.output_dir / f"{train.output_name or 'last'}.safetensors"
    if final.exists() and resume is None:
        raise click.ClickException(
            f"{final} already exists and rentrain never overwrites a result: move it away or change output_name"
        )
    plan = result.dataset.step_plan if result.dataset else None
    if plan is not None:
        console.print(f"{loaded.path}: {plan.total_steps} steps ({plan.epochs} epochs of {plan.steps_per_epoch})")
    with RunProgress(console) as view:
        try:
            exit_code = run_trainer(loaded.path, train.output_dir, view, resume)
        except KeyboardInterrupt:
            console.print("interrupted: the trainer stopped; its last checkpoint's state folder resumes it (--resume)")
            sys.exit(130)
    if view.done is None:
        if view.error is None:
            console.print(f"[red]the trainer exited with code {exit_code}[/]; see {train.output_dir / 'trainer.log'}")
        sys.exit(1)
    console.print(f"LoRA: {view.done.path}")
