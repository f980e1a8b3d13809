"""The `rentrain` command line. Each command lives in rentrain/commands/<name>.py."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from rentrain import __version__
from rentrain.cli_types import check_timing_environment
from rentrain.commands import check, continue_job, costs, estimate, init, jobs, offers, report, run

# Commands that look at the provider accounts themselves (status, down) or act on one job (attach): the sweep
# before them would be noise, or would act on the job they are about to act on.
QUIET_COMMANDS = {"status", "down", "attach"}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rentrain")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Train Stable Diffusion LoRAs on rented cloud GPUs, unattended, and never leave a machine billing."""
    check_timing_environment()
    if ctx.invoked_subcommand not in QUIET_COMMANDS and "--help" not in sys.argv[1:]:
        jobs.sweep(Console(stderr=True))  # says what may bill; the command keeps its own exit code


main.add_command(check.check)
main.add_command(init.init)
main.add_command(offers.offers)
main.add_command(estimate.estimate)
main.add_command(run.run)
main.add_command(continue_job.continue_job)
main.add_command(jobs.status)
main.add_command(jobs.attach)
main.add_command(jobs.logs)
main.add_command(jobs.fetch)
main.add_command(jobs.down)
main.add_command(report.report)
main.add_command(costs.costs)
