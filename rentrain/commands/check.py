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
from remote.dataset import printable
from rentrain.dataset_check import DatasetReport, inspect_dataset
from rentrain.hub_access import AccessFinding, check_access
from rentrain.upload_list import SHOWN_SKIPPED, UploadPlan, plan_upload

# The exit code of refused input, everywhere: a config or dataset error here, a bad option (click's usage error).
BAD_INPUT = 2

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
    model_access: list[AccessFinding] = []  # whether this machine's token can read the gated repos (Flux.1)
    dataset: DatasetReport | None = None
    upload: UploadPlan | None = None


def run_check(config_path: Path) -> tuple[CheckResult, LoadedConfig | None]:
    """Validate config and dataset; nothing is printed. Shared by `check` and every command that rents."""
    try:
        loaded = load_config(config_path)
    except ConfigError as exc:
        return CheckResult(ok=False, config_path=str(config_path), config_errors=[str(i) for i in exc.issues]), None
    report = inspect_dataset(loaded.train)
    access = check_access(loaded.train)
    result = CheckResult(
        ok=not report.errors and not any(finding.severity == "error" for finding in access),
        config_path=str(loaded.path),
        config=loaded.train.model_dump(mode="json"),
        job=loaded.job.model_dump(mode="json"),
        ignored_keys=loaded.ignored_keys,
        model_source=model_source_kind(loaded.train.pretrained_model_name_or_path),
        model_access=access,
        dataset=report,
        upload=plan_upload(loaded.train),
    )
    return result, loaded


def checked_config(config_path: Path, console: Console) -> tuple[CheckResult, LoadedConfig]:
    """The validation every command that reads a config goes through before anything else (`check` prints
    its full report instead): the config and dataset, or the problems printed and exit code 2."""
    result, loaded = run_check(config_path)
    if not result.ok or loaded is None:
        print_check(result, loaded, console)
        sys.exit(BAD_INPUT)
    return result, loaded


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def check(config: Path, as_json: bool) -> None:
    """Check a training config and its dataset before any money is spent.

    Prints the config with defaults filled in, a report per image folder, every problem found, and the
    number of training steps, counted as kohya counts them. Exits 2 on any error.
    """
    result, loaded = run_check(config)
    if as_json:
        click.echo(json.dumps(_printable_tree(result.model_dump(mode="json")), indent=2, ensure_ascii=False))
    else:
        print_check(result, loaded, Console())
    sys.exit(0 if result.ok else BAD_INPUT)


def _printable_tree(value: Any) -> Any:
    """JSON-ready data with every string printable: a file name that is not UTF-8 appears escaped."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(str(k)): _printable_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable_tree(v) for v in value]
    return value


def print_check(result: CheckResult, loaded: LoadedConfig | None, console: Console) -> None:
    if result.config_errors or loaded is None or result.dataset is None:
        console.print(f"[bold red]Config {_plain(result.config_path)} is not valid:[/]", highlight=False)
        for line in result.config_errors:
            console.print(f"  [red]✗[/] {_plain(line)}", highlight=False)
        return
    _print_config(loaded, console)
    for finding in result.model_access:
        mark = "[red]✗ error[/]" if finding.severity == "error" else "[yellow]! warning[/]"
        console.print(f"  {mark} {_plain(finding.message)}", highlight=False)
    _print_dataset(result.dataset, console)
    _print_upload(result.upload, console)
    _print_steps(result.dataset, loaded, console)
    errors = len(result.dataset.errors) + sum(finding.severity == "error" for finding in result.model_access)
    summary = "[bold green]OK[/]: ready to train." if result.ok else f"[bold red]{errors} error(s)[/]: fix them first."
    console.print(summary)


def _print_config(loaded: LoadedConfig, console: Console) -> None:
    console.print(f"[bold]Config[/] {_plain(loaded.path)}", highlight=False)
    train = loaded.train.model_dump(mode="json")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("section")
    table.add_column("key")
    table.add_column("value")
    for key in TrainConfig.model_fields:
        from_file = key in loaded.key_sections
        value = json.dumps(train[key]) if not isinstance(train[key], str) else train[key]
        style = "" if from_file else "dim"
        table.add_row(field_section(key), key, _plain(value) + ("" if from_file else "  (default)"), style=style)
    job = loaded.job.model_dump(mode="json")
    for key, value in job.items():
        table.add_row(JOB_SECTION, key, _plain(json.dumps(value) if not isinstance(value, str) else value))
    console.print(table, highlight=False)
    source = model_source_kind(loaded.train.pretrained_model_name_or_path)
    console.print(
        f"[bold]Base model[/] {_plain(loaded.train.pretrained_model_name_or_path)} ({MODEL_SOURCE_NOTES[source]})",
        highlight=False,
    )
    for key, why in loaded.ignored_keys.items():
        console.print(f"  [dim]{escape(key)}: ignored, {escape(why)}[/]", highlight=False)


def _print_dataset(report: DatasetReport, console: Console) -> None:
    table = Table(title="Dataset", title_justify="left", header_style="bold")
    for column in ("folder", "kind", "repeats", "images", "captions", "smallest", "largest"):
        table.add_column(column, justify="right" if column in ("repeats", "images", "captions") else "left")
    for s in report.subsets:
        table.add_row(
            _plain(s.folder.name),
            "reg" if s.is_reg else "train",
            str(s.repeats),
            str(s.images),
            str(s.captions),
            s.smallest or "-",
            s.largest or "-",
        )
    console.print(table)
    for finding in report.errors:
        console.print(f"  [red]✗ error[/] {_plain(finding)}", highlight=False)
    for finding in report.warnings:
        console.print(f"  [yellow]! warning[/] {_plain(finding)}", highlight=False)


def _plain(text: object) -> str:
    """Text from outside our code (paths, values, file names) as literal text inside rich markup."""
    return escape(printable(str(text)))


def _print_upload(plan: UploadPlan | None, console: Console) -> None:
    """What a rented run uploads, and the files in the dataset folders that stay here, with why."""
    if plan is None:
        return
    console.print(f"Upload: {plan.summary()}", markup=False, highlight=False)
    skipped = plan.skipped
    for item in skipped[:SHOWN_SKIPPED]:
        console.print(f"  - not uploaded: {item.path}: {item.reason}", markup=False, highlight=False)
    if len(skipped) > SHOWN_SKIPPED:
        more = len(skipped) - SHOWN_SKIPPED
        console.print(f"  ... and {more} more (rentrain check --json lists them all)", markup=False)


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
