"""Several GPUs on the client's side: the launch command (remote and local), the GPU count kept with the
job and each instance, and `--provider local --gpus N` against this machine's devices.

No multi-process training runs here (the trainer's DDP side is tested with the trainer): the commands are
built, run with a stand-in Python that records what it was given, and compared."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from providers.base import Offer, OfferGone, ProviderInfo, Requirements
from remote.config import load_config
from remote.events import DoneEvent
from rentrain import local_run
from rentrain.cli import main
from rentrain.commands import jobs as jobs_command
from rentrain.commands import run as run_command
from rentrain.job import JobRunner, RunSettings, Session
from rentrain.ledger import InstanceRecord, JobRecord, Ledger
from rentrain.multigpu import GpuCountError, local_gpus_note, trainer_argv
from rentrain.progress import RunProgress
from rentrain.remote_job import RemoteLayout, bootstrap_command, trainer_command
from rentrain.sshkeys import JobKey

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny" / "config.toml"
BOOTSTRAP = REPO / "remote" / "bootstrap.sh"
LAUNCH_2 = [
    "-m", "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes", "2",
    "--num_machines", "1",
    "--mixed_precision", "no",
    "--dynamo_backend", "no",
]  # fmt: skip
HOSTILE = 'it\'s a "job" $(touch pwned); `x` & more'


# ------------------------------------------------------------------------------------------ the launch command


def test_one_gpu_runs_the_trainer_module_as_before() -> None:
    layout = RemoteLayout(root="/w/rentrain/j1")
    command = trainer_command(layout, "/usr/bin/python3", None, 1)
    assert "accelerate" not in command
    assert "exec /usr/bin/python3 -m remote.trainer /w/rentrain/j1/config.toml > /dev/null" in command
    assert trainer_argv("python3", "c.toml", "s", 1) == ["python3", "-m", "remote.trainer", "c.toml", "--resume", "s"]


def test_several_gpus_run_under_accelerate_launch() -> None:
    argv = trainer_argv("python3", "/j/config.toml", "/j/output/state", 2)
    assert argv == ["python3", *LAUNCH_2, "-m", "remote.trainer", "/j/config.toml", "--resume", "/j/output/state"]
    with pytest.raises(GpuCountError, match="1 to 8 GPUs"):
        trainer_argv("python3", "/j/config.toml", None, 9)


def _stand_in_python(folder: Path, record: Path) -> Path:
    """An executable that writes its arguments, folder and PYTHONPATH to `record`, as a Python would start."""
    folder.mkdir(parents=True)
    script = folder / "python 3"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps({{'argv': sys.argv[1:], 'cwd': os.getcwd(), "
        "'pythonpath': os.environ.get('PYTHONPATH')}))\n"
    )
    script.chmod(0o755)
    return script


def test_the_remote_command_is_quoted_for_hostile_paths(tmp_path: Path) -> None:
    root = tmp_path / HOSTILE / "rentrain" / "job 1"
    root.mkdir(parents=True)
    record = tmp_path / "argv.json"
    python = _stand_in_python(tmp_path / "bin dir", record)
    layout = RemoteLayout(root=str(root))
    resume = f"{layout.output}/state '000002'"
    command = trainer_command(layout, str(python), resume, 2)
    completed = subprocess.run(
        ["sh", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False
    )
    assert completed.returncode == 0, completed.stderr
    deadline = time.time() + 20
    while not record.exists() and time.time() < deadline:
        time.sleep(0.05)
    started = json.loads(record.read_text())
    assert started["argv"] == [*LAUNCH_2, "-m", "remote.trainer", layout.config, "--resume", resume]
    assert started["cwd"] == str(root)
    assert started["pythonpath"] == layout.payload
    assert (root / "trainer.pid").read_text().strip().isdigit()
    assert not (tmp_path / "pwned").exists() and not (root / "pwned").exists()


def test_bootstrap_is_told_the_gpu_count() -> None:
    layout = RemoteLayout(root="/w/rentrain/j 1")
    tokens = _shell_tokens(bootstrap_command(layout, "org/model name", 4))
    inner = _shell_tokens(tokens[tokens.index("-c") + 1])
    assert inner[: inner.index(";")] == [
        "bash",
        "/w/rentrain/j 1/payload/remote/bootstrap.sh",
        "/w/rentrain/j 1",
        "org/model name",
        "4",
    ]


def _shell_tokens(command: str) -> list[str]:
    return list(shlex.shlex(command, posix=True, punctuation_chars=True))


# ------------------------------------------------------------------------------------------ bootstrap's GPU check


def _fake_torch(folder: Path, devices: int) -> Path:
    """A torch stand-in with CUDA and `devices` GPUs, enough for bootstrap's gpu phase."""
    package = folder / "torch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from types import SimpleNamespace\n"
        "__version__ = '0.0-fake'\n"
        "version = SimpleNamespace(cuda='12.4')\n"
        f"cuda = SimpleNamespace(is_available=lambda: True, device_count=lambda: {devices},\n"
        "    get_device_properties=lambda i: SimpleNamespace(name='Fake GPU', total_memory=24 * 2**30))\n"
        "class _T:\n"
        "    def add_(self, x): return self\n"
        "def zeros(*shape, device=None):\n"
        f"    assert int(str(device).split(':')[1]) < {devices}\n"
        "    return _T()\n"
    )
    return folder


