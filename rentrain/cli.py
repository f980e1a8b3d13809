"""The `rentrain` command line. Each command lives in rentrain/commands/<name>.py."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from rentrain import __version__
from rentrain.commands import check, estimate, init, jobs, offers, run

# Commands that list or end unfollowed instances themselves; warning before them is noise.
QUIET_COMMANDS = {"status", "down", "attach"}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rentrain")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Train Stable Diffusion LoRAs on rented cloud GPUs, unattended, and never leave a machine billing."""
    if ctx.invoked_subcommand not in QUIET_COMMANDS and "--help" not in sys.argv[1:]:
        jobs.warn_about_unfollowed(Console(stderr=True))


main.add_command(check.check)
main.add_command(init.init)
main.add_command(offers.offers)
main.add_command(estimate.estimate)
main.add_command(run.run)
main.add_command(jobs.status)
main.add_command(jobs.attach)
main.add_command(jobs.logs)
main.add_command(jobs.fetch)
main.add_command(jobs.down)
