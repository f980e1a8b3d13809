"""Provisioning: rent an offer, wait until its instance answers SSH, and record where it answers and its host key;
or connect to a machine rented by hand; or reattach to the instance of a job whose client went away."""

from __future__ import annotations

import posixpath
import shlex
import time
from pathlib import Path

from providers.base import Instance, LaunchSpec, NoCapacity, NotFound, Offer, OfferGone, ProviderDown, ProviderError
from rentrain.job_phases.context import JobContext, JobFailed, Session
from rentrain.job_phases.prepare import Preparer
from rentrain.job_phases.teardown import Teardown
from rentrain.ledger import InstanceRecord
from rentrain.remote_job import RemoteLayout, job_root, probe_workdir
from rentrain.transport import (
    NETWORK_ERRORS,
    Remote,
    SshEndpoint,
    TransportError,
    UnknownHostKey,
    user_known_hosts_files,
)


class Provisioner:
    def __init__(self, context: JobContext, teardown: Teardown, preparer: Preparer):
        self.context = context
        self.teardown = teardown
        self.preparer = preparer  # a restarted instance gets its watchdog again

    def provision(self, offer: Offer) -> Session | None:
        assert self.context.provider is not None
        record = InstanceRecord(
            job_id=self.context.job.id,
            provider=offer.provider,
            offer_id=offer.offer_id,
            gpu=f"{offer.gpu_count}x {offer.gpu_model}",
            gpu_count=offer.gpu_count,
            usd_per_hour=offer.price_per_hour,
            created_at=time.time(),
        )
        self.context.ledger.add_instance(record)
        self.context.move("intent_recorded", f"offer {offer.offer_id}: {record.gpu} at ${offer.price_per_hour:.3f}/h")
        self.context.move("creating")
        launch = LaunchSpec(
            job_id=self.context.job.id,
            image=self.context.settings.image,
            disk_gb=self.context.settings.disk_gb,
            ssh_public_key=self.context.key.public_line,
        )
        create_sent = time.monotonic()
        try:
            instance = self.context.provider.create(offer, launch)
        except (OfferGone, NoCapacity) as exc:
            self.context.say(f"offer {offer.offer_id} ({offer.gpu_model}) is gone: {exc.message}; taking the next")
            self.context.end_instance_record(record, f"not created: {exc.message}")
            return None
        except ProviderError as exc:
            # a timeout or a 5xx says nothing of what the provider did: it may still make the machine
            on_the_wire = isinstance(exc, ProviderDown) or type(exc) is ProviderError
            self.context.say(f"creating on offer {offer.offer_id} failed: {exc.message}")
            self.teardown.adopt_by_label(record, f"create failed: {exc.message}", wait=on_the_wire)
            self.context.say("taking the next offer")
            return None
        record = self.context.instance_created(record, instance)
        self.context.move("waiting_ssh", f"instance {instance.id}")
        self.context.say(
            f"rented {record.gpu} ({offer.provider} instance {instance.id}) "
            f"at ${offer.price_per_hour:.3f}/h; waiting for SSH"
        )
        endpoint = self._wait_for_ssh(instance)
        if endpoint is None:
            self.context.ledger.record_failed_host(
                self.context.settings.provider, offer.offer_id, "SSH never became reachable"
            )
            self.teardown.destroy_instance(record, "SSH never became reachable")
            return None
        remote = Remote(endpoint, self.context.key.private_path, None, on_first_key=lambda key: self._pin(record, key))
        try:
            remote.connect_with_retries(attempts=max(2, int(self.context.settings.ssh_wait_seconds // 5)), max_delay=5)
            self._record_connected(record, endpoint)
            root = job_root(probe_workdir(remote), self.context.job.id)
        except (*NETWORK_ERRORS, TransportError) as exc:
            self.context.say(f"instance {instance.id} is not usable over SSH: {exc}")
            self.context.ledger.record_failed_host(self.context.settings.provider, offer.offer_id, f"SSH failed: {exc}")
            remote.close()
            self.teardown.destroy_instance(record, f"SSH failed: {exc}")
            return None
        self.context.meter.add("image_pull", time.monotonic() - create_sent)
        return Session(record=record, remote=remote, layout=RemoteLayout(root=root))

    def connect_by_hand(self, endpoint: SshEndpoint, key_path: Path, trust_new_host: bool = False) -> Session:
        """--provider ssh: a machine rented by hand; nothing to create or destroy. Its host key must be in the
        user's known_hosts (unless `trust_new_host`); it is pinned for the job either way."""
        gpus = "" if self.context.settings.gpus == 1 else f"{self.context.settings.gpus} GPUs, "
        record = InstanceRecord(
            job_id=self.context.job.id,
            provider="ssh",
            offer_id=f"{endpoint.user}@{endpoint.host}:{endpoint.port}",
            gpu=f"{gpus}machine rented by hand",
            gpu_count=self.context.settings.gpus,
            usd_per_hour=0.0,
            created_at=time.time(),
        )
        self.context.ledger.add_instance(record)
        self.context.move("intent_recorded", f"ssh {record.offer_id}")
        self.context.move("waiting_ssh")
        try:
            remote = Remote(
                endpoint,
                key_path,
                None,
                on_first_key=lambda key: self._pin(record, key),
                known_hosts_files=user_known_hosts_files(endpoint.host),
                trust_new_host=trust_new_host,
            )
            remote.connect_with_retries(attempts=3)
        except TransportError as exc:
            trust = isinstance(exc, UnknownHostKey)
            hint = " Or, to trust it on first use, run again with --trust-new-host." if trust else ""
            self.context.end_instance_record(record, f"not connected: {exc}")
            self.teardown.close_job("failed", f"could not connect: {exc}")
            raise JobFailed(f"{exc}{hint}") from None
        self._record_connected(record, endpoint)
        layout = RemoteLayout(root=job_root(probe_workdir(remote), self.context.job.id))
        return Session(record=record, remote=remote, layout=layout)

    def reattach(self, key_path: Path, start_stopped: bool = True) -> Session | None:
        """The session of a job whose client went away: same instance, same pinned host key. A stopped
        instance (the watchdog keeping unfetched results) is started again when `start_stopped`, and gets
        a watchdog again. None when the instance is gone (it is destroyed if anything of it is left)."""
        live = [i for i in self.context.ledger.instances(self.context.job.id) if i.ended_at is None and i.ssh_host]
        if not live or not self.context.job.remote_dir:
            raise JobFailed(
                f"job {self.context.job.id} has no running instance to attach to (state {self.context.job.state})"
            )
        record = live[-1]
        assert record.ssh_port is not None and record.ssh_user is not None
        endpoint = SshEndpoint(host=record.ssh_host or "", port=record.ssh_port, user=record.ssh_user)
        restarted = False
        if self.context.provider is not None and record.instance_id is not None:
            current, restarted = self._current_endpoint(record, start_stopped)
            if current is None:
                self.teardown.destroy_instance(record, "unusable when the client came back")
                return None
            endpoint = current
        remote = Remote(endpoint, key_path, record.host_key, on_first_key=lambda key: self._pin(record, key))
        session = Session(record=record, remote=remote, layout=RemoteLayout(root=self.context.job.remote_dir))
        try:
            remote.connect_with_retries(attempts=3)
            python_file = shlex.quote(posixpath.join(session.layout.root, "python"))
            session.python = remote.run(f"cat {python_file}", check=False).stdout.strip() or "python3"
            if restarted:
                self.context.read_watchdog_record(session)
                self.preparer.guard_restarted(session)
        except (*NETWORK_ERRORS, TransportError):
            pass  # follow() tells a dead host from a slow network
        return session

    def _current_endpoint(self, record: InstanceRecord, start_stopped: bool) -> tuple[SshEndpoint | None, bool]:
        """Where the instance answers SSH now (a restart may move its port), and whether it was started."""
        assert self.context.provider is not None and record.instance_id is not None
        try:
            instance = self.context.provider.get(record.instance_id)
        except NotFound:
            return None, False
        self.context.saw_instance(instance, following=False)
        if instance.status in ("exited", "gone"):
            return None, False
        started = False
        if instance.status == "stopped":
            if not start_stopped:
                raise JobFailed(
                    f"instance {instance.id} is stopped (its watchdog kept the results): "
                    f"`rentrain attach {self.context.job.id}` starts it, fetches and destroys; "
                    f"`rentrain down {self.context.job.id}` destroys it"
                )
            self.context.say(
                f"instance {instance.id} was stopped by its watchdog to keep unfetched results; starting it"
            )
            asked_at = time.time()
            self.context.provider.start(instance.id)
            self.context.instance_started(record, asked_at)
            started = True
        if instance.status != "running" or instance.ssh is None:
            endpoint = self._wait_for_ssh(instance)
            if endpoint is None:
                return None, started
        else:
            endpoint = SshEndpoint(host=instance.ssh.host, port=instance.ssh.port, user=instance.ssh.user)
        self.context.ledger.update_instance(
            record.job_id, record.offer_id, record.created_at, ssh_host=endpoint.host, ssh_port=endpoint.port
        )
        return endpoint, started

    def _record_connected(self, record: InstanceRecord, endpoint: SshEndpoint) -> None:
        """The instance answered SSH: from now on `attach`, `logs` and `fetch` reach it there."""
        self.context.ledger.update_instance(
            record.job_id,
            record.offer_id,
            record.created_at,
            running_at=time.time(),
            ssh_host=endpoint.host,
            ssh_port=endpoint.port,
            ssh_user=endpoint.user,
        )

    def _pin(self, record: InstanceRecord, host_key: str) -> None:
        self.context.ledger.update_instance(record.job_id, record.offer_id, record.created_at, host_key=host_key)

    def _wait_for_ssh(self, instance: Instance) -> SshEndpoint | None:
        assert self.context.provider is not None
        deadline = time.time() + self.context.settings.ssh_wait_seconds
        while time.time() < deadline:
            try:
                current = self.context.provider.get(instance.id)
            except NotFound:
                return None
            except ProviderError as exc:
                self.context.say(f"provider error while waiting: {exc.message}")
                current = None
            if current is not None:
                self.context.saw_instance(current)
                if current.status in ("exited", "gone"):
                    self.context.say(
                        f"instance {instance.id} {current.provider_status}: "
                        f"{current.status_message or 'no reason given'}"
                    )
                    return None
                if current.status == "running" and current.ssh is not None:
                    return SshEndpoint(host=current.ssh.host, port=current.ssh.port, user=current.ssh.user)
            self.context.sleep(self.context.settings.poll_seconds)
        self.context.say(
            f"instance {instance.id} was not reachable within {self.context.settings.ssh_wait_seconds:.0f} s"
        )
        return None