def _bootstrap(job_dir: Path, gpus: str, torch_dir: Path | None, allow_cpu: bool = False) -> list[dict[str, object]]:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": os.environ["HOME"]}
    if torch_dir is not None:
        env["PYTHONPATH"] = str(torch_dir)
    if allow_cpu:
        env["RENTRAIN_ALLOW_CPU"] = "1"
    subprocess.run(
        ["bash", str(BOOTSTRAP), str(job_dir), "", gpus], env=env, capture_output=True, text=True, check=False
    )
    return [json.loads(line) for line in (job_dir / "bootstrap.jsonl").read_text().splitlines()]


def test_a_host_with_fewer_gpus_than_the_job_fails_the_gpu_phase(tmp_path: Path) -> None:
    torch_dir = _fake_torch(tmp_path / "fake", devices=1)
    short = _bootstrap(tmp_path / "short", "2", torch_dir)[-1]
    assert short["name"] == "gpu" and short["ok"] is False
    assert "torch sees 1 GPU(s), the job needs 2" in str(short["detail"])
    enough = _bootstrap(tmp_path / "enough", "1", torch_dir)[-1]
    assert enough["ok"] is True and "1 x Fake GPU" in str(enough["detail"])


def test_a_cpu_host_allowed_for_tests_runs_n_processes(tmp_path: Path) -> None:
    gpu = _bootstrap(tmp_path, "2", None, allow_cpu=True)[-1]
    assert gpu["ok"] is True and "2 CPU processes" in str(gpu["detail"])


# ------------------------------------------------------------------------------------------ the GPU count is kept


def _record(**kw: object) -> InstanceRecord:
    base: dict[str, object] = dict(
        job_id="j1",
        provider="vast",
        instance_id="1",
        offer_id="o1",
        gpu="2x RTX 4090",
        usd_per_hour=0.8,
        created_at=1000.0,
    )
    return InstanceRecord(**{**base, **kw})  # type: ignore[arg-type]


def _job(settings: RunSettings, config: Path = EXAMPLE) -> JobRecord:
    return JobRecord(
        id="j1",
        created_at=time.time(),
        config_path=str(config),
        provider="vast",
        label="rentrain-j1",
        state="planned",
        output_dir="/out",
        settings_json=settings.model_dump_json(),
    )


