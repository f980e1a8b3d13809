"""What each job teaches the estimator: the ledger's job_runs, the settings key, the median after warm-up, the
history lookups, and the record a job writes when it closes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from remote.events import DoneEvent, SampleEvent, StartEvent, StepEvent
from rentrain.costs import estimate_job
from rentrain.history import BILLED_PHASES, JobHistory, after_warm_up, settings_key, warm_up_steps
from rentrain.job import JobRunner
from rentrain.job_phases import prepare as prepare_phase
from rentrain.job_phases.meter import JobMeter
from rentrain.job_profile import JobProfile, profile_from_config
from rentrain.ledger import JobRun, Ledger
from rentrain.transport import FetchBudget
from rentrain.upload_list import list_dataset_files
from tests.jobs.test_job_lifecycle import EXAMPLE, OFFER, FakeProvider, QuietRemote, _runner, _session, _walk
from tests.report.builders import job_record

PROFILE = JobProfile(family="sd15", steps=400, batch_size=2, resolution=(768, 512), network_dim=16)


def _start(**fields: object) -> StartEvent:
    """A trainer's start event: 20 steps of batch 2 over 2 epochs unless `fields` say otherwise."""
    values: dict[str, object] = {
        "total_steps": 20,
        "epochs": 2,
        "steps_per_epoch": 10,
        "samples_per_epoch": 20,
        "batch_size": 2,
        "model_family": "sd15",
        "model": "m",
        "device": "cpu",
        "dtype": "float32",
        **fields,
    }
    return StartEvent.model_validate(values)


def _run(job_id: str = "j1", **fields: object) -> JobRun:
    values: dict[str, object] = {
        "job_id": job_id,
        "provider": "vast",
        "gpu_model": "RTX 4090",
        "gpu_count": 1,
        "family": "sd15",
        "settings_key": settings_key(PROFILE),
        "seconds_per_step": 0.5,
        "steps_measured": 360,
        "phases": {"image_pull": 80.0, "bootstrap": 60.0},
        "bytes_up": 20_000_000,
        "model_download_bytes": 2_100_000_000,
        "bytes_down": 150_000_000,
        "cost_usd": 0.12,
        "bandwidth_usd": 0.01,
        "recorded_at": time.time(),
    }
    return JobRun.model_validate(values | fields)


