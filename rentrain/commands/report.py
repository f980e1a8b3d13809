"""`rentrain report ID`: rebuild the HTML report of a job or of a queue from what is on disk."""

from __future__ import annotations

import click

from rentrain.ledger import JobRecord, Ledger, QueueRecord
from rentrain.paths import state_dir
from rentrain.report import write_job_report, write_queue_report


def _resolve(ledger: Ledger, target: str) -> JobRecord | QueueRecord:
    """The one queue or job whose id starts with `target`; a click error naming it otherwise."""
    problems: list[str] = []
    found: list[JobRecord | QueueRecord] = []
    for find in (ledger.find_queue, ledger.find_job):
        try:
            match = find(target)
        except KeyError as exc:
            problems.append(str(exc.args[0]))
            continue
        if match is not None:
            found.append(match)
    if len(found) > 1:
        raise click.ClickException(f"{target!r} matches queue {found[0].id} and job {found[1].id}: give more of it")
    if found:
        return found[0]
    ambiguous = [p for p in problems if " matches " in p]
    raise click.ClickException(ambiguous[0] if ambiguous else f"no job or queue {target!r}")


@click.command()
@click.argument("target", metavar="ID")
def report(target: str) -> None:
    """Rebuild the report.html of a job or a queue (its id, or a unique start of it) and print its path."""
    path = state_dir() / "ledger.sqlite3"
    if not path.exists():
        raise click.ClickException(f"no job or queue {target!r}: no job has been run on this machine")
    ledger = Ledger(path)
    record = _resolve(ledger, target)
    try:
        if isinstance(record, QueueRecord):
            written = write_queue_report(ledger, record.id)
        else:
            written = write_job_report(ledger, record.id)
    except OSError as exc:
        raise click.ClickException(f"cannot write the report of {record.id}: {exc}") from None
    click.echo(str(written))
