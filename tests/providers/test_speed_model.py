"""The speed model of rentrain's own trainer (docs/costs.md): counted step work, GPU datasheet figures, the
calibration on our measured H100 / H200 steps, ranges with their kind, and the offer ranking that follows."""

from __future__ import annotations

import pytest

from providers.base import Offer
from rentrain import speed_model
from rentrain.costs import JobEstimate, estimate_job
from rentrain.gpu_specs import GPU_SPECS, spec_for
from rentrain.job_profile import JobProfile
from rentrain.offers import rank
from rentrain.queue_plan import shares_on
from rentrain.speed_model import seconds_per_step
from rentrain.step_work import FAMILY_WORK, Work, step_work


def sd15(**kw) -> JobProfile:
    """bench/train_speed.py's SD 1.5 case: 512px, batch 4, UNet + text encoder LoRA dim 32."""
    base = {"family": "sd15", "steps": 2000, "batch_size": 4, "resolution": (512, 512), "trains_text_encoder": True}
    return JobProfile(**{**base, **kw})


def sdxl(**kw) -> JobProfile:
    """bench/train_speed.py's SDXL case: 1024px, batch 2, UNet LoRA dim 32."""
    return JobProfile(**{"family": "sdxl", "steps": 2000, "batch_size": 2, "resolution": (1024, 1024), **kw})


def card(gpu: str, price: float, vram: float | None = None) -> Offer:
    spec = spec_for(gpu)
    assert spec is not None
    return Offer(
        provider="vast",
        offer_id=gpu,
        gpu_model=gpu,
        gpu_name_raw=gpu,
        gpu_count=1,
        vram_gb=vram or spec.vram_gb,
        price_per_hour=price,
        download_mbps=800,
    )


# ------------------------------------------------------------------------------------------ step work


def test_step_work_at_the_reference_is_what_bench_step_work_counted():
    """bench/RESULTS.md, "Step work, counted": 7.318 TFLOP / 28.38 GB (SD 1.5), 29.298 / 99.36 (SDXL)."""
    for family, flop, moved in (("sd15", 7.318e12, 28.38e9), ("sdxl", 29.298e12, 99.36e9)):
        w = FAMILY_WORK[family]
        work = step_work(
            family, w.reference_pixels, w.reference_batch, w.reference_rank, w.reference_trains_text_encoder
        )
        assert work.flop == pytest.approx(flop, rel=0.002)
        assert work.bytes == pytest.approx(moved, rel=0.002)


def test_step_work_scales_by_the_stated_rules():
    w = FAMILY_WORK["sdxl"]
    ref = step_work("sdxl", 1024 * 1024, 1, 32, False)
    # pixels: the products grow with the pixels, self-attention with their square; bytes with the pixels
    half = step_work("sdxl", 1024 * 512, 1, 32, False)
    attention_saved = w.sample_attention_flop * (1 - 0.25)
    assert ref.flop - half.flop == pytest.approx(w.sample_flop * 0.5 + attention_saved)
    assert half.bytes == pytest.approx(w.fixed_bytes + w.sample_bytes * 0.5)
    # batch: the fixed part once, the rest per sample
    four = step_work("sdxl", 1024 * 1024, 4, 32, False)
    assert four.flop == pytest.approx(4 * ref.flop)  # no fixed matrix work
    assert four.bytes == pytest.approx(w.fixed_bytes + 4 * (ref.bytes - w.fixed_bytes))
    # LoRA dim and the text encoders add their parts
    assert step_work("sdxl", 1024 * 1024, 1, 64, False).flop == pytest.approx(ref.flop + 32 * w.rank_sample_flop)
    with_te = step_work("sdxl", 1024 * 1024, 1, 32, True)
    assert with_te.flop == pytest.approx(ref.flop + w.text_encoder_sample_flop)
    assert with_te.kernels == pytest.approx(ref.kernels + w.text_encoder_kernels)
    # SD 1.5's reference trains the text encoder: leaving it out removes its part
    sd_ref, sd_unet = step_work("sd15", 512 * 512, 4, 32, True), step_work("sd15", 512 * 512, 4, 32, False)
    assert sd_ref.flop - sd_unet.flop == pytest.approx(4 * FAMILY_WORK["sd15"].text_encoder_sample_flop)


# ------------------------------------------------------------------------------------------ calibration