def _ledger_with_jobs(tmp_path: Path, *job_ids: str) -> Ledger:
    """A ledger whose job_runs rows may name these jobs (job_runs.job_id references jobs.id)."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    for job_id in job_ids:
        ledger.create_job(job_record(job_id, tmp_path / "config.toml", tmp_path / job_id))
    return ledger


# ------------------------------------------------------------------------------------------ the ledger's table


def test_a_recorded_run_reads_back_as_it_was_written_and_a_second_record_replaces_it(tmp_path: Path) -> None:
    ledger = _ledger_with_jobs(tmp_path, "j1", "j2")
    first = _run("j1", seconds_per_step=None, steps_measured=0)
    ledger.record_run(first)
    ledger.record_run(_run("j2"))
    assert ledger.job_runs("j1") == [first]
    again = _run("j1", phases={"fetch": 3.5}, cost_usd=0.2)
    ledger.record_run(again)
    assert ledger.job_runs("j1") == [again]
    assert [run.job_id for run in ledger.job_runs()] == ["j2", "j1"]  # oldest record first


# ------------------------------------------------------------------------------------------ the settings key


def test_the_settings_key_is_a_stable_string_of_the_settings_that_change_the_step_time() -> None:
    assert settings_key(PROFILE) == "sd15/768x512/batch2/rank16/te0/bytes2/ckpt0/accum1"
    # what the dataset is (its size, its step count) does not change the time of one step
    same = PROFILE.model_copy(update={"steps": 9000, "images": 300, "dataset_bytes": 10**9, "epochs": 30})
    assert settings_key(same) == settings_key(PROFILE)


@pytest.mark.parametrize(
    "change",
    [
        {"family": "sdxl"},
        {"resolution": (512, 768)},
        {"batch_size": 4},
        {"network_dim": 32},
        {"trains_text_encoder": True},
        {"bytes_per_value": 4},
        {"gradient_checkpointing": True},
        {"gradient_accumulation_steps": 2},
    ],
)
def test_each_setting_that_changes_the_step_time_changes_the_key(change: dict[str, object]) -> None:
    assert settings_key(PROFILE.model_copy(update=change)) != settings_key(PROFILE)


# ------------------------------------------------------------------------------------------ warm-up


def test_warm_up_is_a_tenth_of_a_starts_steps_or_five_whichever_is_more() -> None:
    assert [warm_up_steps(n) for n in (4, 20, 50, 51, 200)] == [5, 5, 5, 6, 20]
    assert not after_warm_up(20, 200) and after_warm_up(21, 200)
    # a start that resumed after step 100 of 200 warms up again: 100 steps to run, its first 10 left out
    assert not after_warm_up(110, 200, resumed_from_step=100) and after_warm_up(111, 200, resumed_from_step=100)


def _step(step: int, seconds: float, total: int = 20, at: float = 0.0) -> StepEvent:
    return StepEvent(
        step=step,
        total_steps=total,
        epoch=1,
        loss=0.1,
        lr=1e-4,
        seconds_per_step=seconds,
        samples_per_second=1.0,
        time=at or 1000.0 + step,
    )


def test_the_meters_step_time_is_the_median_after_warm_up() -> None:
    meter = JobMeter()
    slow_start = [_step(step, 9.0) for step in range(1, 6)]  # compiling, caching: far slower
    steady = [_step(step, 0.5 + 0.01 * (step % 3)) for step in range(6, 21)]
    for event in [*slow_start, *steady]:
        meter.saw_event(event)
    assert meter.seconds_per_step() == pytest.approx(0.51)
    assert len(meter.step_seconds) == 15


def test_the_meter_takes_the_trainers_setup_and_samples_out_of_training() -> None:
    meter = JobMeter()
    start = _start(
        device="cuda:0",
        dtype="bfloat16",
        time=1000.0,
        setup_seconds={"setup": 12.0, "load_weights": 8.0, "cache_latents": 30.0, "cache_text": 2.0},
    )
    meter.saw_event(start)
    meter.saw_event(_step(10, 0.5, at=1100.0))
    meter.saw_event(SampleEvent(path="/o/samples/a.png", epoch=1, step=10, time=1104.0))
    meter.saw_event(start)  # read again by a client that re-reads the events from their start: counted once
    meter.add("training", 300.0)
    phases = meter.phases()
    assert phases["trainer_setup"] == 12.0 and phases["latent_cache"] == 30.0 and phases["text_cache"] == 2.0
    assert phases["samples"] == pytest.approx(4.0)
    assert phases["training"] == pytest.approx(300.0 - 12.0 - 30.0 - 2.0 - 4.0)


def test_bandwidth_is_the_bytes_at_the_offers_rates_the_instance_receiving_the_uploads() -> None:
    meter = JobMeter()
    meter.bytes_up, meter.model_download_bytes = 1_000_000_000, 2_000_000_000
    meter.bytes_fetched = lambda: 500_000_000
    priced = OFFER.model_copy(update={"inet_down_usd_per_gb": 0.01, "inet_up_usd_per_gb": 0.02})
    assert meter.bandwidth_usd(priced) == pytest.approx(3 * 0.01 + 0.5 * 0.02)
    assert meter.bandwidth_usd(OFFER) == 0.0  # a provider that says nothing bills nothing here
    assert meter.bandwidth_usd(None) == 0.0


# ------------------------------------------------------------------------------------------ history


def test_the_speed_from_history_is_the_median_of_the_runs_on_that_gpu_at_those_settings(tmp_path: Path) -> None:
    ledger = _ledger_with_jobs(tmp_path, *[f"j{i}" for i in range(1, 7)])
    ledger.record_run(_run("j1", seconds_per_step=0.50))
    ledger.record_run(_run("j2", seconds_per_step=0.60))
    ledger.record_run(_run("j3", seconds_per_step=0.52))
    ledger.record_run(_run("j4", seconds_per_step=3.0, gpu_model="RTX 3090"))  # another GPU
    ledger.record_run(
        _run("j5", seconds_per_step=3.0, settings_key="sd15/512x512/batch1/rank16/te0/bytes2/ckpt0/accum1")
    )
    ledger.record_run(_run("j6", seconds_per_step=0.3, gpu_count=2))  # two GPUs: a step of its own
    history = JobHistory.of(ledger)
    speed = history.speed("RTX 4090", PROFILE)
    assert speed is not None
    assert (speed.seconds_per_step, speed.runs, speed.low, speed.high) == (0.52, 3, 0.50, 0.60)
    two = history.speed("RTX 4090", PROFILE, gpus=2)
    assert two is not None and (two.seconds_per_step, two.runs) == (0.3, 1)
    assert history.speed("H100 SXM", PROFILE) is None


def test_the_setup_from_history_is_each_billed_phases_median_a_run_without_one_counting_it_as_nothing(
    tmp_path: Path,
) -> None:
    ledger = _ledger_with_jobs(tmp_path, "j1", "j2", "j3", "j4", "j5")
    ledger.record_run(_run("j5", phases={"prepare": 5.0, "fetch": 2.0}))  # handed a running instance: no pull
    ledger.record_run(_run("j1", phases={"image_pull": 60.0, "prepare": 40.0, "upload": 30.0}))
    ledger.record_run(_run("j2", phases={"image_pull": 100.0, "prepare": 50.0, "other": 3.0}))
    ledger.record_run(_run("j3", phases={"image_pull": 80.0, "other": 5.0}))
    ledger.record_run(_run("j4", phases={"image_pull": 900.0}, provider="runpod"))
    history = JobHistory.of(ledger)
    setup = history.setup("vast", "RTX 4090", "sd15")
    assert setup is not None and setup.runs == 3
    assert {k: v for k, v in setup.seconds.items() if v} == {"image_pull": 80.0, "prepare": 40.0, "other": 3.0}
    assert set(setup.seconds) == set(BILLED_PHASES)  # upload runs inside prepare: not billed on its own
    assert history.setup("vast", "RTX 4090", "sdxl") is None


def test_no_ledger_yet_is_an_empty_history_and_makes_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert JobHistory.of().runs == []
    assert not (tmp_path / "state").exists()


# ------------------------------------------------------------------------------------------ a job's record


def _train_and_finish(runner: JobRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set the instance up over a fake SSH connection, read the trainer's events as the follow loop does, fetch a
    result, destroy the instance: everything a finished job does but the network."""
    monkeypatch.setattr(prepare_phase, "Remote", QuietRemote)
    session, _remote = _session(runner, drops=False)
    runner.preparer.prepare(session)
    _walk(runner, ("following",))
    start = _start(model="builtin:tiny-sd15", setup_seconds={"cache_latents": 1.5})
    events = [start, *[_step(step, 2.0 if step <= 5 else 0.25, at=start.time + step) for step in range(1, 21)]]
    events.append(DoneEvent(path="/o/tiny_toy.safetensors", sha256="0" * 64, step=20, epoch=2, wall_seconds=30.0))
    for event in events:
        runner.follower._on_event(session, event, event.model_dump_json().encode() + b"\n")
    budget = FetchBudget(10_000_000)
    budget.take(3_000_000, "the result and its state")
    runner.fetcher.fetch_budget = budget  # what the fetches took, as fetch_file and fetch_state take it
    runner.teardown.destroy(session, "training done and results home")


