"""A three-job queue on one rental against the same three jobs as three separate runs, on the simulated market.

    python bench/queue_vs_separate.py [--boot-seconds S] [--price USD_PER_HOUR] [--workdir DIR]

The three jobs are the bundled example (examples/tiny/config.toml, unchanged) with its 20 images dealt round
robin into three datasets (7, 7 and 6 images). Each scenario gets a fresh simulated Vast market with one offer
at --price and fresh home folders (so a fresh ledger per command):

    queue     `rentrain run a.toml b.toml c.toml --provider vast --yes`
    separate  `rentrain run a.toml --provider vast --yes`, then b, then c, one after another, each with its
              own home folder

The simulator's instances come up --boot-seconds after the create (state "loading", unreachable, billing
meanwhile) and find every package installed, so --boot-seconds stands in for the whole per-rental setup of
a real host (boot, image pull, package installs, base model download), which takes minutes there.

Prints one Markdown table per scenario pair: rentals, bootstrap runs, billed seconds and dollars (the
simulator's and the ledger's), wall-clock seconds; then each queued job's cost as the ledger attributes it and
with the rentals' boot time split equally between the queue's jobs (the rule rentrain/queue_plan.py states).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.conftest import Client, started_market  # noqa: E402
from tests.sim.provider_sim import ProviderSimulator, SimOffer  # noqa: E402

EXAMPLE = REPO / "examples" / "tiny"
JOB_NAMES = ("a", "b", "c")
COMMAND_TIMEOUT_SECONDS = 600


@dataclass
class JobShare:
    name: str
    ledger_seconds: float
    boot_seconds: float  # the part of ledger_seconds before its instance answered as running
    usd_per_hour: float


@dataclass
class Outcome:
    scenario: str
    commands: int
    rentals: int
    bootstraps: int
    packages: list[str]  # each bootstrap's packages phase: what it found
    bootstrap_seconds: float  # all bootstrap runs' phases together
    billed_seconds: float
    simulator_usd: float
    ledger_usd: float
    wall_seconds: float
    jobs: list[JobShare]


def write_jobs(folder: Path) -> list[Path]:
    """The bundled example's config three times, each with every third of its images (and captions)."""
    images = sorted((EXAMPLE / "dataset" / "10_toy").glob("*.png"))
    configs = []
    for index, name in enumerate(JOB_NAMES):
        subset = folder / name / "dataset" / "10_toy"
        subset.mkdir(parents=True)
        for image in images[index :: len(JOB_NAMES)]:
            shutil.copy(image, subset / image.name)
            shutil.copy(image.with_suffix(".txt"), subset / image.with_suffix(".txt").name)
        config = folder / name / "config.toml"
        shutil.copy(EXAMPLE / "config.toml", config)
        configs.append(config)
    return configs


