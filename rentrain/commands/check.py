"""`rentrain check CONFIG`: the config as understood, the dataset report and the step count."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from remote.config import (
    JOB_SECTION,
    ConfigError,
    LoadedConfig,
    TrainConfig,
    field_section,
    load_config,
    model_source_kind,
)
from rentrain.dataset_check import DatasetReport, inspect_dataset

MODEL_SOURCE_NOTES = {
    "builtin": "built in: a tiny random model for trying rentrain out, not for real LoRAs",
    "url": "downloaded on the instance, never on this machine",
    "hub": "Hugging Face hub id, downloaded on the instance, never on this machine",
    "local_file": "local file, uploaded with the job",
    "local_dir": "local diffusers folder, uploaded with the job",
}


class CheckResult(BaseModel):
    """`rentrain check --json` output."""

    ok: bool
    config_path: str
    config_errors: list[str] = []
    config: dict[str, Any] | None = None
    job: dict[str, Any] | None = None
    ignored_keys: dict[str, str] = {}
    model_source: str | None = None
    dataset: DatasetReport | None = None


def run_check(config_path: Path) -> tuple[CheckResult, LoadedConfig | None]:
    """Validate config and dataset; nothing is printed. Shared by `check` and every command that rents."""
    try:
        loaded = load_config(config_path)
    except ConfigError as exc:
        return CheckResult(ok=False, config_path=str(config_path), config_errors=[str(i) for i in exc.issues]), None
    report = inspect_dataset(loaded.train)
    result = CheckResult(
        ok=not report.errors,
        config_path=str(loaded.path),
        config=loaded.train.model_dump(mode="json"),
        job=loaded.job.model_dump(mode="json"),
        ignored_keys=loaded.ignored_keys,
        model_source=model_source_kind(loaded.train.pretrained_model_name_or_path),
        dataset=report,
    )
    return result, loaded


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def check(config: Path, as_json: bool) -> None:
    """Check a training config and its dataset before any money is spent.

    Prints the config with defaults filled in, a report per image folder, every problem found, and the
    number of training steps, counted as kohya counts them. Exits 1 on any error.
    """
    result, loaded = run_check(config)
    if as_json:
        click.echo(result.model_dump_json(indent=2))
    else:
        print_check(result, loaded, Console())
    sys.exit(0 if result.ok else 1)


def print_check(result: CheckResult, loaded: LoadedConfig | None, console: Console) -> None:
    if result.config_errors or loaded is None or result.dataset is None:
        console.print(f"[bold red]Config {escape(result.config_path)} is not valid:[/]")
        for line in result.config_errors:
            console.print(f"  [red]✗[/] {escape(line)}", highlight=False)
        return
    _print_config(loaded, console)
    _print_dataset(result.dataset, console)
    _print_steps(result.dataset, loaded, console)
    console.print(
        "[bold green]OK[/]: ready to train." if result.ok else f"[bold red]{len(result.dataset.errors)} error(s)[/]: fix them first."
    )


def _print_config(loaded: LoadedConfig, console: Console) -> None:
    console.print(f"[bold]Config[/] {loaded.path}")
    train = loaded.train.model_dump(mode="json")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("section")
    table.add_column("key")
    table.add_column("value")
    for key in TrainConfig.model_fields:
        from_file = key in loaded.key_sections
        value = json.dumps(train[key]) if not isinstance(train[key], str) else train[key]
        style = "" if from_file else "dim"
        table.add_row(field_section(key), key, escape(value) + ("" if from_file else "  (default)"), style=style)
    job = loaded.job.model_dump(mode="json")
    for key, value in job.items():
        table.add_row(JOB_SECTION, key, escape(json.dumps(value) if not isinstance(value, str) else value))
    console.print(table, highlight=False)
    source = model_source_kind(loaded.train.pretrained_model_name_or_path)
    console.print(
        f"[bold]Base model[/] {escape(loaded.train.pretrained_model_name_or_path)} ({MODEL_SOURCE_NOTES[source]})"
    )
    for key, why in loaded.ignored_keys.items():
        console.print(f"  [dim]{escape(key)}: ignored, {escape(why)}[/]", highlight=False)


def _print_dataset(report: DatasetReport, console: Console) -> None:
    table = Table(title="Dataset", title_justify="left", header_style="bold")
    for column in ("folder", "kind", "repeats", "images", "captions", "smallest", "largest"):
        table.add_column(column, justify="right" if column in ("repeats", "images", "captions") else "left")
    for s in report.subsets:
        table.add_row(
            escape(s.folder.name),
            "reg" if s.is_reg else "train",
            str(s.repeats),
            str(s.images),
            str(s.captions),
            s.smallest or "-",
            s.largest or "-",
        )
    console.print(table)
    for finding in report.errors:
        console.print(f"  [red]✗ error[/] {escape(str(finding))}", highlight=False)
    for finding in report.warnings:
        console.print(f"  [yellow]! warning[/] {escape(str(finding))}", highlight=False)


def _print_steps(report: DatasetReport, loaded: LoadedConfig, console: Console) -> None:
    plan = report.step_plan
    if plan is None:
        return
    train = loaded.train
    buckets = ", ".join(f"{reso}: {n}" for reso, n in plan.bucket_samples.items())
    accumulation = (
        f" / {train.gradient_accumulation_steps} accumulation" if train.gradient_accumulation_steps > 1 else ""
    )
    console.print(
        f"[bold]Steps[/] {plan.samples_per_epoch} samples per epoch (images x repeats) in buckets {buckets}; "
        f"batch {train.batch_size} -> {plan.batches_per_epoch} batches{accumulation} = {plan.steps_per_epoch} "
        f"steps per epoch x {plan.epochs} epochs = [bold]{plan.total_steps} steps[/]",
        highlight=False,
    )