def test_a_finished_job_records_what_it_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    runner = _runner(tmp_path, FakeProvider(), said)
    priced = OFFER.model_copy(update={"inet_down_usd_per_gb": 0.02, "inet_up_usd_per_gb": 0.05})
    runner.context.meter.offers[priced.offer_id] = priced
    _train_and_finish(runner, monkeypatch)
    runner.close("succeeded", "result fetched")

    [run] = runner.ledger.job_runs("j1")
    dataset = list_dataset_files(runner.loaded.train.train_data_dir, runner.loaded.train.caption_extension).bytes
    assert (run.provider, run.gpu_model, run.gpu_count, run.family) == ("vast", "RTX 4090", 1, "sd15-tiny")
    assert run.settings_key == settings_key(profile_from_config(EXAMPLE))
    assert (run.seconds_per_step, run.steps_measured) == (0.25, 15)  # steps 1-5 were warm-up
    assert run.bytes_up == dataset and run.model_download_bytes == 0 and run.bytes_down == 3_000_000
    assert run.phases["bootstrap"] == pytest.approx(0.3)  # the instance's own times of its three phases
    assert run.phases["latent_cache"] == 1.5
    assert {"upload", "teardown"} <= set(run.phases)
    assert run.cost_usd == pytest.approx(runner.ledger.job_cost("j1")) and run.cost_usd > 0
    assert run.bandwidth_usd == pytest.approx(dataset / 1e9 * 0.02 + 0.003 * 0.05)
    assert not any("warning" in line for line in said)


