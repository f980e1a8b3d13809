"""What status, down, attach, fetch and the start-up sweep say and do about instances, against fake providers:
loud "could not check", stopped instances and their storage cost, the stopped-instance limit, the client lock,
and the RunPod SSH key on every end path."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from providers import registry
from providers.base import (
    Instance,
    LaunchSpec,
    NoCapacity,
    NotFound,
    Offer,
    ProviderDown,
    ProviderError,
    ProviderInfo,
    Requirements,
    SelfDestructRecipe,
)
from remote.config import load_config
from rentrain.accounts import ORPHAN_CHECK_EVERY_SECONDS, STOPPED_LIMIT_SECONDS
from rentrain.cli import main
from rentrain.commands.jobs import sweep
from rentrain.commands.run import _drive
from rentrain.job import JobFailed, JobRunner, RunSettings
from rentrain.ledger import InstanceRecord, JobRecord, JobState, Ledger, this_host
from rentrain.progress import RunProgress
from rentrain.sshkeys import create_job_key
from tests.e2e.conftest import write_job

DAY = 86400.0


class FakeProvider:
    """A provider account in memory: what it lists, what was destroyed, started, stopped, which keys it holds."""

    def __init__(self, name: str):
        self.info = ProviderInfo(name=name, display_name=name)
        self.instances: dict[str, Instance] = {}
        self.list_error: ProviderError | None = None
        self.list_gate: threading.Event | None = None  # a list that hangs until the gate opens
        self.forget_error: ProviderError | None = None
        self.lists = 0
        self.destroyed: list[str] = []
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.created: list[LaunchSpec] = []
        self.forgotten: list[str] = []

    def add(self, instance_id: str, label: str, status: str = "running", storage: float | None = None) -> None:
        self.instances[instance_id] = Instance(
            provider=self.info.name,
            id=instance_id,
            label=label,
            status=status,
            provider_status=status,  # type: ignore[arg-type]
            storage_usd_per_hour=storage,
        )

    def search(self, requirements: Requirements) -> list[Offer]:
        return [
            Offer(
                provider=self.info.name,
                offer_id="o1",
                gpu_model="RTX 4090",
                gpu_name_raw="RTX 4090",
                gpu_count=1,
                vram_gb=24,
                price_per_hour=0.4,
            )
        ]

    def create(self, offer: Offer, launch: LaunchSpec) -> Instance:
        self.created.append(launch)
        raise NoCapacity(self.info.name, "the fake rents nothing")

    def get(self, instance_id: str) -> Instance:
        if instance_id not in self.instances:
            raise NotFound(self.info.name, f"no instance {instance_id}", 404)
        return self.instances[instance_id]

    def list_instances(self, label_prefix: str = "rentrain-") -> list[Instance]:
        self.lists += 1
        if self.list_gate is not None:
            self.list_gate.wait(30)
        if self.list_error is not None:
            raise self.list_error
        return [i for i in self.instances.values() if (i.label or "").startswith(label_prefix)]

    def stop(self, instance_id: str) -> None:
        self.stopped.append(instance_id)

    def start(self, instance_id: str) -> None:
        self.started.append(instance_id)  # and it stays stopped: its GPU is rented by someone else

    def destroy(self, instance_id: str) -> None:
        self.destroyed.append(instance_id)
        self.instances.pop(instance_id, None)

    def forget_ssh_key(self, public_key: str) -> None:
        if self.forget_error is not None:
            raise self.forget_error
        self.forgotten.append(public_key)

    def self_destroy_recipe(self) -> SelfDestructRecipe:
        return SelfDestructRecipe(provider=self.info.name, env_vars=[], destroy=[], stop=[])


Fakes = dict[str, FakeProvider]


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fakes]:
    """Both markets faked, both with an API key (delete one from the environment for "not configured")."""
    accounts = {name: FakeProvider(name) for name in ("vast", "runpod")}
    monkeypatch.setenv("COLUMNS", "400")  # one line per message, as a wide terminal shows them
    for name, fake in accounts.items():
        monkeypatch.setitem(registry._FACTORIES, name, lambda fake=fake, **_kwargs: fake)
        monkeypatch.setenv(registry.API_KEY_ENV[name], f"{name}-test-key")
    yield accounts
    for fake in accounts.values():
        if fake.list_gate is not None:
            fake.list_gate.set()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _add_job(
    ledger: Ledger,
    tmp_path: Path,
    job_id: str,
    provider: str = "vast",
    instance_id: str | None = "11",
    *,
    state: JobState = "following",
    result_home: bool = False,
    idle_days: float = 0.0,
    client_pid: int | None = None,
) -> JobRecord:
    """A job whose client is gone (unless `client_pid`), with one instance that no-one recorded as ended."""
    config = write_job(tmp_path / job_id)
    output = tmp_path / job_id / "output"
    output.mkdir()
    result = None
    if result_home:
        result = output / "lora.safetensors"
        result.write_bytes(b"home")
    seen = time.time() - idle_days * DAY
    ledger.create_job(
        JobRecord(
            id=job_id,
            created_at=seen,
            config_path=str(config),
            provider=provider,
            label=f"rentrain-{job_id}",
            state=state,  # the ledger as the client left it
            output_dir=str(output),
            remote_dir=f"/root/rentrain/{job_id}",
            result_path=str(result) if result else None,
            client_seen_at=seen,
            last_step=40,
            total_steps=80,
            settings_json=RunSettings(provider=provider).model_dump_json(),
            client_pid=client_pid,
            client_host=this_host() if client_pid else None,
            client_beat_at=time.time() if client_pid else None,
        )
    )
    create_job_key(job_id)
    ledger.add_instance(
        InstanceRecord(
            job_id=job_id,
            provider=provider,
            instance_id=instance_id,
            offer_id="o1",
            gpu="1x RTX 4090",
            usd_per_hour=0.4,
            ssh_host="127.0.0.1",
            ssh_port=2,
            ssh_user="root",
            created_at=seen,
            running_at=seen,
        )
    )
    return ledger.job(job_id)


def _sweep_output(seconds: float = 8.0) -> str:
    buffer = io.StringIO()
    sweep(Console(file=buffer, width=400), seconds=seconds)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- could not check


def test_down_all_says_it_could_not_check_a_provider_and_exits_1(fakes: Fakes) -> None:
    retired = "/api/v0/instances/ is deprecated. Use /api/v1/instances/ instead."
    fakes["vast"].list_error = ProviderError("vast", retired, 410)
    result = CliRunner().invoke(main, ["down", "--all", "--yes"], terminal_width=400)
    assert result.exit_code == 1, result.output
    assert "could not check vast (HTTP 410: /api/v0/instances/ is deprecated." in result.output
    assert "instances there may still be billing" in result.output
    assert "nothing is running" not in result.output


def test_status_says_it_could_not_check_a_provider_and_exits_1(fakes: Fakes) -> None:
    fakes["runpod"].list_error = ProviderDown("runpod", "could not reach https://rest.runpod.io: timed out")
    result = CliRunner().invoke(main, ["status"], terminal_width=400)
    assert result.exit_code == 1, result.output
    why = "could not reach https://rest.runpod.io: timed out"
    assert f"could not check runpod ({why}): instances there may still be billing" in result.output


def test_a_provider_without_a_key_is_only_not_configured(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNPOD_API_KEY")
    result = CliRunner().invoke(main, ["down", "--all", "--yes"], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert "nothing is running" in result.output and "could not check" not in result.output
    status = CliRunner().invoke(main, ["status"], terminal_width=400)
    assert status.exit_code == 0 and "not configured (no API key): runpod" in status.output
    assert fakes["runpod"].lists == 0


def test_down_job_checks_its_provider_for_instances_under_its_label(tmp_path: Path, fakes: Fakes) -> None:
    ledger = Ledger()
    _add_job(ledger, tmp_path, "j-late", instance_id=None, state="creating")
    fakes["vast"].add("77", "rentrain-j-late")  # the create answered after the client gave up on it
    result = CliRunner().invoke(main, ["down", "j-late", "--yes"], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert fakes["vast"].destroyed == ["77"]
    assert ledger.job("j-late").state == "closed"


# ---------------------------------------------------------------------------------------------- the sweep


def test_the_sweep_asks_no_provider_without_a_reason(tmp_path: Path, fakes: Fakes) -> None:
    ledger = Ledger()
    closed = _add_job(ledger, tmp_path, "j-closed", result_home=True)
    ledger.update_instance(closed.id, "o1", closed.created_at, ended_at=time.time(), end_reason="done")
    ledger.record_key_removed(closed.id)
    ledger.transition(closed.id, "closed", outcome="succeeded")
    for name in fakes:
        ledger.record_account_checked(name)
    assert _sweep_output() == ""
    assert [fake.lists for fake in fakes.values()] == [0, 0]

    _add_job(ledger, tmp_path, "j-open", provider="vast")  # its client died: the sweep must look there
    fakes["vast"].add("11", "rentrain-j-open")
    out = _sweep_output()
    assert "job j-open: instance 11 on vast" in out and "no rentrain client follows it" in out
    assert [fakes["vast"].lists, fakes["runpod"].lists] == [1, 0]


def test_the_sweep_looks_for_orphans_once_a_day(tmp_path: Path, fakes: Fakes) -> None:
    ledger = Ledger()
    ledger.record_account_checked("vast", time.time() - ORPHAN_CHECK_EVERY_SECONDS - 60)
    ledger.record_account_checked("runpod")
    fakes["vast"].add("5", "rentrain-from-another-laptop")
    out = _sweep_output()
    assert "vast instance 5 (rentrain-from-another-laptop, running) is in no job of this ledger" in out
    assert "rentrain down --all" in out
    assert [fakes["vast"].lists, fakes["runpod"].lists] == [1, 0]
    fakes["vast"].instances.clear()
    assert _sweep_output() == ""  # nothing unknown left: the next look is a day away
    assert _sweep_output() == "" and fakes["vast"].lists == 2


def test_the_sweep_gives_up_on_a_provider_that_does_not_answer_in_time(tmp_path: Path, fakes: Fakes) -> None:
    ledger = Ledger()
    _add_job(ledger, tmp_path, "j-hang", provider="vast")
    ledger.record_account_checked("runpod")
    fakes["vast"].list_gate = threading.Event()
    out = _sweep_output(seconds=0.2)
    assert "could not check vast (no answer within 0.2 s): instances there may still be billing" in out


def test_an_instance_its_provider_no_longer_has_is_recorded_ended(tmp_path: Path, fakes: Fakes) -> None:
    ledger = Ledger()
    _add_job(ledger, tmp_path, "j-gone", provider="vast")
    _sweep_output()
    record = ledger.instances("j-gone")[0]
    assert record.ended_at is not None and "gone when rentrain looked" in str(record.end_reason)
    assert "may still be billing" not in _sweep_output()


# ---------------------------------------------------------------------------------------------- stopped instances


def test_status_lists_a_stopped_instance_with_its_storage_cost_and_what_is_not_home(
    tmp_path: Path, fakes: Fakes
) -> None:
    ledger = Ledger()
    _add_job(ledger, tmp_path, "j-stopped", idle_days=2)
    fakes["vast"].add("11", "rentrain-j-stopped", status="stopped", storage=0.011)
    result = CliRunner().invoke(main, ["status"], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert "STOPPED: vast instance 11 (job j-stopped): its storage bills $0.0110/h ($1.85 a week)" in result.output
    assert "not fetched: the final LoRA (training had reached step 40 of 80)" in result.output
    assert "rentrain attach j-stopped" in result.output
    assert fakes["vast"].destroyed == [] and fakes["vast"].started == []  # status only looks


def test_a_stopped_instance_past_the_limit_whose_result_is_home_is_destroyed(tmp_path: Path, fakes: Fakes) -> None:
    ledger = Ledger()
    days = STOPPED_LIMIT_SECONDS / DAY
    _add_job(ledger, tmp_path, "j-old", provider="runpod", instance_id="21", result_home=True, idle_days=days + 1)
    _add_job(ledger, tmp_path, "j-young", provider="runpod", instance_id="22", result_home=True, idle_days=days - 1)
    fakes["runpod"].add("21", "rentrain-j-old", status="stopped", storage=0.011)
    fakes["runpod"].add("22", "rentrain-j-young", status="stopped", storage=0.011)
    out = _sweep_output()
    assert "STOPPED: runpod instance 22" in out
    assert fakes["runpod"].destroyed == ["21"]
    old = ledger.job("j-old")
    assert old.state == "closed" and old.outcome == "succeeded" and old.key_removed_at is not None
    assert ledger.job("j-young").is_open


def test_a_stopped_instance_past_the_limit_is_never_destroyed_with_its_results_unfetched(
    tmp_path: Path, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RENTRAIN_SSH_WAIT_SECONDS", "0.2")
    monkeypatch.setenv("RENTRAIN_POLL_SECONDS", "0.05")
    ledger = Ledger()
    _add_job(ledger, tmp_path, "j-stuck", idle_days=STOPPED_LIMIT_SECONDS / DAY + 1)
    fakes["vast"].add("11", "rentrain-j-stuck", status="stopped", storage=0.02)
    out = _sweep_output()
    assert "starting it, fetching them, then destroying it" in out
    assert "did not come back within 0 s and was stopped again" in out
    assert fakes["vast"].started == ["11"] and fakes["vast"].stopped == ["11"] and fakes["vast"].destroyed == []
    assert ledger.job("j-stuck").is_open and ledger.job("j-stuck").client_pid is None  # its lock was given back


# ---------------------------------------------------------------------------------------------- the client lock


def test_attach_and_fetch_refuse_while_another_live_client_follows(tmp_path: Path, fakes: Fakes) -> None:
    ledger = Ledger()
    other = os.getppid()  # alive, and not this process
    _add_job(ledger, tmp_path, "j-followed", client_pid=other)
    for command in ("attach", "fetch"):
        result = CliRunner().invoke(main, [command, "j-followed"], terminal_width=400)
        assert result.exit_code == 1, result.output
        assert f"followed by another rentrain client (PID {other} on {this_host()}" in result.output
    assert ledger.job("j-followed").client_pid == other
    assert fakes["vast"].created == [] and fakes["vast"].started == []


def test_down_asks_before_destroying_what_a_live_client_follows(tmp_path: Path, fakes: Fakes) -> None:
    ledger = Ledger()
    _add_job(ledger, tmp_path, "j-busy", client_pid=os.getppid())
    fakes["vast"].add("11", "rentrain-j-busy")
    result = CliRunner().invoke(main, ["down", "j-busy"], input="n\n", terminal_width=400)
    assert result.exit_code == 1
    assert f"followed by the rentrain client PID {os.getppid()} on {this_host()}" in result.output
    assert fakes["vast"].destroyed == []


def test_attach_on_a_closed_job_rents_nothing(tmp_path: Path, fakes: Fakes) -> None:
    ledger = Ledger()
    job = _add_job(ledger, tmp_path, "j-done", result_home=True)
    ledger.update_instance(job.id, "o1", job.created_at, ended_at=time.time(), end_reason="done")
    ledger.transition(job.id, "closed", outcome="succeeded")
    result = CliRunner().invoke(main, ["attach", "j-done"], terminal_width=400)
    assert result.exit_code == 1 and "never reopens it, and nothing was rented" in result.output
    assert fakes["vast"].created == [] and ledger.job("j-done").client_pid is None


# ---------------------------------------------------------------------------------------------- the RunPod key


def test_down_takes_the_job_key_off_the_account(tmp_path: Path, fakes: Fakes) -> None:
    ledger = Ledger()
    _add_job(ledger, tmp_path, "j-pod", provider="runpod", instance_id="31")
    fakes["runpod"].add("31", "rentrain-j-pod")
    result = CliRunner().invoke(main, ["down", "j-pod", "--yes"], terminal_width=400)
    assert result.exit_code == 0, result.output
    public_key = Path(os.environ["XDG_STATE_HOME"]) / "rentrain" / "jobs" / "j-pod" / "id_ed25519.pub"
    assert fakes["runpod"].forgotten == [public_key.read_text().strip()]
    assert ledger.job("j-pod").key_removed_at is not None


def test_the_next_start_removes_the_key_a_killed_client_left(tmp_path: Path, fakes: Fakes) -> None:
    ledger = Ledger()
    _add_job(ledger, tmp_path, "j-killed", provider="runpod", instance_id="41", client_pid=_dead_pid())
    fakes["runpod"].forget_error = ProviderDown("runpod", "HTTP 503")
    out = _sweep_output()  # the pod is gone (its watchdog ended it); the key removal fails this time
    assert "could not remove job j-killed's SSH key from the runpod account (HTTP 503)" in out
    assert ledger.job("j-killed").key_may_be_on_account
    fakes["runpod"].forget_error = None
    _sweep_output()
    assert len(fakes["runpod"].forgotten) == 1 and ledger.job("j-killed").key_removed_at is not None


def _runner(ledger: Ledger, job: JobRecord, provider: FakeProvider) -> JobRunner:
    loaded = load_config(Path(job.config_path))
    key = create_job_key(job.id + "-runner")
    view = RunProgress(Console(file=io.StringIO()))
    settings = RunSettings(provider="runpod")
    return JobRunner(ledger, job, loaded, provider, settings, key, view, lambda _text: None, sleep=lambda _s: None)


def test_a_confirmed_destroy_and_a_create_cut_short_both_remove_the_key(tmp_path: Path, fakes: Fakes) -> None:
    ledger = Ledger()
    done = _add_job(ledger, tmp_path, "j-end", provider="runpod", instance_id="51")
    runner = _runner(ledger, done, fakes["runpod"])
    runner.teardown.destroy_instance(ledger.instances(done.id)[0], "training done and results home")
    assert fakes["runpod"].forgotten == [runner.key.public_line] and ledger.job(done.id).key_removed_at is not None

    # a create that never answered, its create window long past
    cut = _add_job(ledger, tmp_path, "j-ctrl-c", provider="runpod", instance_id=None, state="creating", idle_days=1)
    runner = _runner(ledger, cut, fakes["runpod"])
    # create never answered
    runner.teardown.destroy_instance(ledger.instances(cut.id)[0], "stopped by the user (Ctrl-C)")
    assert fakes["runpod"].forgotten[-1] == runner.key.public_line and ledger.job(cut.id).key_removed_at is not None


def test_a_job_that_fails_without_any_instance_left_removes_the_key(tmp_path: Path, fakes: Fakes) -> None:
    ledger = Ledger()
    job = _add_job(ledger, tmp_path, "j-failed", provider="runpod", instance_id=None, state="creating")
    ledger.update_instance(job.id, "o1", job.created_at, ended_at=time.time(), end_reason="not created: no capacity")
    runner = _runner(ledger, ledger.job(job.id), fakes["runpod"])

    def no_offer_left() -> str:
        ledger.transition(job.id, "closed", "no instance could be started", outcome="failed")
        raise JobFailed("no instance could be started (1 offers tried)")

    with pytest.raises(SystemExit):
        _drive(runner, Console(file=io.StringIO()), no_offer_left)
    assert fakes["runpod"].forgotten == [runner.key.public_line] and ledger.job(job.id).key_removed_at is not None


def test_a_provider_without_a_key_where_the_ledger_has_an_instance_is_not_quiet(
    tmp_path: Path, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUNPOD_API_KEY")
    _add_job(Ledger(), tmp_path, "j-nokey", provider="runpod", instance_id="61")
    result = CliRunner().invoke(main, ["status"], terminal_width=400)
    assert result.exit_code == 1, result.output
    assert "could not check runpod (no API key found): instances there may still be billing" in result.output
