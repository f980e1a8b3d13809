"""Text that did not come from our own code (paths, provider errors, a host's words) prints as it is."""

from __future__ import annotations

import io

from rich.console import Console

from rentrain.progress import plain_printer


def test_the_job_runners_printer_shows_markup_characters_as_text() -> None:
    out = io.StringIO()
    say = plain_printer(Console(file=out, width=200, color_system=None))
    say("could not reach [/bold] /data/[set 1]/x.png: [red]no[/]")
    assert out.getvalue() == "could not reach [/bold] /data/[set 1]/x.png: [red]no[/]\n"