def test_a_job_that_never_trained_records_nothing(tmp_path: Path) -> None:
    runner = _runner(tmp_path, FakeProvider(), [])
    runner.close("failed", "no instance could be started")
    assert runner.ledger.job("j1").state == "closed"
    assert runner.ledger.job_runs() == []


def test_a_record_that_fails_never_fails_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    runner = _runner(tmp_path, FakeProvider(), said)
    _train_and_finish(runner, monkeypatch)

    def broken(run: JobRun) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(runner.ledger, "record_run", broken)
    runner.close("succeeded", "result fetched")
    assert runner.ledger.job("j1").outcome == "succeeded"
    assert any("measurements were not recorded (OSError: disk full)" in line for line in said)


# ------------------------------------------------------------------------------------------ estimates


def test_an_estimate_takes_the_step_time_and_setup_your_jobs_measured_and_says_so(tmp_path: Path) -> None:
    ledger = _ledger_with_jobs(tmp_path, "j1", "j2")
    setup = {"image_pull": 90.0, "prepare": 120.0, "trainer_setup": 20.0, "fetch": 10.0, "other": 4.0}
    ledger.record_run(_run("j1", seconds_per_step=0.50, phases=setup))
    ledger.record_run(_run("j2", seconds_per_step=0.70, phases=setup))
    offer = OFFER.model_copy(update={"gpu_model": "RTX 4090", "price_per_hour": 0.36, "provider": "vast"})
    modelled = estimate_job(PROFILE, offer)
    measured = estimate_job(PROFILE, offer, JobHistory.of(ledger))
    assert modelled is not None and measured is not None
    assert modelled.speed_kind == "modelled" and "modelled" in modelled.setup_source
    assert measured.speed_kind == "measured" and "your 2 jobs" in measured.speed_source
    assert measured.seconds_per_step == pytest.approx(0.60)
    assert (measured.seconds_per_step_low, measured.seconds_per_step_high) == pytest.approx((0.45, 0.77))
    assert "your 2 jobs" in measured.setup_source
    assert sum(measured.setup_seconds.values()) == pytest.approx(244.0)
    hours = (PROFILE.steps * 0.60 + 244.0) / 3600
    assert measured.total_hours == pytest.approx(hours)
    assert measured.gpu_usd == pytest.approx(hours * 0.36)
    # another GPU, or the same GPU at other settings, is still modelled
    other_gpu = estimate_job(PROFILE, offer.model_copy(update={"gpu_model": "RTX 3090"}), JobHistory.of(ledger))
    assert other_gpu is not None and other_gpu.speed_kind != "measured"
    wider = PROFILE.model_copy(update={"network_dim": 64})
    assert estimate_job(wider, offer, JobHistory.of(ledger)).speed_kind == "modelled"  # type: ignore[union-attr]