def test_the_ledger_keeps_each_instances_gpu_count(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.create_job(_job(RunSettings(provider="vast", gpus=2)))
    ledger.add_instance(_record(gpu_count=2))
    reopened = Ledger(tmp_path / "l.sqlite3")
    assert reopened.instances("j1")[0].gpu_count == 2
    assert RunSettings.model_validate_json(reopened.job("j1").settings_json).gpus == 2
    assert Session(record=reopened.instances("j1")[0], remote=None, layout=RemoteLayout(root="/r")).gpus == 2  # type: ignore[arg-type]


def test_a_ledger_from_before_gets_the_column_with_one_gpu(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old_schema = Ledger(tmp_path / "new.sqlite3")  # take today's schema and drop the new column from it
    db = sqlite3.connect(path)
    for (sql,) in sqlite3.connect(old_schema.path).execute("SELECT sql FROM sqlite_master WHERE type = 'table'"):
        db.execute(sql.replace("    gpu_count INTEGER NOT NULL DEFAULT 1,\n", ""))
    db.execute(
        "INSERT INTO instances (job_id, provider, offer_id, gpu, usd_per_hour, created_at) "
        "VALUES ('j1', 'vast', 'o', 'RTX 4090', 0.4, 1.0)"
    )
    db.commit()
    db.close()
    assert "gpu_count" not in [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(instances)")]
    ledger = Ledger(path)
    Ledger(path)  # a second open adds nothing twice
    assert ledger.instances("j1")[0].gpu_count == 1
    assert RunSettings.model_validate_json('{"provider": "vast"}').gpus == 1  # a job recorded before --gpus


class _GoneProvider:
    info = ProviderInfo(name="vast", display_name="Vast.ai")

    def __init__(self) -> None:
        self.searched: list[Requirements] = []

    def create(self, offer: Offer, launch: object) -> object:
        raise OfferGone("vast", "taken")

    def search(self, requirements: Requirements) -> list[Offer]:
        self.searched.append(requirements)
        return []


def _runner(tmp_path: Path, settings: RunSettings, provider: _GoneProvider) -> JobRunner:
    ledger = Ledger(tmp_path / "l.sqlite3")
    job = _job(settings)
    ledger.create_job(job)
    view = RunProgress(Console(file=io.StringIO()))
    key = JobKey(private_path=tmp_path / "key", public_line="ssh-ed25519 AAAA test")
    return JobRunner(ledger, job, load_config(EXAMPLE), provider, settings, key, view, lambda _text: None)  # type: ignore[arg-type]


def test_an_instance_is_recorded_with_its_offers_gpu_count_before_create(tmp_path: Path) -> None:
    runner = _runner(tmp_path, RunSettings(provider="vast", gpus=4), _GoneProvider())
    offer = Offer(
        provider="vast",
        offer_id="7",
        gpu_model="RTX 4090",
        gpu_name_raw="RTX 4090",
        gpu_count=4,
        vram_gb=24,
        price_per_hour=1.6,
    )
    assert runner.provisioner.provision(offer) is None
    [record] = runner.ledger.instances("j1")
    assert (record.gpu_count, record.gpu, record.usd_per_hour) == (4, "4x RTX 4090", 1.6)


def test_attach_looks_for_replacements_with_the_jobs_gpu_count(tmp_path: Path) -> None:
    provider = _GoneProvider()
    runner = _runner(tmp_path, RunSettings(provider="vast", gpus=2), provider)
    assert runner.loaded.job.gpu_count == 1  # the config says one; the job was started with --gpus 2
    assert jobs_command._fresh_offers(runner) == []
    assert [r.gpu_count for r in provider.searched] == [2]


# ------------------------------------------------------------------------------------------ --provider local


def test_local_note_refuses_more_gpus_than_cuda_devices_and_explains_cpu_processes() -> None:
    with pytest.raises(GpuCountError, match="this machine has 2 CUDA devices; use --gpus 2 or fewer"):
        local_gpus_note(4, cuda_devices=2)
    assert local_gpus_note(2, cuda_devices=2) is None
    assert local_gpus_note(1, cuda_devices=0) is None
    note = local_gpus_note(3, cuda_devices=0)
    assert note is not None and "runs 3 CPU processes" in note


def test_local_run_starts_the_accelerate_command_for_several_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[list[str]] = []

    class FakeChild:
        def __init__(self, command: list[str], **_kw: object) -> None:
            started.append(command)
            self.stdout = iter(())

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr(local_run.subprocess, "Popen", FakeChild)
    view = RunProgress(Console(file=io.StringIO()))
    config, state = tmp_path / "my config.toml", tmp_path / "state 1"
    assert local_run.run_trainer(config, tmp_path / "out", view, state, gpus=2) == 0
    assert local_run.run_trainer(config, tmp_path / "out", view, None) == 0
    assert started == [
        [sys.executable, *LAUNCH_2, "-m", "remote.trainer", str(config), "--resume", str(state)],
        [sys.executable, "-m", "remote.trainer", str(config)],
    ]


def _local_config(tmp_path: Path) -> Path:
    shutil.copytree(EXAMPLE.parent / "dataset", tmp_path / "dataset")
    path = tmp_path / "config.toml"
    path.write_text(EXAMPLE.read_text())
    return path


def test_run_local_refuses_more_gpus_than_this_machine_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_command, "local_cuda_devices", lambda: 1)
    monkeypatch.setattr(run_command, "run_trainer", lambda *a, **k: pytest.fail("nothing may start"))
    result = CliRunner().invoke(main, ["run", str(_local_config(tmp_path)), "--provider", "local", "--gpus", "2"])
    assert result.exit_code == 1
    assert "--gpus 2: this machine has 1 CUDA device; use --gpus 1 or fewer" in result.output


def test_run_local_on_a_cpu_runs_n_processes_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_trainer(config: Path, output: Path, view: RunProgress, resume: Path | None, gpus: int) -> int:
        calls.append(gpus)
        view.handle(
            DoneEvent(path=str(output / "tiny_toy.safetensors"), sha256="0" * 64, step=100, epoch=2, wall_seconds=1.0)
        )
        return 0

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(run_command, "local_cuda_devices", lambda: 0)
    monkeypatch.setattr(run_command, "run_trainer", fake_trainer)
    result = CliRunner().invoke(main, ["run", str(_local_config(tmp_path)), "--provider", "local", "--gpus", "2"])
    assert result.exit_code == 0, result.output
    assert calls == [2]
    text = " ".join(result.output.split())
    assert "100 steps (2 epochs of 50)" in text  # 100 batches per epoch over 2 ranks
    assert "each step trains 2 x batch 2 = 4 images" in text
    assert "runs 2 CPU processes" in text
