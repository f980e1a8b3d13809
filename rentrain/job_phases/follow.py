"""Following a job's training: tail the events the trainer writes, show them, fetch what they announce, keep the
heartbeat, and notice a host, a trainer or a budget that ended the run."""

from __future__ import annotations

import posixpath
import shlex
import time

from remote.events import EVENTS_FILE, CheckpointEvent, DoneEvent, ErrorEvent, Event, SampleEvent, parse_event
from rentrain.job_phases.context import (
    CONNECTION_LOST,
    BudgetReached,
    DetachRequested,
    JobContext,
    Session,
    budget_reached,
    deadline_reached,
    trainer_alive,
)
from rentrain.job_phases.fetch import Fetcher


class Follower:
    def __init__(self, context: JobContext, fetcher: Fetcher):
        self.context = context
        self.fetcher = fetcher

    def follow(self, session: Session) -> DoneEvent | ErrorEvent:
        """Tail events.jsonl from the recorded byte offset until done or error, fetching checkpoints as they land."""
        self.context.move("following")
        lost_since: float | None = None
        while True:
            if self.context.detach_requested:
                raise DetachRequested(self.context.detach_requested)
            try:
                final = self._follow_once(session)
                lost_since = None
            except CONNECTION_LOST as exc:
                lost_since = lost_since or time.time()
                self.context.check_host(session, lost_since, exc)
                self.context.sleep(self.context.settings.poll_seconds)
                continue
            if final is not None:
                return final
            self._check_budget(session)
            self.context.sleep(self.context.settings.poll_seconds)

    def _follow_once(self, session: Session) -> DoneEvent | ErrorEvent | None:
        """Read and handle the complete new event lines; notice a trainer that ended without a result."""
        chunk = session.remote.read_from(session.layout.events, self.context.events_offset)
        self.context.heartbeat(session)
        complete = chunk[: chunk.rfind(b"\n") + 1]
        for line in complete.splitlines(keepends=True):
            final = None
            try:
                event = parse_event(line)
            except ValueError:
                event = None
            if event is not None:
                final = self._on_event(session, event, line)
            self._advance(len(line))
            if final is not None:
                return final
        if complete or trainer_alive(session):
            return None
        # the trainer is gone: one more read for a line written as it ended, then report what it said
        if b"\n" in session.remote.read_from(session.layout.events, self.context.events_offset):
            return None
        self.context.check_host(session, time.time(), RuntimeError("the trainer is gone"), grace=False)
        log = session.remote.run(f"tail -n 20 {shlex.quote(session.layout.trainer_log)}", check=False).stdout
        return ErrorEvent(kind="internal", message=f"the trainer exited without a result:\n{log.strip()}")

    def _advance(self, consumed: int) -> None:
        if consumed:
            self.context.events_offset += consumed
            self.context.ledger.update_job(self.context.job.id, events_offset=self.context.events_offset)

    def _check_budget(self, session: Session) -> None:
        """The budget or the deadline reached: the trainer is stopped (it saves its state) and what it made
        comes home."""
        settings = self.context.settings
        over = budget_reached(self.context.ledger, self.context.job.id, settings.max_cost) or deadline_reached(
            settings.deadline
        )
        if over:
            raise BudgetReached(over)

    def _on_event(self, session: Session, event: Event, line: bytes) -> DoneEvent | ErrorEvent | None:
        """Show the event, keep it in the local events.jsonl, fetch what it announces."""
        self.context.view.handle(event)
        self.context.meter.saw_event(event)
        self.context.output_dir.mkdir(parents=True, exist_ok=True)
        with (self.context.output_dir / EVENTS_FILE).open("ab") as copy:
            copy.write(line.rstrip(b"\n") + b"\n")
        if hasattr(event, "step") and isinstance(event.step, int):
            self.context.ledger.update_job(self.context.job.id, last_step=event.step)
        if isinstance(event, CheckpointEvent):
            self.fetcher.fetch_checkpoint(session, event)
        elif isinstance(event, SampleEvent):
            self.fetcher.fetch_file(
                session, event.path, self.context.output_dir / "samples" / posixpath.basename(event.path), None
            )
        elif isinstance(event, (DoneEvent, ErrorEvent)):
            return event
        return None