def test_the_model_reproduces_every_measured_step_within_7_percent():
    """Five parameters (a tensor fraction per family, one bandwidth factor, one kernel cost) fitted to the fifteen
    measured runs (two GPUs, batch 1 to 4, 512 to 1024px, with and without the text encoder, Flux.1 with its
    8-bit base with and without checkpointing: a checkpointed time is divided by the checkpointing factor)."""
    cal = speed_model.calibration()
    assert len(speed_model.MEASURED_STEPS) == len(cal.error) == 15
    for m, error in zip(speed_model.MEASURED_STEPS, cal.error, strict=True):
        spec = spec_for(m.gpu_model)
        assert spec is not None
        modelled = speed_model.modelled_seconds(spec, m.work, cal.tensor_fraction[m.case], cal)
        assert modelled == pytest.approx(m.plain_seconds, rel=0.07), m
        assert error == pytest.approx(modelled / m.plain_seconds - 1)
    assert set(cal.tensor_fraction) == {"sd15", "sdxl", "flux"}
    assert all(0.1 < fraction < 0.7 for fraction in cal.tensor_fraction.values())
    assert 0.5 < cal.bandwidth_factor < 3.0
    # at least the idle gap the H200 profile showed between kernels (3.7 ms over 3,540 kernels, bench/RESULTS.md)
    assert 3.7e-3 / 3540 < cal.kernel_seconds < 10e-6


def test_measured_settings_give_the_measured_figure_and_others_are_modelled():
    h200 = seconds_per_step("H200", sd15())
    assert (h200.seconds_per_step, h200.kind) == (0.0385, "measured")
    h100 = seconds_per_step("H100 SXM", sdxl())  # measured three times: 119.9, 120.1 and 119.9 ms
    assert (h100.seconds_per_step, h100.kind) == (pytest.approx(0.1199667), "measured") and "sixth" in h100.source
    assert seconds_per_step("H100 SXM", sdxl(batch_size=1)).seconds_per_step == 0.0775
    other = seconds_per_step("H100 SXM", sdxl(batch_size=4))
    assert other.kind == "modelled" and other.seconds_per_step > 0.1201
    assert seconds_per_step("H100 SXM", sd15(network_dim=64)).kind == "modelled"
    assert seconds_per_step("H100 PCIe", sdxl()).kind == "modelled"


def test_no_speed_figure_comes_from_another_trainer():
    for profile in (sd15(), sdxl(), sd15(batch_size=1), sdxl(resolution=(768, 768))):
        for spec in GPU_SPECS:
            speed = seconds_per_step(spec.model, profile, spec.vram_gb)
            assert speed is not None and speed.kind in ("measured", "modelled")
            assert "kohya" not in speed.source


def test_a_4090_sd15_step_is_modelled_from_our_trainer_not_kohya():
    """The old table scaled kohya's 2023 RTX 3090 Ti figure (0.50 s at batch 4) to ~0.35 s on a 4090."""
    speed = seconds_per_step("RTX 4090", sd15())
    assert speed.kind == "modelled" and "rentrain.step_work" in speed.source
    assert 0.08 < speed.seconds_per_step < 0.2
    assert speed.high < 0.25


def test_the_4090_vs_h100_ranking_follows_the_model():
    """The H100 wins exactly when its price is below the break-even price the modelled step times give."""
    profile = sd15(steps=20_000)
    consumer = estimate_job(profile, card("RTX 4090", 0.40))
    assert consumer is not None
    h100_seconds = seconds_per_step("H100 SXM", profile).seconds_per_step
    overhead_h = consumer.overhead_hours
    h100_hours = profile.steps * h100_seconds / 3600 + overhead_h
    break_even = consumer.cost_usd / h100_hours
    cheaper, dearer = card("H100 SXM", break_even * 0.97), card("H100 SXM", break_even * 1.03)
    assert rank([card("RTX 4090", 0.40), cheaper], profile)[0].offer.gpu_model == "H100 SXM"
    assert rank([card("RTX 4090", 0.40), dearer], profile)[0].offer.gpu_model == "RTX 4090"
    # at typical market prices the 4090 trains an SD 1.5 LoRA for less
    assert rank([card("H100 SXM", 2.20), card("RTX 4090", 0.40)], profile)[0].offer.gpu_model == "RTX 4090"


def test_geforce_cards_use_the_float32_accumulate_tensor_rate():
    assert spec_for("RTX 4090").bf16_tflops == 165.2  # not the 330 of FP16 accumulation
    assert spec_for("RTX 3090").bf16_tflops == 71.0
    geforce = {"RTX 3090", "RTX 3090 Ti", "RTX 4090", "RTX 4090D", "RTX 5090"}
    assert {s.model for s in GPU_SPECS if s.efficiency_class == "geforce"} == geforce


