"""`rentrain continue JOB --epochs N`: train a finished job's LoRA N epochs more on a new rental, from the training
state its run ended with; what the earlier run made stays as it is (docs/continue.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape

from providers.registry import MARKETS
from remote.buckets import StepPlan
from remote.config import MAX_EPOCHS, ConfigError, LoadedConfig, TrainConfig, load_config
from rentrain.cli_types import Number, setting_type, timing_overrides
from rentrain.commands.check import checked_config
from rentrain.commands.run import ResumeFrom, _refuse_if_impossible, _run_rented, notifier_from, notify_option
from rentrain.commands.run_common import refuse_to_overwrite
from rentrain.job import RunSettings
from rentrain.job_config import with_train_overrides
from rentrain.job_news import JobNews
from rentrain.job_profile import steps_per_epoch
from rentrain.ledger import JobRecord, Ledger, settings_of
from rentrain.multigpu import describe_data_parallel
from rentrain.progress import plain_printer

# The trainer's readable copy of a state's position (remote/trainer/state.py writes it; that module needs torch,
# which this machine may not have).
STATE_JSON = "state.json"
# The earlier job's settings that the continued job keeps (--max-cost replaces the budget); its deadline has
# passed or belongs to that run, and the timing settings come from this run's environment, as for `run`.
CARRIED_SETTINGS = (
    "max_cost",
    "max_hours",
    "idle_timeout_minutes",
    "max_offers",
    "max_retries",
    "image",
    "disk_gb",
    "gpus",
)


class StatePosition(BaseModel):
    """Where a training state stands (state.json): the part `continue` reads."""

    step: int  # optimizer steps done
    epoch: int  # 0-based epoch the next batch belongs to
    batch: int  # index of the next batch within that epoch
    total_steps: int  # of the run that saved it
    batches_per_epoch: int
    batch_size: int

    @property
    def ends_its_run(self) -> bool:
        return self.step >= self.total_steps

    @property
    def epochs_reached(self) -> int:
        """Epochs trained, one begun counted whole (a run set in max_train_steps may stop within one)."""
        return self.epoch + (1 if self.batch else 0)


@dataclass(frozen=True)
class Continuation:
    """The longer run: its epochs in all, its file name, and the steps it adds."""

    epochs: int
    output_name: str
    steps_to_go: int

    def overrides(self, output_dir: str) -> dict[str, Any]:
        """Its training keys that differ from the config file's: it writes next to the earlier run's files."""
        return {"max_train_epochs": self.epochs, "output_name": self.output_name, "output_dir": output_dir}


def continued_output_name(train: TrainConfig, epochs: int) -> str:
    """The naming rule: the config's output_name (the trainer's default "last" without one) and the run's total
    epochs, `my_lora-12epochs`: never a name of the earlier run, and a later continue gets a name of its own."""
    return f"{train.output_name or 'last'}-{epochs}epochs"


def plan_continuation(
    train: TrainConfig, plan: StepPlan, position: StatePosition, more_epochs: int, gpus: int
) -> Continuation:
    """N more epochs after those the state reached (a begun epoch is finished first), on `gpus` GPUs. A config set
    in max_train_steps is continued in epochs too: max_train_epochs wins over it, as in kohya."""
    epochs = position.epochs_reached + more_epochs
    batches_per_step = train.gradient_accumulation_steps * gpus
    left_this_epoch = math.ceil((plan.batches_per_epoch - position.batch) / batches_per_step)
    steps_to_go = left_this_epoch + (epochs - position.epoch - 1) * steps_per_epoch(
        plan.batches_per_epoch, gpus, train.gradient_accumulation_steps
    )
    return Continuation(epochs=epochs, output_name=continued_output_name(train, epochs), steps_to_go=steps_to_go)


@click.command("continue")
@click.argument("job_id", metavar="JOB")
@click.option(
    "--epochs",
    "more_epochs",
    type=Number(1, MAX_EPOCHS, whole=True),
    required=True,
    help="How many MORE epochs to train, on top of those the job reached (not the new total).",
)
@click.option(
    "--provider",
    type=click.Choice(MARKETS, case_sensitive=False),
    help="Where to rent (default: where the job ran, else [rentrain] provider).",
)
@click.option(
    "--max-cost",
    type=setting_type("max_cost"),
    help="USD budget for the new job (default: the earlier job's); checked before renting, enforced on the instance.",
)
@click.option("--yes", "-y", is_flag=True, help="Rent without asking.")
@notify_option
def continue_job(
    job_id: str,
    more_epochs: int,
    provider: str | None,
    max_cost: float | None,
    yes: bool,
    notify_urls: tuple[str, ...],
) -> None:
    """Train the LoRA of finished job JOB (an id or a unique prefix) for --epochs more epochs on a new rental,
    starting from the training state its run ended with (brought home with its result).

    The config is the job's own, with max_train_epochs raised and output_name `<name>-<total>epochs`, so the
    earlier run's files in output_dir stay as they are. The offer, estimate, question and job are `rentrain run`'s.
    """
    console = Console()
    earlier = _finished_job(Ledger(), job_id)
    state, position = _final_state(earlier)
    try:
        from_file = load_config(earlier.config_path)
    except ConfigError as exc:
        raise click.ClickException(f"job {earlier.id}'s config can no longer be read: {exc}") from None
    chosen = _provider_for(earlier, from_file, provider)
    _refuse_if_impossible(chosen)
    result, from_file = checked_config(Path(earlier.config_path), console)
    assert result.dataset is not None and result.dataset.step_plan is not None  # checked_config exits otherwise
    plan = result.dataset.step_plan
    _refuse_another_dataset(earlier, from_file.train, plan, position)
    settings = continued_settings(earlier, from_file, chosen, max_cost)
    continuation = plan_continuation(from_file.train, plan, position, more_epochs, settings.gpus)
    overrides = continuation.overrides(earlier.output_dir)
    try:
        loaded = with_train_overrides(from_file, overrides)
    except ConfigError as exc:
        raise click.ClickException(f"the continued config does not fit: {exc}") from None
    settings = settings.model_copy(update={"train_overrides": overrides})
    _print_plan(console, loaded, earlier, position, continuation, more_epochs, settings.gpus)
    refuse_to_overwrite(loaded, False, console)
    news = JobNews(Ledger(), notifier_from(notify_urls, console), plain_printer(console))
    to_go = plan.model_copy(
        update={"epochs": continuation.epochs - position.epoch, "total_steps": continuation.steps_to_go}
    )
    report = result.dataset.model_copy(update={"step_plan": to_go})  # the estimate prices the steps to go
    resume = ResumeFrom(job_id=earlier.id, state_path=str(state), steps_done=position.step)
    _run_rented(loaded, settings, report, (), False, yes, console, news, resume)


def _finished_job(ledger: Ledger, job_id: str) -> JobRecord:
    try:
        job = ledger.find_job(job_id)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from None
    if job.is_open:
        raise click.ClickException(
            f"job {job.id} is still open ({job.state}): wait until it ends (`rentrain attach {job.id}` follows it)"
        )
    return job


def _final_state(job: JobRecord) -> tuple[Path, StatePosition]:
    """The job's newest training state at home, which must be the one its run ended with."""
    if not job.last_state_path:
        raise click.ClickException(
            f"job {job.id} has no resumable training state at home: none came back from its instance"
        )
    state = Path(job.last_state_path)
    if not state.is_dir():
        raise click.ClickException(f"job {job.id}'s training state {state} is gone (moved or deleted)")
    try:
        position = StatePosition.model_validate_json((state / STATE_JSON).read_bytes())
    except (OSError, ValidationError) as exc:
        raise click.ClickException(f"{state / STATE_JSON} cannot be read as a training state: {exc}") from None
    if not position.ends_its_run:
        raise click.ClickException(
            f"job {job.id}'s newest state at home ({state}) is from step {position.step} of {position.total_steps}: "
            "its run did not end there, and `continue` goes on from where a run ended (rentrain brings that "
            "state home with the final LoRA; jobs from before it did not)"
        )
    return state, position


