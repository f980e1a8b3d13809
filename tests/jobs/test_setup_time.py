"""The setup phases, the money beyond GPU time, and the estimate's parts (rentrain.setup_time, rentrain.costs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from providers.base import Offer
from rentrain.costs import JobEstimate, estimate_job
from rentrain.job_profile import JobProfile, profile_from_config
from rentrain.setup_time import SETUP, fetch_bytes, lora_parameters, setup_seconds, transfer_gb

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "config.toml"


def sd15(**kw) -> JobProfile:
    return JobProfile(**{"family": "sd15", "steps": 2000, "batch_size": 4, "images": 40, **kw})


def vast(**kw) -> Offer:
    base = dict(
        provider="vast",
        offer_id="1",
        gpu_model="RTX 4090",
        gpu_name_raw="RTX 4090",
        gpu_count=1,
        vram_gb=24.0,
        price_per_hour=0.4,
        download_mbps=800.0,
        upload_mbps=400.0,
        inet_down_usd_per_gb=0.01,
        inet_up_usd_per_gb=0.02,
        storage_usd_per_hour=0.008,
    )
    return Offer(**{**base, **kw})


def test_the_pull_and_the_downloads_follow_the_offers_downlink():
    slow, fast = setup_seconds(sd15(), vast(download_mbps=100)), setup_seconds(sd15(), vast(download_mbps=1000))
    start, image_gb = SETUP["start_s"].value, SETUP["image_gb"].value
    assert slow["image_pull"] == pytest.approx(start + image_gb * 8000 / 100)
    assert fast["image_pull"] == pytest.approx(start + image_gb * 8000 / 1000)
    assert slow["model_download"] == pytest.approx(10 * fast["model_download"])
    unpublished = setup_seconds(sd15(), vast(download_mbps=None))  # RunPod: the default figure
    assert unpublished["model_download"] == pytest.approx(2.1 * 8000 / SETUP["default_download_mbps"].value)


def test_the_fetch_follows_the_offers_uplink_up_to_the_users_downlink():
    profile = sd15(checkpoints=3)
    slow = setup_seconds(profile, vast(upload_mbps=10))["fetch"] - SETUP["fetch_s"].value
    fast = setup_seconds(profile, vast(upload_mbps=10_000))["fetch"] - SETUP["fetch_s"].value
    assert slow == pytest.approx(fast * SETUP["user_download_mbps"].value / 10)
    # only the last checkpoint comes home after training; all three are billed as bandwidth
    assert transfer_gb(profile)["fetch"] == pytest.approx(3 * fast * SETUP["user_download_mbps"].value / 8000)


def test_the_upload_counts_only_what_outlasts_the_installs_and_the_model_download():
    small = setup_seconds(sd15(dataset_bytes=10_000_000), vast())
    assert small["upload"] == 0  # 2 s at 40 Mbit/s, well inside the installs running beside it
    big = setup_seconds(sd15(dataset_bytes=2_000_000_000), vast())
    alone = 2e9 * 8 / (SETUP["user_upload_mbps"].value * 1e6)
    assert big["upload"] == pytest.approx(alone - big["bootstrap"] - big["model_download"])
    tiny = sd15(builtin_tiny=True, dataset_bytes=2_000_000_000)  # no model download beside it
    capped = setup_seconds(tiny, vast(download_mbps=10))  # the host's downlink is the slower end
    assert capped["model_download"] == 0
    assert capped["upload"] == pytest.approx(2e9 * 8 / 10e6 - capped["bootstrap"])


def test_samples_take_their_time_from_the_gpus_step_and_text_caching_only_without_text_encoder_training():
    profile = sd15(sample_images=16, sample_steps=30)
    phases = setup_seconds(profile, vast(), train_seconds_per_image=0.03)
    per_image = 30 * 0.03 * SETUP["sample_step_fraction"].value + SETUP["sample_decode_s"].value
    assert phases["samples"] == pytest.approx(16 * per_image)
    assert phases["text_cache"] == pytest.approx(40 * SETUP["text_cache_s_per_image"].value)
    assert setup_seconds(sd15(trains_text_encoder=True), vast())["text_cache"] == 0
    assert setup_seconds(sd15(), vast())["samples"] == 0


def test_the_estimate_has_its_parts_and_bandwidth_is_priced_in_and_out():
    profile = sd15(dataset_bytes=50_000_000, checkpoints=2, sample_images=8)
    offer = vast()
    est = estimate_job(profile, offer)
    assert est is not None
    gb = transfer_gb(profile)
    gb_in = gb["image_pull"] + gb["bootstrap"] + gb["model_download"] + gb["upload"]
    assert gb_in == pytest.approx(SETUP["image_gb"].value + SETUP["install_gb"].value + 2.1 + 0.05)
    assert est.bandwidth_usd == pytest.approx(gb_in * 0.01 + gb["fetch"] * 0.02)
    assert est.setup_seconds["samples"] > 0 and set(est.setup_seconds) >= {"image_pull", "fetch", "teardown"}
    assert est.overhead_hours == pytest.approx(sum(est.setup_seconds.values()) / 3600)
    assert est.gpu_usd == pytest.approx(est.total_hours * 0.4)
    assert est.storage_usd == 0 and est.storage_usd_per_hour == 0.008  # destroyed at the end: nothing beyond
    assert est.cost_usd == pytest.approx(est.gpu_usd + est.bandwidth_usd)
    # the range moves the time part only: bandwidth is the same at both ends
    assert est.cost_high_usd - est.cost_low_usd == pytest.approx(
        est.gpu_usd * (est.total_hours_high - est.total_hours_low) / est.total_hours
    )
    assert est.cost_low_usd > est.bandwidth_usd
    free = estimate_job(profile, vast(inet_down_usd_per_gb=None, inet_up_usd_per_gb=0.0))  # unpublished / none
    assert free is not None and free.bandwidth_usd == 0 and free.cost_usd < est.cost_usd


def test_an_estimate_round_trips_and_an_old_record_still_reads_with_its_old_range():
    est = estimate_job(sd15(), vast())
    assert est is not None
    assert JobEstimate.model_validate_json(est.model_dump_json()) == est
    old = (
        '{"steps": 100, "seconds_per_step": 1.0, "seconds_per_step_low": 0.5, "seconds_per_step_high": 2.0, '
        '"speed_kind": "modelled", "speed_source": "x", "train_hours": 0.2, "overhead_hours": 0.1, '
        '"total_hours": 0.3, "price_per_hour": 1.0, "cost_usd": 0.3}'
    )
    record = JobEstimate.model_validate_json(old)
    assert record.setup_seconds == {} and record.gpu_usd is None and record.bandwidth_usd == 0
    assert record.cost_low_usd == pytest.approx(0.3 * 0.2 / 0.3)  # training halved: 0.1 + 0.1 h of 0.3
    assert record.cost_high_usd == pytest.approx(0.3 * 0.5 / 0.3)


def test_the_profile_counts_checkpoints_and_sample_images_as_the_trainer_makes_them(tmp_path):
    text = EXAMPLE.read_text().replace("sample_seeds = [1]", "sample_seeds = [1, 2]\nsample_every_n_epochs = 1")
    text = text.replace("max_train_epochs = 2", "max_train_epochs = 3")
    text = text.replace('save_model_as = "safetensors"', 'save_model_as = "safetensors"\nsave_precision = "fp16"')
    config = tmp_path / "config.toml"
    config.write_text(text.replace('"dataset', f'"{EXAMPLE.parent}/dataset'))
    profile = profile_from_config(config)
    assert profile.checkpoints == 3  # every epoch: after epochs 1 and 2, and the final file
    assert profile.sample_grids == 3 and profile.sample_images == 3 * 1 * 2 * 4  # prompts x seeds x 4 weights
    assert profile.save_bytes_per_value == 2 and profile.sample_steps == 4


def test_fetch_bytes_count_each_checkpoints_lora_and_state():
    profile = sd15(checkpoints=4, network_dim=32, save_bytes_per_value=2)
    parameters = lora_parameters(profile)
    assert 10_000_000 < parameters < 20_000_000  # SD 1.5 UNet LoRA at dim 32: 13.6 M
    assert fetch_bytes(profile) == pytest.approx(4 * parameters * (2 + SETUP["state_bytes_per_parameter"].value))