def test_the_a100_memory_size_picks_its_row():
    assert spec_for("A100 SXM", 40).bandwidth_gbs == 1555 and spec_for("A100 SXM", 79.6).bandwidth_gbs == 2039
    small = seconds_per_step("A100 SXM", sdxl(), 40).seconds_per_step
    large = seconds_per_step("A100 SXM", sdxl(), 80).seconds_per_step
    assert large < small


def test_every_provider_card_of_24_to_48_gb_and_the_data_centre_cards_have_a_spec():
    models = {spec.model for spec in GPU_SPECS}
    wanted = {"RTX 3090", "RTX 3090 Ti", "RTX 4090", "RTX 5090", "RTX A5000", "RTX A6000", "RTX 6000 Ada"}
    wanted |= {"RTX 5000 Ada", "RTX 4500 Ada", "L4", "A10", "A30", "A40", "L40", "L40S"}
    wanted |= {"A100 PCIe", "A100 SXM", "H100 PCIe", "H100 SXM", "H100 NVL", "H200"}
    assert wanted <= models
    for spec in GPU_SPECS:
        assert spec.bf16_tflops > 0 and spec.bandwidth_gbs > 0 and len(spec.source) > 20


# ------------------------------------------------------------------------------------------ cards not measured


# The diffusers PyTorch 2.0 benchmark (huggingface.co/docs/diffusers/optimization/torch2.0): SD 1.5 txt2img at
# batch 16 (32 UNet samples a step with guidance), the same code on each card. Newer table: iterations/s
# (torch 2.0 / nightly, without and with torch.compile); older table: seconds for 50 steps (SDPA, + compile).
DIFFUSERS_ITERATIONS_PER_S = {
    "A100": (3.04, 3.6, 3.83, 4.68),
    "RTX 3090": (1.7, 1.69, 1.93, 1.91),
    "RTX 4090": (3.17, 3.2, 3.84, 3.85),
}
DIFFUSERS_SECONDS_PER_50 = {
    "A100": (13.67, 12.25),
    "A10": (38.31, 36.81),
    "RTX 3090": (29.06, 28.2),
    "RTX 3090 Ti": (26.28, 25.46),
}
# One such UNet call, counted by `python bench/step_work.py --inference`
UNET_CALL = Work(flop=25.705e12, bytes=50.36e9, kernels=728)


def implied_fraction(gpu: str, seconds: float) -> float:
    """The tensor fraction at which the model gives this step time on this card."""
    cal = speed_model.calibration()
    spec = spec_for(gpu, 40)  # the benchmark's A100 had 40 GB
    assert spec is not None
    memory = UNET_CALL.bytes / (spec.bandwidth_gbs * 1e9 * cal.bandwidth_factor)
    tensor_seconds = seconds - memory - UNET_CALL.kernels * cal.kernel_seconds
    return UNET_CALL.flop / (spec.bf16_tflops * 1e12 * tensor_seconds)


def test_the_class_factors_contain_what_the_public_benchmark_implies():
    """Each card's tensor fraction relative to the A100's, per column of the benchmark, lies in its class's
    stated range (rentrain.speed_model.EFFICIENCY), and the central factor lies among them."""
    implied: dict[str, list[float]] = {}
    seconds_tables = (
        {gpu: [1 / v for v in values] for gpu, values in DIFFUSERS_ITERATIONS_PER_S.items()},
        {gpu: [v / 50 for v in values] for gpu, values in DIFFUSERS_SECONDS_PER_50.items()},
    )
    for table in seconds_tables:
        for column, a100_seconds in enumerate(table["A100"]):
            a100 = implied_fraction("A100 PCIe", a100_seconds)
            for gpu, seconds in table.items():
                if gpu != "A100":
                    implied.setdefault(gpu, []).append(implied_fraction(gpu, seconds[column]) / a100)
    for gpu, factors in implied.items():
        spec = spec_for(gpu)
        assert spec is not None
        efficiency = speed_model.EFFICIENCY[spec.efficiency_class]
        assert efficiency.low <= min(factors) and max(factors) <= efficiency.high, (gpu, factors)
    geforce = [f for gpu, factors in implied.items() if gpu.startswith("RTX") for f in factors]
    assert min(geforce) <= speed_model.EFFICIENCY["geforce"].factor <= max(geforce)
    assert min(implied["A10"]) <= speed_model.EFFICIENCY["pro"].factor <= max(implied["A10"])


