"""The `rentrain` command line. Each command lives in rentrain/commands/<name>.py."""

from __future__ import annotations

import click

from rentrain import __version__
from rentrain.commands import check, init, run
from rentrain.commands import estimate, offers


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rentrain")
def main() -> None:
    """Train Stable Diffusion LoRAs on rented cloud GPUs, unattended, and never leave a machine billing."""


main.add_command(check.check)
main.add_command(init.init)
main.add_command(run.run)
main.add_command(offers.offers)
main.add_command(estimate.estimate)
