"""Planning a queue (rentrain.queue_plan), the --deadline option type, the queue's budget meter, and the client
lock over a queue's jobs: no network, no SSH."""

from __future__ import annotations

import datetime
import os
import random
import time
from pathlib import Path

import click
import pytest

from providers.base import Offer
from remote.config import LoadedConfig, load_config
from rentrain.cli_types import ClockTime
from rentrain.costs import SECONDS_PER_HOUR, JobEstimate, estimate_job
from rentrain.job_phases.context import budget_reached, deadline_reached
from rentrain.job_profile import JobProfile
from rentrain.ledger import ClientLock, InstanceRecord, JobRecord, Ledger, LockHeld, QueueRecord, this_host
from rentrain.offers import RankedOffer
from rentrain.queue_plan import (
    SHARED_SETUP,
    LanePlan,
    QueueInputError,
    expand_configs,
    finish_time,
    output_clashes,
    plan_lanes,
    rank_for_lane,
    rental_key,
    shares_on,
)

SD15 = "runwayml/stable-diffusion-v1-5"


def _write_config(
    path: Path,
    model: str = SD15,
    precision: str = "fp16",
    output_dir: str = "out",
    output_name: str | None = None,
    rentrain: str = "",
    learning_rate: float = 1e-4,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    name = f'output_name = "{output_name}"\n' if output_name else ""
    path.write_text(
        f'[model]\npretrained_model_name_or_path = "{model}"\n'
        '[dataset]\ntrain_data_dir = "dataset"\n'
        f'[training]\noutput_dir = "{output_dir}"\n{name}max_train_epochs = 1\nlearning_rate = {learning_rate}\n'
        f'mixed_precision = "{precision}"\n'
        f"[rentrain]\n{rentrain}\n"
    )
    return path


def _loaded(path: Path, **settings: object) -> LoadedConfig:
    return load_config(_write_config(path, **settings))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- expand_configs


def test_config_files_are_taken_as_given_in_order(tmp_path: Path) -> None:
    b, a = tmp_path / "b.toml", tmp_path / "a.toml"
    assert expand_configs([b, a]) == [b, a]


def test_a_folder_gives_its_toml_files_sorted_by_name(tmp_path: Path) -> None:
    for name in ("c.toml", "a.toml", "b.toml", "notes.txt", "README.md"):
        (tmp_path / "jobs" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "jobs" / name).write_text("")
    (tmp_path / "jobs" / "sub").mkdir()
    (tmp_path / "jobs" / "sub" / "deeper.toml").write_text("")
    later = tmp_path / "later.toml"
    assert expand_configs([tmp_path / "jobs", later]) == [
        tmp_path / "jobs" / "a.toml",
        tmp_path / "jobs" / "b.toml",
        tmp_path / "jobs" / "c.toml",
        later,
    ]


def test_a_queue_file_lists_configs_relative_to_itself_skipping_comments_and_blank_lines(tmp_path: Path) -> None:
    first = _write_config(tmp_path / "queue" / "a" / "config.toml")
    second = _write_config(tmp_path / "elsewhere" / "b.toml")
    third = _write_config(tmp_path / "c.toml")
    queue = tmp_path / "queue" / "tonight.txt"
    lines = ["# tonight's LoRAs", "", "a/config.toml   # the portrait one", f"  {second}  ", "   ", "../c.toml"]
    queue.write_text("\n".join(lines) + "\n")
    assert expand_configs([queue]) == [first.resolve(), second, third.resolve()]
    renamed = queue.rename(queue.with_suffix(".queue"))
    assert expand_configs([renamed]) == [first.resolve(), second, third.resolve()]


def test_a_missing_config_in_a_queue_file_names_the_file_and_the_line(tmp_path: Path) -> None:
    _write_config(tmp_path / "a.toml")
    queue = tmp_path / "q.txt"
    queue.write_text("# header\na.toml\n\nmissing.toml\n")
    with pytest.raises(QueueInputError) as caught:
        expand_configs([queue])
    assert str(caught.value) == f"{queue}, line 4: no config file 'missing.toml'"


def test_a_queue_file_with_only_comments_is_refused(tmp_path: Path) -> None:
    queue = tmp_path / "q.txt"
    queue.write_text("# nothing tonight\n\n")
    with pytest.raises(QueueInputError, match="lists no config"):
        expand_configs([queue])


def test_an_empty_folder_is_refused_by_name(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no configs here")
    with pytest.raises(QueueInputError) as caught:
        expand_configs([empty])
    assert str(caught.value) == f"{empty}: a folder with no .toml config in it"


def test_a_config_named_twice_is_refused(tmp_path: Path) -> None:
    config = _write_config(tmp_path / "jobs" / "a.toml")
    other = _write_config(tmp_path / "b.toml")
    queue = tmp_path / "jobs" / "q.txt"
    queue.write_text("a.toml\n")
    with pytest.raises(QueueInputError) as caught:
        expand_configs([tmp_path / "jobs", other, queue])  # the folder and the queue file both name a.toml
    assert str(caught.value) == f"the queue names {config} more than once"
    with pytest.raises(QueueInputError, match="more than once"):
        expand_configs([other, other])


# ---------------------------------------------------------------------------------------------- output_clashes


def test_two_configs_writing_the_same_file_clash(tmp_path: Path) -> None:
    a = _loaded(tmp_path / "a.toml", output_name="lora")
    b = _loaded(tmp_path / "b.toml", output_name="lora")
    c = _loaded(tmp_path / "c.toml", output_name="other")
    clashes = output_clashes([a, b, c])
    assert len(clashes) == 1
    assert str(a.path) in clashes[0] and str(b.path) in clashes[0] and "lora.safetensors" in clashes[0]


def test_the_same_output_name_in_different_folders_does_not_clash(tmp_path: Path) -> None:
    a = _loaded(tmp_path / "a" / "config.toml", output_name="lora")  # output_dir "out" is relative to each config
    b = _loaded(tmp_path / "b" / "config.toml", output_name="lora")
    assert output_clashes([a, b]) == []
    unnamed = [_loaded(tmp_path / "c.toml"), _loaded(tmp_path / "d.toml")]
    assert len(output_clashes(unnamed)) == 1, "two configs without output_name both write last.safetensors"


# ---------------------------------------------------------------------------------------------- rental_key


def test_jobs_of_one_base_model_and_settings_share_a_rental_key(tmp_path: Path) -> None:
    a = _loaded(tmp_path / "a.toml", output_name="a", learning_rate=1e-4)
    b = _loaded(tmp_path / "b" / "b.toml", output_name="b", learning_rate=5e-4, output_dir="elsewhere")
    assert rental_key(a, 1) == rental_key(b, 1)


@pytest.mark.parametrize(
    "difference",
    [
        {"model": "stabilityai/stable-diffusion-xl-base-1.0"},
        {"model": "SG161222/Realistic_Vision_V5.1_noVAE"},
        {"precision": "bf16"},
        {"rentrain": 'image = "nvidia/cuda:12.4.1-runtime-ubuntu22.04"'},
        {"rentrain": "min_vram_gb = 40"},
    ],
    ids=["base model", "another SD 1.5 model", "precision", "image", "min_vram"],
)
def test_another_base_model_precision_image_or_min_vram_is_another_rental(
    tmp_path: Path, difference: dict[str, str]
) -> None:
    base = _loaded(tmp_path / "a.toml")
    other = _loaded(tmp_path / "b.toml", **difference)
    assert rental_key(base, 1) != rental_key(other, 1)


def test_another_gpu_count_is_another_rental(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path / "a.toml")
    assert rental_key(loaded, 1) != rental_key(loaded, 2)


# ---------------------------------------------------------------------------------------------- plan_lanes


def test_one_key_and_parallel_1_is_one_lane_in_the_order_given() -> None:
    assert plan_lanes(["k"] * 4, [1.0, 3.0, 2.0, 4.0], parallel=1) == [[0, 1, 2, 3]]


def test_parallel_2_spreads_one_key_longest_first_onto_the_least_loaded_lane() -> None:
    # LPT: 5 -> A; 4 -> B; 3 -> B (4 < 5); 3 -> A (5 < 7); 3 -> B (7 < 8). B = 10 h comes out first, and each
    # lane keeps the order given
    assert plan_lanes(["k"] * 5, [5.0, 4.0, 3.0, 3.0, 3.0], parallel=2) == [[1, 2, 4], [0, 3]]


def test_three_hosts_take_the_jobs_longest_first_each_onto_the_least_loaded_lane() -> None:
    # 8 -> A, 7 -> B, 7 -> C; 4 -> B (7 = 7, the first lane wins the tie); 2 -> C (7 < 8); 1 -> A (8 < 9)
    assert plan_lanes(["k"] * 6, [7.0, 4.0, 2.0, 8.0, 1.0, 7.0], parallel=3) == [[0, 1], [3, 4], [2, 5]]


def test_two_keys_and_parallel_1_are_two_lanes_the_longer_first() -> None:
    keys = ["sd15", "sdxl", "sd15", "sdxl"]
    assert plan_lanes(keys, [1.0, 2.0, 1.5, 3.0], parallel=1) == [[1, 3], [0, 2]]


def test_parallel_above_the_job_count_gives_each_job_its_own_lane() -> None:
    assert plan_lanes(["k"] * 3, [1.0, 3.0, 2.0], parallel=5) == [[1], [2], [0]]


def test_a_spare_host_goes_to_the_key_with_the_busiest_lane() -> None:
    keys = ["a", "a", "a", "b"]
    assert plan_lanes(keys, [2.0, 2.0, 2.0, 1.0], parallel=3) == [[0, 2], [1], [3]]
    assert plan_lanes(keys, [1.0, 1.0, 1.0, 5.0], parallel=3) == [[3], [0, 2], [1]], "b has no job to spare"
    assert plan_lanes(["a", "a", "b", "b"], [3.0, 3.0, 1.0, 1.0], parallel=3) == [[0], [1], [2, 3]]


def test_jobs_of_different_keys_never_share_a_lane() -> None:
    chance = random.Random(15)
    for _round in range(200):
        count = chance.randint(1, 9)
        keys = [chance.choice("abc") for _ in range(count)]
        hours = [chance.choice([0.25, 0.5, 1.0, 2.0, 3.5]) for _ in range(count)]
        parallel = chance.randint(1, 6)
        lanes = plan_lanes(keys, hours, parallel)
        assert sorted(i for lane in lanes for i in lane) == list(range(count)), "each job in exactly one lane"
        assert all(len({keys[i] for i in lane}) == 1 for lane in lanes), (keys, lanes)
        assert len(lanes) == max(len(set(keys)), min(parallel, count)), (keys, parallel, lanes)
        loads = [sum(hours[i] for i in lane) for lane in lanes]
        assert loads == sorted(loads, reverse=True), "lanes come out longest first"
        assert all(lane == sorted(lane) for lane in lanes), "a lane keeps the order given"


# ---------------------------------------------------------------------------------------------- shares_on


def _offer(gpu: str = "RTX 4090", price: float = 2.0, offer_id: str = "7001", vram: float = 24) -> RankedOffer:
    return RankedOffer(
        offer=Offer(
            provider="vast",
            offer_id=offer_id,
            gpu_model=gpu,
            gpu_name_raw=gpu,
            gpu_count=1,
            vram_gb=vram,
            price_per_hour=price,
            download_mbps=400,
        )
    )


PROFILES = [
    JobProfile(family="sd15", steps=2000, images=40, dataset_bytes=80_000_000),
    JobProfile(family="sd15", steps=500, images=10, dataset_bytes=5_000_000),
    JobProfile(family="sd15", steps=1200, images=25, dataset_bytes=30_000_000),
]


def test_the_shared_setup_is_split_equally_and_each_job_keeps_its_own_parts() -> None:
    ranked = _offer()
    shares = shares_on(PROFILES, ranked)
    assert shares is not None and len(shares) == 3
    for profile, share in zip(PROFILES, shares, strict=True):
        alone = estimate_job(profile, ranked.offer)
        assert alone is not None
        parts = alone.setup_seconds
        shared = sum(parts[name] for name in SHARED_SETUP)
        own = sum(parts[name] for name in ("upload", "latent_cache", "text_cache", "samples", "fetch"))
        assert shared > 0 and own > 0
        assert share.overhead_hours * SECONDS_PER_HOUR == pytest.approx(own + shared / 3)
        assert share.setup_seconds["image_pull"] == pytest.approx(parts["image_pull"] / 3)
        assert share.transfer_gb["model_download"] == pytest.approx(alone.transfer_gb["model_download"] / 3)
        assert share.transfer_gb["upload"] == alone.transfer_gb["upload"]
        assert share.train_hours == alone.train_hours
        assert share.total_hours == pytest.approx(alone.total_hours - shared * 2 / 3 / SECONDS_PER_HOUR)
        assert share.cost_usd == pytest.approx(share.total_hours * ranked.offer.price_per_hour, abs=0.001)


def test_one_rental_saves_n_minus_1_shared_setups_against_separate_runs() -> None:
    ranked = _offer(price=3.0)
    shares = shares_on(PROFILES, ranked)
    alone = [estimate_job(p, ranked.offer) for p in PROFILES]
    assert shares is not None and all(a is not None for a in alone)
    parts = alone[0].setup_seconds  # type: ignore[union-attr]
    shared_usd = sum(parts[name] for name in SHARED_SETUP) / SECONDS_PER_HOUR * ranked.offer.price_per_hour
    separate = sum(a.cost_usd for a in alone if a is not None)
    together = sum(s.cost_usd for s in shares)
    assert separate - together == pytest.approx((len(PROFILES) - 1) * shared_usd, abs=0.001 * len(PROFILES))
    assert shares_on(PROFILES[:1], ranked) is not None
    assert shares_on(PROFILES[:1], ranked)[0].total_hours == pytest.approx(alone[0].total_hours)  # type: ignore[index,union-attr]


def test_no_shares_when_one_job_has_no_estimate_on_the_offer() -> None:
    too_big = JobProfile(family="sdxl", steps=100, resolution=(4096, 4096), batch_size=16, bytes_per_value=4)
    ranked = _offer()
    assert estimate_job(too_big, ranked.offer) is None, "the test needs a job that does not fit 24 GB"
    assert shares_on([*PROFILES, too_big], ranked) is None
    assert shares_on(PROFILES, _offer(gpu="Unknown GPU 9000")) is None


def test_offers_rank_by_the_lane_total_and_unusable_ones_come_last() -> None:
    dear, cheap, unknown = _offer(price=4.0, offer_id="1"), _offer(price=1.0, offer_id="2"), _offer("?", 0.1, "3")
    ranked = rank_for_lane(PROFILES, [unknown, dear, cheap])
    assert [r.offer.offer_id for r in ranked] == ["2", "1", "3"]


# ---------------------------------------------------------------------------------------------- finish_time


def _lane(*hours: float) -> LanePlan:
    estimate = JobEstimate(
        steps=1,
        seconds_per_step=1.0,
        speed_kind="assumed",
        speed_source="test",
        train_hours=0.0,
        overhead_hours=0.0,
        total_hours=0.0,
        price_per_hour=1.0,
        cost_usd=0.0,
    )
    estimates = [estimate.model_copy(update={"total_hours": h}) for h in hours]
    return LanePlan(jobs=list(range(len(hours))), offers=[], estimates=[*estimates, None])


def test_with_one_host_the_lanes_run_one_after_another() -> None:
    lanes = [_lane(2.0, 1.0), _lane(2.0), _lane(1.0)]
    assert finish_time(lanes, parallel=1, start=1000.0) == 1000.0 + 6 * SECONDS_PER_HOUR


def test_with_two_hosts_a_lane_starts_when_one_is_free() -> None:
    # 3 h and 2 h start at once; the 2 h lane starts on the host free after 2 h: done after 4 h
    lanes = [_lane(3.0), _lane(2.0), _lane(2.0)]
    assert finish_time(lanes, parallel=2, start=0.0) == 4 * SECONDS_PER_HOUR
    assert finish_time(lanes, parallel=3, start=0.0) == 3 * SECONDS_PER_HOUR
    assert finish_time(lanes, parallel=8, start=0.0) == 3 * SECONDS_PER_HOUR
    assert finish_time([], parallel=2, start=5.0) == 5.0


# ---------------------------------------------------------------------------------------------- --deadline


def _at(*fields: int) -> float:
    return datetime.datetime(*fields).timestamp()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("now", "expected"),
    [((2026, 12, 5, 22, 30), (2026, 12, 6, 7, 0)), ((2026, 12, 6, 6, 15), (2026, 12, 6, 7, 0))],
    ids=["before midnight: tomorrow", "early morning: today"],
)
def test_a_clock_time_is_the_next_one(now: tuple[int, ...], expected: tuple[int, ...]) -> None:
    assert ClockTime(now=lambda: _at(*now)).convert("07:00", None, None) == _at(*expected)


def test_a_clock_time_equal_to_now_is_tomorrow() -> None:
    clock = ClockTime(now=lambda: _at(2026, 12, 6, 7, 0))
    assert clock.convert("07:00", None, None) == _at(2026, 12, 7, 7, 0)


@pytest.mark.parametrize("text", ["2026-12-06 07:00", "2026-12-06T07:00", " 2026-12-06 07:00 "])
def test_a_date_and_time(text: str) -> None:
    assert ClockTime(now=lambda: _at(2026, 12, 5, 22, 0)).convert(text, None, None) == _at(2026, 12, 6, 7, 0)


def test_a_time_that_has_passed_is_refused_by_value() -> None:
    clock = ClockTime(now=lambda: _at(2026, 12, 6, 8, 0))
    with pytest.raises(click.BadParameter) as caught:
        clock.convert("2026-12-06 07:00", None, None)
    assert "'2026-12-06 07:00' has passed already" in caught.value.format_message()


@pytest.mark.parametrize("text", ["seven", "25:00", "07:61", "2026-13-01 07:00", ""])
def test_garbage_is_refused_by_value(text: str) -> None:
    with pytest.raises(click.BadParameter) as caught:
        ClockTime(now=lambda: _at(2026, 12, 5, 22, 0)).convert(text, None, None)
    assert f"{text!r} is not a time" in caught.value.format_message()


# ---------------------------------------------------------------------------------------------- the queue's meter


def _job(job_id: str, state: str = "planned") -> JobRecord:
    return JobRecord(
        id=job_id,
        created_at=time.time(),
        config_path=f"/jobs/{job_id}.toml",
        provider="vast",
        label=f"rentrain-{job_id}",
        state=state,
        output_dir=f"/out/{job_id}",
    )


def _queue(ledger: Ledger, job_ids: list[str], max_cost: float | None = None) -> QueueRecord:
    queue = QueueRecord(
        id="q-1", created_at=time.time(), provider="vast", max_cost=max_cost, report_path="/out/q-1/report.html"
    )
    ledger.create_queue(queue, [_job(j) for j in job_ids])
    return queue


def _billed(ledger: Ledger, job_id: str, usd: float) -> None:
    """An ended instance of the job that cost `usd` (one hour at that price)."""
    start = time.time() - 7200
    ledger.add_instance(
        InstanceRecord(
            job_id=job_id,
            provider="vast",
            instance_id=f"i-{job_id}",
            offer_id="7001",
            gpu="1x RTX 4090",
            usd_per_hour=usd,
            created_at=start,
            ended_at=start + 3600,
        )
    )


def test_a_queue_jobs_budget_counts_the_queues_other_jobs(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    _queue(ledger, ["j1", "j2", "j3"])
    ledger.create_job(_job("alone"))
    _billed(ledger, "j2", 0.6)
    _billed(ledger, "j3", 0.5)
    assert ledger.queue_cost("q-1") == pytest.approx(1.1)
    assert budget_reached(ledger, "j1", 1.0) == "budget reached: $1.10 of the queue's $1.00"
    assert budget_reached(ledger, "j1", 1.2) is None
    assert budget_reached(ledger, "j1", None) is None
    _billed(ledger, "alone", 0.3)
    assert budget_reached(ledger, "alone", 0.5) is None, "a job outside a queue counts its own instances only"
    assert budget_reached(ledger, "alone", 0.3) == "budget reached: $0.30 of $0.30"


def test_the_deadline_is_reached_at_its_time() -> None:
    deadline = _at(2026, 12, 6, 7, 0)
    assert deadline_reached(None, now=deadline) is None
    assert deadline_reached(deadline, now=deadline - 1) is None
    assert deadline_reached(deadline, now=deadline) == "deadline reached: 2026-12-06 07:00"


def test_a_queue_is_found_by_a_unique_prefix(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    _queue(ledger, ["j1", "j2"])
    assert [j.queue_position for j in ledger.queue_jobs("q-1")] == [0, 1]
    assert ledger.find_queue("q-")
    assert ledger.find_queue("q-1").id == "q-1"  # type: ignore[union-attr]
    assert ledger.find_queue("j1") is None


# ---------------------------------------------------------------------------------------------- the client lock


def test_a_lock_on_a_queue_claims_every_job_and_gives_them_back(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    _queue(ledger, ["j1", "j2", "j3"])
    with ClientLock(ledger, ["j1", "j2", "j3"]):
        assert {ledger.job(j).client_pid for j in ("j1", "j2", "j3")} == {os.getpid()}
    assert {ledger.job(j).client_pid for j in ("j1", "j2", "j3")} == {None}


def test_a_lock_over_jobs_another_client_holds_one_of_is_refused_and_claims_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    _queue(ledger, ["j1", "j2", "j3", "j4"])
    other = os.getppid()  # a live process of this host: its claim is not stale
    for job_id in ("j3", "j4"):
        ledger.take_client_lock(job_id, other, this_host())
    with pytest.raises(LockHeld) as caught, ClientLock(ledger, ["j1", "j2", "j3"]):
        pytest.fail("the lock must not be taken")
    assert "job j3 is followed by another rentrain client" in str(caught.value)
    assert ledger.job("j1").client_pid is None and ledger.job("j2").client_pid is None, "its own claims given back"
    assert ledger.job("j3").client_pid == other and ledger.job("j4").client_pid == other, "the holder keeps its own"
