"""What the user hears when a job or a queue ends: its report.html is (re)written, and a notification goes to
the --notify / credentials.toml URLs (rentrain.notify). Neither ever stops a job: a report that cannot be
written, or a notifier that fails, is one line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rentrain.ledger import JobRecord, Ledger, QueueRecord
from rentrain.notify import Notification, NotificationKind, Notifier
from rentrain.report import write_job_report, write_queue_report


class JobNews:
    def __init__(self, ledger: Ledger, notifier: Notifier | None, say: Callable[[str], None]):
        self.ledger = ledger
        self.notifier = notifier
        self.say = say

    def job_ended(self, job: JobRecord) -> Path | None:
        """The job closed: its report, and "done" (with its last sample grid) or "failed" (with the reason).
        A skipped or cancelled job gets its report only: the queue's stop is told once, by `queue_stopped`."""
        report = self._report(lambda: write_job_report(self.ledger, job.id), f"job {job.id}")
        cost = self.ledger.job_cost(job.id)
        where = f"\nreport: {report}" if report else ""
        if job.outcome == "succeeded":
            body = f"{job.config_path}\nLoRA: {job.result_path}\ncost: ${cost:.2f}{where}"
            self._send("job_done", f"rentrain: {_name(job)} is done", body, _last_grid(job))
        elif job.outcome == "failed":
            body = f"{job.config_path}\n{job.error or 'failed'}\ncost: ${cost:.2f}{where}"
            self._send("job_failed", f"rentrain: {_name(job)} failed", body)
        return report

    def queue_stopped(self, queue: QueueRecord, reason: str) -> None:
        waiting = sum(1 for job in self.ledger.queue_jobs(queue.id) if job.state == "planned")
        body = f"{reason}; {waiting} job(s) not started are skipped. Spent ${self.ledger.queue_cost(queue.id):.2f}."
        self._send("queue_stopped", f"rentrain: queue {queue.id} stopped", body)

    def queue_ended(self, queue: QueueRecord) -> Path | None:
        return self._report(lambda: write_queue_report(self.ledger, queue.id), f"queue {queue.id}")

    def _report(self, write: Callable[[], Path], whose: str) -> Path | None:
        try:
            return write()
        except (OSError, ValueError) as exc:
            self.say(f"the report of {whose} could not be written: {exc}")
            return None

    def _send(self, kind: NotificationKind, title: str, body: str, attachment: Path | None = None) -> None:
        if self.notifier is not None:
            self.notifier.send(Notification(kind=kind, title=title, body=body, attachment=attachment))


def _name(job: JobRecord) -> str:
    config = Path(job.config_path)
    return f"{config.parent.name}/{config.name}" if config.parent.name else config.name


def _last_grid(job: JobRecord) -> Path | None:
    grids = sorted((Path(job.output_dir) / "samples").glob("*.png"), key=lambda p: p.stat().st_mtime)
    return grids[-1] if grids else None
