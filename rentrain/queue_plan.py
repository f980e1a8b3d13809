"""Planning a queue: which configs, which jobs share a rental, how the rentals are spread over hosts, and what
each job and the whole queue are estimated to take and cost.

Jobs share a rental when they train the same base model (same family, precision, image and offer
requirements): the instance, its packages and the downloaded model are paid for once. The shared part of the
setup (boot, packages, base model download) is split equally between the jobs of a rental; each job pays its
own training, dataset upload, latent cache and fetch (docs/overnight.md).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from remote.config import LoadedConfig
from rentrain.costs import SECONDS_PER_HOUR, JobEstimate, estimate_job, share_setup
from rentrain.history import JobHistory
from rentrain.job_profile import JobProfile, guess_model_family
from rentrain.offers import RankedOffer, requirements_from

QUEUE_FILE_SUFFIXES = (".txt", ".queue")
# The parts of the setup a rental pays once, whatever the number of jobs on it (rentrain.setup_time.PHASES).
SHARED_SETUP = ("image_pull", "bootstrap", "model_download", "teardown")


class QueueInputError(Exception):
    """An argument that names no config: a missing path, an empty folder, a bad line in a queue file."""


def expand_configs(arguments: Sequence[Path]) -> list[Path]:
    """The configs the arguments name, in order: a config file; a folder (its *.toml files, sorted by name); or a
    queue file (.txt/.queue: one config path per line, relative to the file; blank lines and # comments skipped)."""
    configs: list[Path] = []
    for argument in arguments:
        if argument.is_dir():
            found = sorted(argument.glob("*.toml"))
            if not found:
                raise QueueInputError(f"{argument}: a folder with no .toml config in it")
            configs += found
        elif argument.suffix in QUEUE_FILE_SUFFIXES and argument.is_file():
            configs += _read_queue_file(argument)
        else:
            configs.append(argument)  # a config file; `check` says what is wrong with it, if anything
    resolved = [p.resolve() for p in configs]
    duplicates = sorted({str(p) for p, r in zip(configs, resolved, strict=True) if resolved.count(r) > 1})
    if duplicates:
        raise QueueInputError(f"the queue names {', '.join(duplicates)} more than once")
    return configs


def _read_queue_file(path: Path) -> list[Path]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QueueInputError(f"{path}: cannot read the queue file ({exc})") from None
    configs = []
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        config = (path.parent / line).resolve() if not Path(line).is_absolute() else Path(line)
        if not config.is_file():
            raise QueueInputError(f"{path}, line {number}: no config file {line!r}")
        configs.append(config)
    if not configs:
        raise QueueInputError(f"{path}: the queue file lists no config")
    return configs


def output_clashes(configs: Sequence[LoadedConfig]) -> list[str]:
    """Two jobs that would write the same files (output_dir and output_name): one would overwrite the other."""
    seen: dict[tuple[Path, str], Path] = {}
    clashes = []
    for loaded in configs:
        train = loaded.train
        key = (train.output_dir.resolve(), train.output_name or "")
        if key in seen:
            clashes.append(
                f"{seen[key]} and {loaded.path} both write {train.output_name or 'last'}.safetensors into "
                f"{train.output_dir}: give one another output_dir or output_name"
            )
        else:
            seen[key] = loaded.path
    return clashes


def rental_key(loaded: LoadedConfig, gpus: int) -> str:
    """What jobs must have in common to run one after another on one rental."""
    train, job = loaded.train, loaded.job
    requirements = requirements_from(job, gpu_count=gpus).model_dump(mode="json", exclude={"disk_gb"})
    family = guess_model_family(train)
    # the model folder a rental keeps holds Flux.1's separate files too
    model_files = [train.pretrained_model_name_or_path, train.ae, train.clip_l, train.t5xxl]
    shared = [model_files, family, train.mixed_precision, job.image, requirements]
    return json.dumps(shared, sort_keys=True)


def plan_lanes(keys: Sequence[str], hours: Sequence[float], parallel: int) -> list[list[int]]:
    """Spread jobs (by index) over lanes, one rental each, that work through their jobs in turn.

    Jobs of one rental key only share a lane. Each key gets one lane; while fewer than `parallel` lanes exist,
    the key whose busiest lane is longest (and has jobs to spare) gets another. Within a key, jobs go longest
    first to the lane with the least work so far; a lane then works through its jobs in the order given. Lanes
    come out longest first."""
    by_key: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        by_key.setdefault(key, []).append(index)
    lanes_of = dict.fromkeys(by_key, 1)

    def spread(key: str) -> list[list[int]]:
        # (work, jobs so far, lane number, jobs): equal work (jobs with no estimate count 0 h) goes by job count
        lanes: list[tuple[float, int, int, list[int]]] = [(0.0, 0, n, []) for n in range(lanes_of[key])]
        for index in sorted(by_key[key], key=lambda i: (-hours[i], i)):
            load, count, n, jobs = heapq.heappop(lanes)
            heapq.heappush(lanes, (load + hours[index], count + 1, n, [*jobs, index]))
        return [sorted(jobs) for _load, _count, _n, jobs in sorted(lanes, key=lambda lane: lane[2]) if jobs]

    while sum(lanes_of.values()) < parallel:
        spare = [k for k in by_key if lanes_of[k] < len(by_key[k])]
        if not spare:
            break
        busiest = max(spare, key=lambda k: max(sum(hours[i] for i in lane) for lane in spread(k)))
        lanes_of[busiest] += 1
    lanes = [lane for key in by_key for lane in spread(key)]
    return sorted(lanes, key=lambda lane: -sum(hours[i] for i in lane))


def shares_on(
    profiles: Sequence[JobProfile], ranked: RankedOffer, history: JobHistory | None = None
) -> list[JobEstimate] | None:
    """Each job's estimate on one rental of this offer, the shared setup split equally between them; None when
    a job's speed on the offer is unknown or it does not fit."""
    offer = ranked.offer
    alone = [estimate_job(profile, offer, history) for profile in profiles]
    if any(estimate is None for estimate in alone):
        return None
    return [share_setup(estimate, offer, SHARED_SETUP, len(profiles)) for estimate in alone if estimate is not None]


class LanePlan(BaseModel):
    """One rental and the jobs (queue positions) it works through, with the offers to try in order."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    jobs: list[int]
    offers: list[RankedOffer]
    estimates: list[JobEstimate | None]  # per job of the lane, on offers[0]

    @property
    def hours(self) -> float:
        return sum(e.total_hours for e in self.estimates if e is not None)

    @property
    def cost(self) -> float:
        return sum(e.cost_usd for e in self.estimates if e is not None)


def rank_for_lane(
    profiles: Sequence[JobProfile], ranked: Sequence[RankedOffer], history: JobHistory | None = None
) -> list[RankedOffer]:
    """The offers by the lane's total estimated cost (all its jobs on one rental); offers it cannot use last."""

    def total(offer: RankedOffer) -> float:
        shares = shares_on(profiles, offer, history)
        return sum(s.cost_usd for s in shares) if shares is not None else float("inf")

    return sorted(ranked, key=total)


def finish_time(lanes: Sequence[LanePlan], parallel: int, start: float) -> float:
    """When the last lane ends if lanes start longest first as soon as one of `parallel` hosts is free."""
    free = [start] * max(1, min(parallel, len(lanes)))
    heapq.heapify(free)
    end = start
    for lane in lanes:
        begin = heapq.heappop(free)
        done = begin + lane.hours * SECONDS_PER_HOUR
        end = max(end, done)
        heapq.heappush(free, done)
    return end
