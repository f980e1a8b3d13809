"""Bringing a job's files home: checkpoints, samples and the result within the job's fetch limits, and the
trainer's log; stopping the trainer when the job ends before it does."""

from __future__ import annotations

import posixpath
import shlex
from functools import cached_property
from pathlib import Path

from remote.events import CheckpointEvent, DoneEvent
from rentrain.fetch_limits import FetchLimits, fetch_limits
from rentrain.job_phases.context import JobContext, Session, trainer_alive
from rentrain.transport import NETWORK_ERRORS, FetchBudget, FetchRefused, TransportError, check_remote_path


class Fetcher:
    def __init__(self, context: JobContext):
        self.context = context

    @cached_property
    def fetch_limits(self) -> FetchLimits:
        return fetch_limits(self.context.loaded.train, self.context.job.total_steps)

    @cached_property
    def fetch_budget(self) -> FetchBudget:
        """What this client may still bring home of the job, over all its fetches."""
        return FetchBudget(self.fetch_limits.total_bytes)

    def bytes_fetched(self) -> int:
        """What this client brought home of the job so far (what its fetches took from the fetch budget)."""
        budget: FetchBudget | None = self.__dict__.get("fetch_budget")  # not made yet: nothing fetched
        return 0 if budget is None else budget.total_bytes - budget.left

    def fetch_file(
        self, session: Session, remote_path: str, local: Path, sha256: str | None, attempts: int = 3
    ) -> Path:
        # LoRA files (checkpoint, done) come with their hash; sample grids without one
        limit = self.fetch_limits.lora if sha256 is not None else self.fetch_limits.sample
        root = session.layout.output
        for attempt in range(1, attempts + 1):
            try:
                return session.remote.download(remote_path, root, local, sha256, limit, self.fetch_budget)
            except FetchRefused:
                raise  # the host is hostile or broken: asking again cannot help
            except (*NETWORK_ERRORS, TransportError) as exc:
                if attempt == attempts or "never overwrites" in str(exc):
                    raise
                self.context.say(f"fetching {posixpath.basename(remote_path)} failed ({exc}); again")
                self.context.sleep(2**attempt)
        raise AssertionError("unreachable")

    def fetch_checkpoint(self, session: Session, event: CheckpointEvent) -> None:
        if session.remote.remote_size(check_remote_path(event.path, session.layout.output)) is None:
            self.context.say(
                f"checkpoint {posixpath.basename(event.path)} is no longer on the instance (save_last_n_epochs)"
            )
            return
        self.fetch_file(session, event.path, self.context.output_dir / posixpath.basename(event.path), event.sha256)
        if event.state_dir:
            self.fetch_state(session, event.state_dir)

    def fetch_state(self, session: Session, state_dir: str) -> None:
        """A training state, into the job's own folder (not the output folder): the job's newest one."""
        name = posixpath.basename(check_remote_path(state_dir, session.layout.output))
        local = session.remote.download_tree(
            state_dir,
            session.layout.output,
            self.context.scratch / "states" / name,
            self.context.scratch,
            self.fetch_limits.state,
            self.fetch_budget,
        )
        self.context.ledger.update_job(self.context.job.id, last_state_path=str(local))

    def fetch_outputs(self, session: Session, final: DoneEvent | None) -> None:
        self.context.move("fetching")
        if final is not None:
            local_path = self.context.output_dir / posixpath.basename(final.path)
            local = self.fetch_file(session, final.path, local_path, final.sha256)
            self.context.ledger.update_job(self.context.job.id, result_path=str(local), result_sha256=final.sha256)
            if final.state_dir:  # what `rentrain continue` starts from
                self.fetch_state(session, final.state_dir)
        session.remote.run(f"touch {shlex.quote(session.layout.fetched)}", check=False)

    def fetch_logs(self, session: Session) -> None:
        try:
            text = session.remote.run(f"tail -n 200 {shlex.quote(session.layout.trainer_log)}", check=False).stdout
            self.context.output_dir.mkdir(parents=True, exist_ok=True)
            (self.context.output_dir / f"trainer-{self.context.job.id}.log").write_text(text)
        except Exception as exc:
            self.context.say(f"could not keep the trainer's log: {exc}")

    def stop_trainer(self, session: Session) -> None:
        pid_file = shlex.quote(session.layout.trainer_pid)
        session.remote.run(f"kill -TERM -$(cat {pid_file}) 2>/dev/null; sleep 2", check=False)
        for _ in range(30):
            if not trainer_alive(session):
                return
            self.context.sleep(1)
