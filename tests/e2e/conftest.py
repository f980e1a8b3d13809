"""End-to-end fixtures: a simulated market, a tiny job, and `rentrain` run as a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rentrain.ledger import Ledger
from tests.sim.provider_sim import RUNPOD_KEY, VAST_KEY, ProviderSimulator, SimInstance, SimOffer, wait_until

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_IMAGES = REPO / "examples" / "tiny" / "dataset" / "10_toy"

JOB_CONFIG = """
[model]
pretrained_model_name_or_path = "builtin:tiny-sd15"

[dataset]
train_data_dir = "dataset"
resolution = 64
batch_size = 2
caption_extension = ".txt"

[training]
output_dir = "output"
output_name = "e2e"
max_train_epochs = {epochs}
learning_rate = 1e-3
lr_scheduler = "constant"
network_dim = 4
network_alpha = 2
optimizer_type = "AdamW"
save_every_n_epochs = 1
seed = 7

[sample]
sample_prompts = ["rtoy, a red circle"]
sample_steps = 2
sample_seeds = [1]
sample_weights = [1.0]
"""


def write_job(folder: Path, images: int = 4, repeats: int = 1, epochs: int = 2) -> Path:
    """A job small enough for CPU: `images` x `repeats` / batch 2 steps per epoch."""
    subset = folder / "dataset" / f"{repeats}_toy"
    subset.mkdir(parents=True)
    for image in sorted(EXAMPLE_IMAGES.glob("*.png"))[:images]:
        shutil.copy(image, subset / image.name)
        shutil.copy(image.with_suffix(".txt"), subset / image.with_suffix(".txt").name)
    config = folder / "config.toml"
    config.write_text(JOB_CONFIG.format(epochs=epochs))
    return config


def started_market(folder: Path, offers: list[SimOffer], boot_seconds: float = 0.3) -> ProviderSimulator:
    """A simulated market of these offers whose instances' "image" is a Python with torch and the trainer's
    packages, on a CPU the trainer may use; each boots in `boot_seconds`. Shut it down when done."""
    venv_bin = str(Path(sys.executable).parent)
    simulator = ProviderSimulator(
        folder,
        offers,
        instance_env={
            "PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
            "RENTRAIN_PYTHON": sys.executable,
            "RENTRAIN_ALLOW_CPU": "1",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        },
        boot_seconds=boot_seconds,
    )
    simulator.start()
    return simulator


@pytest.fixture
def market(tmp_path: Path) -> Iterator[ProviderSimulator]:
    simulator = started_market(
        tmp_path / "market",
        [
            SimOffer("vast", "7001", "RTX 4090", 0.40),
            SimOffer("vast", "7002", "RTX 4090", 0.45),
            SimOffer("vast", "7003", "RTX 4090", 0.50),
            SimOffer("runpod", "NVIDIA GeForce RTX 4090", "RTX 4090", 0.34),
        ],
    )
    yield simulator
    simulator.shutdown()


def _interruptible() -> None:
    """Ctrl-C's default action for the client, as a terminal gives it. A shell that runs the tests in the background
    (`pytest &` without job control) starts them with SIGINT ignored, which its children would inherit; Python then
    installs no KeyboardInterrupt handler and the Ctrl-C tests see the signal do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Client:
    """`python -m rentrain` with this test's home folder and the simulator's URLs and keys."""

    def __init__(self, home: Path, market: ProviderSimulator):
        self.home = home
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_STATE_HOME": str(home / ".local" / "state"),
            "RENTRAIN_VAST_URL": market.vast_url,
            "RENTRAIN_RUNPOD_URL": market.runpod_url,
            "VAST_API_KEY": VAST_KEY,
            "RUNPOD_API_KEY": RUNPOD_KEY,
            "RENTRAIN_POLL_SECONDS": "0.3",
            "RENTRAIN_SSH_WAIT_SECONDS": "15",
            "RENTRAIN_SSH_LOST_SECONDS": "8",
            "RENTRAIN_WATCHDOG_POLL_SECONDS": "0.5",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "200",
        }

    def run(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rentrain", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "rentrain", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_interruptible,
        )

    @property
    def ledger_path(self) -> Path:
        return self.home / ".local" / "state" / "rentrain" / "ledger.sqlite3"

    def jobs(self) -> list[dict[str, object]]:
        with sqlite3.connect(self.ledger_path) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM jobs ORDER BY created_at")]

    def instances(self) -> list[dict[str, object]]:
        with sqlite3.connect(self.ledger_path) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM instances ORDER BY created_at")]

    def ledger_cost(self) -> float:
        """What the ledger counts for all its jobs together (rentrain.ledger InstanceRecord.cost)."""
        return sum(record.cost() for record in Ledger(self.ledger_path).instances())


@pytest.fixture
def client(tmp_path: Path, market: ProviderSimulator) -> Client:
    home = tmp_path / "home"
    home.mkdir()
    return Client(home, market)


def events_of(output: Path) -> list[dict[str, object]]:
    path = output / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_until_the_watchdog_stops_it(
    tmp_path: Path, market: ProviderSimulator, client: Client
) -> tuple[Path, SimInstance]:
    """A detached job with a near-zero idle timeout: it trains, nobody fetches, and its watchdog stops the
    instance to keep the results. Returns the job's config and its stopped instance."""
    config = write_job(tmp_path / "job")
    result = client.run("run", str(config), "--provider", "vast", "--yes", "--detach", "--idle-timeout", "0.02")
    assert result.returncode == 0, result.stdout + result.stderr
    instance = next(iter(market.instances.values()))
    assert wait_until(lambda: instance.state == "stopped", timeout=90), instance.state
    return config, instance
