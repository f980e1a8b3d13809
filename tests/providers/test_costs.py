"""The cost model: speed table lookups, scaling rules, overhead, and the job profile from a config."""

from __future__ import annotations

from pathlib import Path

import pytest

from providers.base import Offer
from remote.config import TrainConfig
from remote.trainer.families import FAMILIES
from rentrain import setup_time, speed_model
from rentrain.costs import estimate_job
from rentrain.job_profile import JobProfile, guess_model_family, profile_from_config
from rentrain.setup_time import setup_seconds
from rentrain.speed_model import seconds_per_step

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "config.toml"


def sdxl(**kw) -> JobProfile:
    return JobProfile(**{"family": "sdxl", "steps": 1000, "batch_size": 1, "resolution": (1024, 1024), **kw})


def sd15(**kw) -> JobProfile:
    return JobProfile(**{"family": "sd15", "steps": 1000, "batch_size": 1, "resolution": (512, 512), **kw})


@pytest.mark.parametrize(
    ("model", "extra", "family"),
    [
        ("builtin:tiny-sd15", {}, "sd15"),
        ("builtin:tiny-sdxl", {}, "sdxl"),
        ("builtin:tiny-flux", {"network_train_unet_only": True}, "flux"),
        ("stabilityai/stable-diffusion-xl-base-1.0", {}, "sdxl"),
        ("/models/ponyDiffusionV6.safetensors", {}, "sdxl"),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", {}, "sd15"),
        ("/models/realisticVision.safetensors", {"sdxl": True}, "sdxl"),
        ("/models/some_xl_name.safetensors", {"sdxl": False}, "sd15"),
        ("/models/sd2.safetensors", {"v2": True}, "sd2"),
        ("black-forest-labs/FLUX.1-dev", {}, "flux"),
        (
            "/models/my_model.safetensors",
            {"network_module": "networks.lora_flux", "network_train_unet_only": True},
            "flux",
        ),
        ("/models/fluxed_xl_merge.safetensors", {}, "flux"),
    ],
)
def test_model_family_guess(model, extra, family):
    train = TrainConfig.model_validate(
        {"pretrained_model_name_or_path": model, "train_data_dir": "d", "max_train_epochs": 1, "learning_rate": 1e-4}
        | extra
    )
    assert guess_model_family(train) == family


def test_faster_cards_are_faster_and_unknown_cards_have_no_figure():
    assert seconds_per_step("H100 SXM", sd15()).seconds_per_step < seconds_per_step("RTX 3090", sd15()).seconds_per_step
    assert (
        seconds_per_step("RTX A5000", sd15()).seconds_per_step > seconds_per_step("RTX 3090", sd15()).seconds_per_step
    )
    assert seconds_per_step("Imaginary RTX 9999", sd15()) is None


def test_checkpointing_and_accumulation_scale_the_step_and_its_range():
    from remote.trainer.memory import PROFILES

    base = seconds_per_step("RTX 3090", sdxl())
    checkpointed = seconds_per_step("RTX 3090", sdxl(gradient_checkpointing=True))
    factor = PROFILES["sdxl"].checkpointing_factor  # measured on the H200, not the old assumed 1.3
    assert checkpointed.seconds_per_step == pytest.approx(base.seconds_per_step * factor)
    assert (checkpointed.low, checkpointed.high) == pytest.approx((base.low * factor, base.high * factor))
    accumulated = seconds_per_step("RTX 3090", sdxl(gradient_accumulation_steps=4))
    assert accumulated.seconds_per_step == pytest.approx(base.seconds_per_step * 4)


def test_every_number_has_a_kind_and_a_source():
    downloads = [setup_time.model_download_gb(JobProfile(family=name, steps=1)) for name in FAMILIES]
    figures = [*setup_time.SETUP.values(), *downloads]
    figures += [speed_model.MEASURED_SPREAD, speed_model.MAX_TENSOR_FRACTION]
    figures += [speed_model.FP32_TENSOR_RATE, speed_model.FP32_UNCERTAINTY]
    figures += [speed_model.TINY_SECONDS_PER_STEP, speed_model.TINY_BATCH_MARGINAL, speed_model.TINY_RANGE]
    for figure in [*figures, *speed_model.EFFICIENCY.values()]:
        assert figure.kind in ("published", "derived", "measured", "assumed")
        assert len(figure.source) > 10