# ------------------------------------------------------------------------------------------ ranges


@pytest.mark.parametrize(
    "profile",
    [
        sd15(),
        sdxl(),
        sd15(batch_size=1, resolution=(768, 768), trains_text_encoder=False),
        sdxl(network_dim=128, gradient_checkpointing=True),
        sd15(bytes_per_value=4),
        JobProfile(family="sd15", builtin_tiny=True, steps=100, batch_size=2, resolution=(64, 64)),
    ],
)
def test_ranges_contain_the_point_estimate(profile):
    for spec in GPU_SPECS:
        speed = seconds_per_step(spec.model, profile, spec.vram_gb)
        assert speed.low < speed.seconds_per_step < speed.high, spec.model
        estimate = estimate_job(profile, card(spec.model, 1.0, spec.vram_gb))
        if estimate is None:  # does not fit this card's memory
            continue
        assert estimate.cost_low_usd <= estimate.cost_usd <= estimate.cost_high_usd
        assert estimate.total_hours_low <= estimate.total_hours <= estimate.total_hours_high
        assert estimate.total_hours_high - estimate.total_hours == pytest.approx(
            estimate.train_hours * (speed.high / speed.seconds_per_step - 1), rel=1e-6
        )


def test_a_queue_share_keeps_a_range_around_its_point():
    """queue_plan re-prices the setup of a shared rental: the range follows the new point."""
    from rentrain.offers import RankedOffer

    offer = card("RTX 4090", 0.4)
    alone = estimate_job(sd15(), offer)
    shares = shares_on([sd15(), sd15()], RankedOffer(offer=offer, estimate=alone))
    assert shares is not None
    for share in shares:
        assert share.cost_usd < alone.cost_usd
        assert share.cost_low_usd < share.cost_usd < share.cost_high_usd


def test_estimates_recorded_before_ranges_still_load():
    old = (
        '{"steps": 100, "seconds_per_step": 0.5, "speed_kind": "scaled", "speed_source": "kohya", "gpus": 1, '
        '"train_hours": 0.1, "overhead_hours": 0.2, "total_hours": 0.3, "price_per_hour": 1.0, "cost_usd": 0.3}'
    )
    estimate = JobEstimate.model_validate_json(old)
    assert estimate.cost_low_usd == estimate.cost_usd == estimate.cost_high_usd == 0.3


def test_a_sample_costs_more_in_a_smaller_batch():
    """Each kernel has a fixed cost (fitted), and a smaller batch runs as many kernels for less work."""
    for profile in (sd15(), sdxl()):
        full = seconds_per_step("H100 PCIe", profile).seconds_per_step
        one = seconds_per_step("H100 PCIe", profile.model_copy(update={"batch_size": 1})).seconds_per_step
        assert one > full / profile.batch_size * 1.1


# ---- Flux.1: counted work, measured on the H100 at kohya's recipe ---------------------------------------------


def flux(**kw) -> JobProfile:
    """Flux.1 [dev] at 1024px, batch 1, transformer LoRA dim 16, the frozen transformer in 8 bits."""
    base = {"family": "flux", "steps": 1000, "resolution": (1024, 1024), "network_dim": 16, "fp8_base": True}
    return JobProfile(**{**base, **kw})


def test_flux_on_a_24_gb_card_is_modelled_and_fits_with_fp8_base_checkpointed():
    speed = seconds_per_step("RTX 4090", flux(), 24)
    assert speed is not None and speed.kind == "modelled" and "geforce cards" in speed.source
    assert speed.low < speed.seconds_per_step < speed.high
    fit = speed_model.memory_fit(flux(), 24)
    assert fit is not None and "gradient checkpointing" in fit[1]  # 1024px fits only checkpointed


def test_flux_is_refused_on_16_gb_and_in_bf16_on_24_gb():
    assert speed_model.memory_fit(flux(), 16) is None
    assert speed_model.memory_fit(flux(fp8_base=False), 24) is None
    assert speed_model.memory_fit(flux(fp8_base=False), 48) is not None


def test_flux_estimate_on_a_24_gb_offer_and_none_on_16_gb():
    assert estimate_job(flux(), card("RTX 4090", 0.5, 24)) is not None
    assert estimate_job(flux(), card("RTX 4090", 0.5, 16)) is None