def test_a_record_splits_training_into_the_steps_and_the_rest_and_bills_the_gaps_as_other() -> None:
    meter = JobMeter()
    meter.add("image_pull", 30.0)
    meter.add("prepare", 50.0)
    meter.add("training", 100.0)
    meter.add("fetch", 5.0)
    meter.add("teardown", 2.0)
    meter.saw_event(
        _start(
            total_steps=40,
            epochs=1,
            steps_per_epoch=40,
            samples_per_epoch=40,
            batch_size=1,
            setup_seconds={"setup": 12.0},
            time=1000.0,
        )
    )
    for step in range(1, 41):
        meter.saw_event(
            StepEvent(
                step=step,
                total_steps=40,
                epoch=1,
                loss=0.1,
                lr=1e-4,
                seconds_per_step=2.0,
                samples_per_second=0.5,
                time=1000.0 + step,
            )
        )
    phases = meter.phases(billed_seconds=200.0)
    assert phases["training"] == pytest.approx(88.0)  # less the trainer's 12 s of setup
    assert phases["train_extra"] == pytest.approx(88.0 - 40 * 2.0)
    assert phases["other"] == pytest.approx(200.0 - (30 + 50 + 100 + 5 + 2))
    billed = sum(phases.get(name, 0.0) for name in BILLED_PHASES) + 40 * 2.0
    assert billed == pytest.approx(200.0)  # the billed phases and the steps are the bill


def test_the_phases_that_grow_with_the_job_take_the_history_rate_not_its_seconds(tmp_path: Path) -> None:
    ledger = _ledger_with_jobs(tmp_path, "j1")
    phases = {"image_pull": 60.0, "prepare": 30.0, "latent_cache": 5.0, "samples": 8.0}
    ledger.record_run(_run("j1", phases=phases, images=10, sample_images=4))
    offer = OFFER.model_copy(update={"gpu_model": "RTX 4090", "provider": "vast"})
    bigger = PROFILE.model_copy(update={"images": 40, "sample_images": 2})
    estimate = estimate_job(bigger, offer, JobHistory.of(ledger))
    assert estimate is not None
    assert estimate.setup_seconds["image_pull"] == 60.0  # the same whatever the job's size
    assert estimate.setup_seconds["latent_cache"] == pytest.approx(5.0 / 10 * 40)
    assert estimate.setup_seconds["samples"] == pytest.approx(8.0 / 4 * 2)


def test_history_prices_a_card_the_planner_changes_the_same_way_on_every_size(tmp_path: Path) -> None:
    # checkpointing asked for (the template's config) is dropped on every RTX 4090: the earlier run ran so too
    checkpointed = PROFILE.model_copy(update={"gradient_checkpointing": True})
    ledger = _ledger_with_jobs(tmp_path, "j1")
    ledger.record_run(_run("j1", seconds_per_step=0.5, settings_key=settings_key(checkpointed)))
    offer = OFFER.model_copy(update={"gpu_model": "RTX 4090", "provider": "vast", "vram_gb": 24.0})
    estimate = estimate_job(checkpointed, offer, JobHistory.of(ledger))
    assert estimate is not None and estimate.speed_kind == "measured" and estimate.seconds_per_step == 0.5


def test_history_never_prices_a_card_the_job_does_not_fit(tmp_path: Path) -> None:
    ledger = _ledger_with_jobs(tmp_path, "j1")
    ledger.record_run(_run("j1", seconds_per_step=0.5))
    history = JobHistory.of(ledger)
    fits = OFFER.model_copy(update={"gpu_model": "RTX 4090", "provider": "vast", "vram_gb": 24.0})
    assert estimate_job(PROFILE, fits, history).speed_kind == "measured"  # type: ignore[union-attr]
    # the same GPU name with less memory: the trainer would plan micro-batches or checkpointing there
    planned = fits.model_copy(update={"vram_gb": 4.0})
    estimate = estimate_job(PROFILE, planned, history)
    assert estimate is not None and estimate.speed_kind == "modelled" and "memory planning" in estimate.speed_source
    assert estimate_job(PROFILE, fits.model_copy(update={"vram_gb": 1.0}), history) is None  # holds nothing