def run_commands(folder: Path, market: ProviderSimulator, groups: list[list[Path]], boot: float) -> list[Client]:
    """`rentrain run GROUP --provider vast --yes` for each group in turn, each with a fresh home folder."""
    clients = []
    for index, group in enumerate(groups):
        home = folder / f"home-{index}"
        home.mkdir()
        client = Client(home, market)
        client.env["RENTRAIN_SSH_WAIT_SECONDS"] = str(boot + 60)  # the e2e tests' 15 s is shorter than a slow boot
        result = client.run("run", *map(str, group), "--provider", "vast", "--yes", timeout=COMMAND_TIMEOUT_SECONDS)
        if result.returncode != 0:
            raise SystemExit(
                f"rentrain run {' '.join(map(str, group))} exited {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        clients.append(client)
    return clients


def bootstrap_phases(market: ProviderSimulator) -> list[dict[str, object]]:
    """Every phase that the bootstrap runs on the market's instances reported (one bootstrap.jsonl per job)."""
    return [
        json.loads(line)
        for log in sorted(market.root.rglob("bootstrap.jsonl"))
        for line in log.read_text().splitlines()
        if line.strip()
    ]


def job_shares(clients: list[Client]) -> list[JobShare]:
    """Each job's instance time as its ledger records it, in the order the jobs ran."""
    runs: list[tuple[float, JobShare]] = []
    for client in clients:
        records = [r for r in client.instances() if r["instance_id"]]
        for job in client.jobs():
            own = [r for r in records if r["job_id"] == job["id"]]
            seconds = [tuple(float(str(r[key])) for key in ("created_at", "running_at", "ended_at")) for r in own]
            share = JobShare(
                name=Path(str(job["config_path"])).parent.name,
                ledger_seconds=sum(ended - created for created, _, ended in seconds),
                boot_seconds=sum(running - created for created, running, _ in seconds),
                usd_per_hour=float(str(own[0]["usd_per_hour"])),
            )
            runs.append((min(created for created, _, _ in seconds), share))
    return [share for _, share in sorted(runs, key=lambda run: run[0])]


def run_scenario(folder: Path, queued: bool, boot: float, price: float) -> Outcome:
    configs = write_jobs(folder / "jobs")
    market = started_market(folder / "market", [SimOffer("vast", "7001", "RTX 4090", price)])
    market.boot_seconds = boot  # read at each create
    try:
        started = time.perf_counter()
        clients = run_commands(folder, market, [configs] if queued else [[c] for c in configs], boot)
        wall = time.perf_counter() - started
        if market.live_instances():
            raise SystemExit(f"still billing after the runs: {[i.id for i in market.live_instances()]}")
        instances = list(market.instances.values())
        phases = bootstrap_phases(market)
        return Outcome(
            scenario="queue (one command)" if queued else "separate (three commands)",
            commands=len(clients),
            rentals=len(instances),
            bootstraps=len(list(market.root.rglob("bootstrap.jsonl"))),
            packages=[str(p["detail"]) for p in phases if p["name"] == "packages"],
            bootstrap_seconds=sum(float(str(p["seconds"])) for p in phases),
            billed_seconds=sum(float(i.ended_at or 0) - i.created_at for i in instances),
            simulator_usd=market.total_billed(),
            ledger_usd=sum(c.ledger_cost() for c in clients),
            wall_seconds=wall,
            jobs=job_shares(clients),
        )
    finally:
        market.shutdown()


def print_tables(outcomes: list[Outcome], boot: float, price: float) -> None:
    print(f"\nboot {boot:g} s, ${price:.2f}/h\n")
    print(
        "| scenario | commands | rentals (boots) | bootstrap runs | bootstrap s | billed s | simulator $ | ledger $ "
        "| wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for o in outcomes:
        print(
            f"| {o.scenario} | {o.commands} | {o.rentals} | {o.bootstraps} | {o.bootstrap_seconds:.1f} | "
            f"{o.billed_seconds:.1f} | "
            f"{o.simulator_usd:.5f} | {o.ledger_usd:.5f} | {o.wall_seconds:.1f} |"
        )
    for o in outcomes:
        print(f"\n{o.scenario}: bootstrap packages phase found: {'; '.join(o.packages)}")
    queue = outcomes[0]
    shared_boot = sum(j.boot_seconds for j in queue.jobs) / len(queue.jobs)
    print("\n| queued job (run order) | ledger s | ledger $ | boot s in it | boot shared: s | boot shared: $ |")
    print("|---|---|---|---|---|---|")
    for j in queue.jobs:
        split = j.ledger_seconds - j.boot_seconds + shared_boot
        print(
            f"| {j.name} | {j.ledger_seconds:.1f} | {j.ledger_seconds * j.usd_per_hour / 3600:.5f} | "
            f"{j.boot_seconds:.1f} | {split:.1f} | {split * j.usd_per_hour / 3600:.5f} |"
        )
    print("\n| separate job | ledger s | ledger $ | boot s in it |")
    print("|---|---|---|---|")
    for j in outcomes[1].jobs:
        usd = j.ledger_seconds * j.usd_per_hour / 3600
        print(f"| {j.name} | {j.ledger_seconds:.1f} | {usd:.5f} | {j.boot_seconds:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boot-seconds", type=float, default=0.0, help="create to SSH-reachable, per rental")
    parser.add_argument("--price", type=float, default=0.40, help="the offer's $/h (the e2e market's cheapest)")
    parser.add_argument("--workdir", type=Path, help="keep the jobs, homes and instances here (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rentrain-queue-bench-"))
    outcomes = [
        run_scenario(workdir / name, queued, args.boot_seconds, args.price)
        for name, queued in (("queue", True), ("separate", False))
    ]
    print_tables(outcomes, args.boot_seconds, args.price)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