def test_flux_work_grows_with_tokens_not_pixels():
    """Flux.1's 1024px sample has 4096 + 512 tokens, its 512px one 1024 + 512: the products scale by that
    ratio and attention by its square (bench/step_work.py --flux checks the rule against direct counts)."""
    w = FAMILY_WORK["flux"]
    big = step_work("flux", 1024 * 1024, 1, 32, False)
    small = step_work("flux", 512 * 512, 1, 32, False)
    ratio = (1024 + 512) / (4096 + 512)
    assert small.flop == pytest.approx(w.sample_flop * ratio + w.sample_attention_flop * ratio**2)
    assert big.flop == pytest.approx(w.sample_flop + w.sample_attention_flop)
    assert small.flop / big.flop > (512 * 512) / (1024 * 1024)  # more than the pixel ratio: the text tokens


def test_fp8_base_adds_the_weight_upcasts_and_leaves_the_flops():
    plain = step_work("flux", 1024 * 1024, 1, 16, False)
    fp8 = step_work("flux", 1024 * 1024, 1, 16, False, fp8_base=True)
    assert fp8.flop == plain.flop
    # forward and backward, each one Triton kernel per Linear (1 byte read, 2 written)
    assert fp8.bytes - plain.bytes == pytest.approx(2 * 3 * FAMILY_WORK["flux"].frozen_linear_params)
    assert fp8.kernels - plain.kernels == 2 * 1 * FAMILY_WORK["flux"].frozen_linears


def test_flux_at_its_measured_settings_gets_the_measured_time_and_checkpointing_is_not_applied_twice():
    measured = seconds_per_step("H100 SXM", flux(gradient_checkpointing=True, fit_memory=False))
    assert measured is not None and measured.kind == "measured"
    assert measured.seconds_per_step == pytest.approx(0.7330)
    assert "733.0 ms" in measured.source
    at_512 = seconds_per_step("H100 SXM", flux(gradient_checkpointing=True, resolution=(512, 512), fit_memory=False))
    assert at_512 is not None and at_512.seconds_per_step == pytest.approx(0.2638)
    plain = seconds_per_step("H100 SXM", flux())
    assert plain is not None and plain.kind == "measured" and plain.seconds_per_step == pytest.approx(0.5293)
    # another rank or without the 8-bit base were not measured
    for other in (
        flux(gradient_checkpointing=True, network_dim=32),
        flux(gradient_checkpointing=True, fp8_base=False),
    ):
        speed = seconds_per_step("H100 SXM", other)
        assert speed is not None and speed.kind == "modelled", other


def test_checkpointing_asked_for_is_dropped_in_the_estimate_only_where_measured_activations_fit():
    factor, note = speed_model.memory_fit(sdxl(gradient_checkpointing=True), 80)
    assert factor == pytest.approx(1 / 1.37, rel=0.01) and "faster on 80 GB (no gradient checkpointing" in note
    assert speed_model.memory_fit(sdxl(gradient_checkpointing=True), 12) == (1.0, "")  # 12 GB needs it
    # Flux.1's activations without checkpointing were measured: 43.5 GiB at 1024px, 23.2 at 512px
    factor, note = speed_model.memory_fit(flux(gradient_checkpointing=True), 80)
    assert factor == pytest.approx(1 / 1.39, rel=0.01) and "no gradient checkpointing" in note
    # on 24 GB its last 12 blocks of 57 run without checkpointing (remote/trainer/memory.py)
    factor, note = speed_model.memory_fit(flux(gradient_checkpointing=True), 24)
    assert factor == pytest.approx((1 + 0.39 * 45 / 57) / 1.39) and "no checkpointing of the last 12 blocks" in note
    # asked for without checkpointing, it is turned on but for those blocks
    factor, note = speed_model.memory_fit(flux(), 24)
    assert factor == pytest.approx(1 + 0.39 * 45 / 57) and "gradient checkpointing but for the last 12 blocks" in note


def test_without_fit_memory_the_estimate_is_the_configured_setting_or_none():
    as_written = sdxl(gradient_checkpointing=True, fit_memory=False)
    assert speed_model.memory_fit(as_written, 80) == (1.0, "")  # not sped up by a plan that will not run
    assert speed_model.memory_fit(sdxl(batch_size=4, fit_memory=False), 24) is None  # 4 x 1024px would not fit
    assert speed_model.memory_fit(sdxl(batch_size=4), 24) is not None  # the planner would split it