def _provider_for(job: JobRecord, loaded: LoadedConfig, asked: str | None) -> str:
    for candidate in (asked, job.provider, loaded.job.provider):
        if candidate and candidate.lower() in MARKETS:
            return candidate.lower()
    raise click.UsageError("say where to rent: --provider vast|runpod")


def _refuse_another_dataset(job: JobRecord, train: TrainConfig, plan: StepPlan, position: StatePosition) -> None:
    """The state's batch order only fits the dataset and batch size it was trained with: checked here, before
    renting, as the trainer would check it on the instance."""
    if position.batch_size != train.batch_size or position.batches_per_epoch != plan.batches_per_epoch:
        raise click.ClickException(
            f"job {job.id} trained batch_size {position.batch_size}, {position.batches_per_epoch} batches per epoch; "
            f"its config now gives batch_size {train.batch_size}, {plan.batches_per_epoch} batches: its dataset or "
            "batch size changed since, and its state cannot go on with them"
        )


def continued_settings(job: JobRecord, loaded: LoadedConfig, provider: str, max_cost: float | None) -> RunSettings:
    """The earlier job's settings that describe the job (CARRIED_SETTINGS); its budget unless --max-cost."""
    earlier = settings_of(job)
    carried = {name: earlier[name] for name in CARRIED_SETTINGS if name in earlier}
    if max_cost is not None or "max_cost" not in carried:
        carried["max_cost"] = max_cost if max_cost is not None else loaded.job.max_cost
    return RunSettings.model_validate({**carried, "provider": provider, **timing_overrides()})


def _print_plan(
    console: Console,
    loaded: LoadedConfig,
    job: JobRecord,
    position: StatePosition,
    continuation: Continuation,
    more_epochs: int,
    gpus: int,
) -> None:
    line = (
        f"{loaded.path}: job {job.id} ended at step {position.step} (epoch {position.epochs_reached}); "
        f"{more_epochs} more epoch(s): {continuation.steps_to_go} steps to epoch {continuation.epochs}, "
        f"written as {continuation.output_name}.safetensors"
    )
    console.print(escape(line), highlight=False)
    if gpus > 1:
        console.print(describe_data_parallel(gpus, loaded.train.batch_size) + " (README: Several GPUs)")