def _offer(download_mbps: float | None) -> Offer:
    return Offer(
        provider="vast",
        offer_id="1",
        gpu_model="RTX 3090",
        gpu_name_raw="RTX 3090",
        gpu_count=1,
        vram_gb=24,
        price_per_hour=0.5,
        download_mbps=download_mbps,
    )


def test_overhead_uses_the_offer_bandwidth_for_the_model_download():
    slow = setup_seconds(sdxl(), _offer(100))["model_download"]
    fast = setup_seconds(sdxl(), _offer(1000))["model_download"]
    assert slow == pytest.approx(6.9 * 8000 / 100)
    assert fast == pytest.approx(slow / 10)
    local = sdxl(local_model_bytes=10**9, local_parts=("model",))
    assert setup_seconds(local, _offer(1000))["model_download"] == 0  # uploaded instead
    assert setup_time.transfer_gb(local)["upload"] == pytest.approx(1.0)


def test_estimate_is_rate_times_training_plus_overhead():
    offer = _offer(800)
    profile = sdxl(steps=3600)
    est = estimate_job(profile, offer)
    train_h = 3600 * seconds_per_step("RTX 3090", profile, 24).seconds_per_step / 3600
    overhead_h = sum(setup_seconds(profile, offer).values()) / 3600
    assert est.train_hours == pytest.approx(train_h)
    assert est.overhead_hours == pytest.approx(overhead_h)
    assert est.cost_usd == pytest.approx((train_h + overhead_h) * 0.5, abs=0.001)


def _card(vram_gb: float, gpu: str = "RTX 4090") -> Offer:
    return Offer(
        provider="vast",
        offer_id=gpu,
        gpu_model=gpu,
        gpu_name_raw=gpu,
        gpu_count=1,
        vram_gb=vram_gb,
        price_per_hour=0.5,
        download_mbps=800,
    )


def test_cards_too_small_for_the_batch_are_estimated_with_the_trainers_memory_plan():
    """SDXL batch 4 needs ~33 GiB: a 24 GB card runs it as 2 micro-batches (x1.17 by the H200 measurements),
    a 48 GB card as configured; a card where nothing fits gets no estimate (ranked last)."""
    big, small = (
        estimate_job(sdxl(batch_size=4), _card(48, "RTX A6000")),
        estimate_job(sdxl(batch_size=4), _card(24, "RTX A6000")),
    )
    assert small.seconds_per_step == pytest.approx(big.seconds_per_step * 269.2 / 230.0, rel=0.01)
    assert "to fit 24 GB (2 micro-batches, memory planning)" in small.speed_source
    assert "memory planning" not in big.speed_source
    assert (
        estimate_job(sd15(batch_size=4), _card(24)).speed_source
        == seconds_per_step("RTX 4090", sd15(batch_size=4)).source
    )
    assert estimate_job(sdxl(batch_size=1), _card(8, "RTX 3060")) is None  # 6.4 GiB of weights and LoRA state alone
    assert speed_model.memory_fit(sdxl(batch_size=1), 8) is None
    assert speed_model.memory_fit(sd15(batch_size=12), 24) == (1.0, "")
    fp32 = speed_model.memory_fit(sd15(batch_size=12, bytes_per_value=4), 24)
    assert fp32 is not None and fp32[0] > 1.0  # fp32 doubles the activations: batch 12 no longer fits whole


def test_profile_from_the_example_config():
    profile = profile_from_config(EXAMPLE)
    # 20 images x 10 repeats / batch 2 = 100 steps per epoch, 2 epochs
    assert profile.steps == 200
    assert profile.family == "sd15" and profile.builtin_tiny
    assert profile.batch_size == 2 and profile.images == 20
    assert profile.dataset_bytes > 0
