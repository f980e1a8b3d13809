"""Ending a job's instances: destroy, confirm with the provider that each is gone, take the job's key off the
account, and sweep the provider for instances with the job's label that no record of it ended."""

from __future__ import annotations

import posixpath
import shlex
import time
from contextlib import suppress

from providers.base import Instance, NotFound, ProviderError
from rentrain.accounts import record_found_instance
from rentrain.job_phases.context import JobContext, JobFailed, Outcome, Session
from rentrain.job_phases.meter import record_job_run
from rentrain.ledger import InstanceRecord
from rentrain.sshkeys import forget_job_key
from rentrain.transport import TransportError


class Teardown:
    def __init__(self, context: JobContext):
        self.context = context

    def destroy(self, session: Session, reason: str) -> None:
        """End the session: destroy the instance (or, on a machine rented by hand, stop our processes)."""
        if self.context.provider is None:
            watchdog_pid = shlex.quote(posixpath.join(session.layout.root, "watchdog.pid"))
            trainer_pid = shlex.quote(session.layout.trainer_pid)
            with suppress(TransportError):
                session.remote.run(
                    f"kill $(cat {watchdog_pid} 2>/dev/null) 2>/dev/null; "
                    f"kill -TERM -$(cat {trainer_pid} 2>/dev/null) 2>/dev/null; true",
                    check=False,
                )
        session.remote.close()
        self.destroy_instance(session.record, reason)

    def destroy_instance(self, record: InstanceRecord, reason: str) -> None:
        """Destroy and confirm with the provider that it is gone; the ledger bills it until the destroy that the
        confirmation followed was answered (the provider had acted on it by then)."""
        with self.context.meter.phase("teardown"):
            self._destroy_instance(record, reason)

    def _destroy_instance(self, record: InstanceRecord, reason: str) -> None:
        self.context.move("destroying", reason)
        if self.context.provider is None:
            self.context.end_instance_record(record, reason)
            return
        if record.instance_id is None:
            self.adopt_by_label(record, reason)
            self.forget_key()  # a create cut short (Ctrl-C, a timeout) registered the key all the same
            return
        for attempt in range(6):
            try:
                self.context.provider.destroy(record.instance_id)
            except NotFound:
                pass
            except ProviderError as exc:
                self.context.say(f"destroy failed ({exc.message}); retrying")
                self.context.sleep(min(30, 2**attempt))
                continue
            answered_at = time.time()
            if self._confirmed_gone(record.instance_id):
                self.context.end_instance_record(record, reason, at=answered_at)
                self.forget_key()
                cost = self.context.ledger.job_cost(self.context.job.id)
                self.context.say(f"instance {record.instance_id} destroyed; job cost so far ${cost:.4f}")
                return
            self.context.sleep(min(30, 2**attempt))
        raise JobFailed(
            f"instance {record.instance_id} could not be confirmed destroyed: it may still bill. "
            f"Run: rentrain down {self.context.job.id}"
        )

    def forget_key(self) -> None:
        """Once no instance of the job is left, take its key off the account where it went (RunPod): it
        would reach future pods. The ledger records the removal; one that fails stays pending for the
        next rentrain command."""
        if (
            self.context.provider is None
            or not self.context.key.public_line
            or self.context.ledger.instances(self.context.job.id, live_only=True)
        ):
            return
        problem = forget_job_key(
            self.context.ledger, self.context.job.id, self.context.provider, self.context.key.public_line
        )
        if problem:
            self.context.say(f"warning: {problem}")

    def _confirmed_gone(self, instance_id: str) -> bool:
        assert self.context.provider is not None
        try:
            return self.context.provider.get(instance_id).status == "gone"
        except NotFound:
            return True
        except ProviderError:
            return False

    def close_job(self, outcome: Outcome, detail: str, error: str | None = None, **fields: object) -> None:
        """Close the job, and record what it measured if it trained (rentrain.job_phases.meter)."""
        self._sweep_label()
        failure = error or (detail if outcome != "succeeded" else None)
        self.context.move("closed", detail, outcome=outcome, error=failure, **fields)
        context = self.context
        record_job_run(context.ledger, context.job, context.loaded, context.meter, context.say)

    def _sweep_label(self) -> None:
        """The job's last guard before it closes: an instance with its label that no record of it ended (a
        create that answered after its timeout and after the create window) is destroyed now."""
        if self.context.provider is None:
            return
        try:
            destroyed = self._destroy_labelled()
        except ProviderError as exc:
            self.context.say(
                f"could not check {self.context.settings.provider} for instances labelled {self.context.job.label} "
                f"({exc.message}): one may still be billing; run: rentrain down {self.context.job.id}"
            )
            return
        for instance, destroyed_at in destroyed:
            self.context.say(f"destroyed instance {instance.id}: it carried this job's label but no record of it")
            reason = "found by its label when the job closed"
            record_found_instance(self.context.ledger, self.context.job.id, instance, destroyed_at, reason, None)

    def adopt_by_label(self, record: InstanceRecord, reason: str, wait: bool = True) -> None:
        """A create that failed on the wire may still make a machine, after its answer timed out too: with
        `wait`, look for the job's label until create_window_seconds after the create was sent, and destroy
        what turns up. The record stays open (so `rentrain down` keeps looking) until the provider was asked."""
        assert self.context.provider is not None
        until = record.created_at + self.context.settings.create_window_seconds if wait else 0.0
        if until > time.time():
            self.context.say(
                f"looking for an instance that create may still make, for up to {until - time.time():.0f} s"
            )
        while True:
            try:
                found = self._destroy_labelled()
            except ProviderError as exc:
                if time.time() < until:
                    self.context.sleep(self.context.settings.poll_seconds)
                    continue
                raise JobFailed(
                    f"could not check for a half-created instance ({exc.message}); "
                    f"run: rentrain down {self.context.job.id}"
                ) from None
            for instance, _destroyed_at in found:
                self.context.say(f"destroyed instance {instance.id} that the failed create left behind")
            if found or time.time() >= until:
                break
            self.context.sleep(self.context.settings.poll_seconds)
        if not found:
            self.context.end_instance_record(record, reason)
        for index, (instance, destroyed_at) in enumerate(found):  # the first is this create's; billed on its record
            made_by = record if index == 0 else None
            record_found_instance(self.context.ledger, record.job_id, instance, destroyed_at, reason, made_by)

    def _destroy_labelled(self) -> list[tuple[Instance, float]]:
        """Destroy every instance with this job's label that is neither gone nor ended in the ledger; each with
        the time its destroy was answered."""
        assert self.context.provider is not None
        ended = {i.instance_id for i in self.context.ledger.instances(self.context.job.id) if i.ended_at is not None}
        destroyed = []
        for instance in self.context.provider.list_instances(self.context.job.label):
            if instance.label != self.context.job.label or instance.status == "gone" or instance.id in ended:
                continue
            try:
                self.context.provider.destroy(instance.id)
            except NotFound:
                continue
            destroyed.append((instance, time.time()))
        return destroyed
