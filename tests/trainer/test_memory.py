"""Memory planning: estimates against the H200 measurements, and the setting chosen for smaller cards."""

from __future__ import annotations

import pytest

from remote.trainer import data as data_mod
from remote.trainer.memory import (
    GIB,
    INTERPOLATED_MARGIN_GIB,
    Footprint,
    Setting,
    budget_from_device,
    candidates,
    estimate_gib,
    fit_config,
    footprint_for,
    plan_memory,
    step_cost,
)

# Parameter counts of the real architectures (bench/train_speed.py builds them from these configs): UNet, CLIP-L,
# and the LoRA at dim 32 on kohya's module set.
SD15_UNET, SD15_TE, SD15_LORA_UNET_TE, SD15_LORA_UNET = 859_520_964, 123_060_480, 18_874_368, 13_565_952
SDXL_UNET, SDXL_LORA = 2_567_463_684, 85_114_880


def sd15(trains_te: bool = True, pixels: int = 512 * 512) -> Footprint:
    weights = (SD15_UNET + (SD15_TE if trains_te else 0)) * 2 / GIB
    return Footprint("sd15", weights, SD15_LORA_UNET_TE if trains_te else SD15_LORA_UNET, pixels)


def sdxl(pixels: int = 1024 * 1024) -> Footprint:
    return Footprint("sdxl", SDXL_UNET * 2 / GIB, SDXL_LORA, pixels)


def flux(pixels: int) -> Footprint:
    return footprint_for("flux", pixels, 16, False, fp8_base=True)  # kohya's recipe: dim 16, 8-bit base


# (footprint, setting, peak GiB measured by bench/train_speed.py on the H200, Flux.1 by bench/flux_speed.py on the
# H100; bench/RESULTS.md). Micro-batches of
# 2 and 1 were measured as batch_size 2 / 1 with accumulation 2: the same shapes as one batch split in two.
MEASURED = [
    (sd15(), Setting(4, 4, False), 6.14),
    (sd15(), Setting(4, 2, False), 4.08),
    (sd15(), Setting(2, 2, False), 4.25),  # under a 12 GiB cap
    (sd15(), Setting(4, 4, True), 3.27),
    (sd15(trains_te=False), Setting(4, 4, False), 5.70),
    (sdxl(), Setting(2, 2, False), 19.44),
    (sdxl(), Setting(2, 1, False), 12.36),
    (sdxl(), Setting(2, 2, True), 7.88),
    (sdxl(), Setting(4, 2, False), 18.80),  # batch 4 planned under a 24 GiB cap
    (flux(1024 * 1024), Setting(1, 1, True), 15.12),
    (flux(512 * 512), Setting(1, 1, True), 13.65),
    (flux(1024 * 1024), Setting(1, 1, False), 43.51),
    (flux(512 * 512), Setting(1, 1, False), 23.22),
]


@pytest.mark.parametrize(("footprint", "setting", "measured"), MEASURED)
def test_estimates_cover_the_measured_peaks_closely(footprint, setting, measured):
    estimate = estimate_gib(footprint, setting)
    assert measured <= estimate <= measured * 1.06, estimate


def test_estimated_step_times_follow_the_measured_ones():
    assert step_cost(sd15(), Setting(4, 2, False)) / step_cost(sd15(), Setting(4, 4, False)) == pytest.approx(
        65.1 / 59.4, rel=0.02
    )
    assert step_cost(sdxl(), Setting(2, 1, False)) / step_cost(sdxl(), Setting(2, 2, False)) == pytest.approx(
        173.8 / 134.6, rel=0.02
    )
    assert step_cost(sdxl(), Setting(2, 2, True)) / step_cost(sdxl(), Setting(2, 2, False)) == pytest.approx(
        184.4 / 134.6, rel=0.02
    )


def _card(gib: float) -> float:
    return budget_from_device(int(gib * GIB))


def test_the_issue_cases_run_as_configured():
    for footprint, batch, card in ((sdxl(), 2, 24), (sd15(), 4, 24), (sd15(), 2, 12)):
        configured = Setting(batch, batch, False)
        plan = plan_memory(footprint, configured, _card(card), allow_8bit=True)
        assert plan.setting == configured and plan.fits and plan.relative_time == 1.0
        assert "as configured" in plan.describe(configured)


def test_batches_split_evenly_into_the_fewest_parts():
    from remote.trainer.memory import part_sizes

    assert part_sizes(4, 3) == [2, 2] and part_sizes(5, 2) == [2, 2, 1] and part_sizes(7, 3) == [3, 2, 2]
    assert part_sizes(4, None) == [4] and part_sizes(4, 4) == [4] and part_sizes(3, 1) == [1, 1, 1]
    # micro-batch 3 of a batch of 4 would be 2 + 2 anyway: the candidates are the distinct even splits
    settings = candidates(Setting(4, 4, True), allow_8bit=False)
    assert [(s.micro_batch, s.checkpointing) for s in settings] == [(m, c) for m in (4, 2, 1) for c in (False, True)]


def test_a_too_large_batch_is_split_where_splitting_is_faster_than_checkpointing():
    configured = Setting(2, 2, False)
    plan = plan_memory(sdxl(), configured, _card(16), allow_8bit=True)  # 19.6 GiB needed
    assert plan.setting == Setting(2, 1, False) and plan.fits
    assert plan.relative_time == pytest.approx(173.8 / 134.6, rel=0.01)
    assert "each batch of 2 runs as 2 micro-batches of up to 1" in plan.describe(configured)


def test_checkpointing_when_even_one_image_does_not_fit():
    plan = plan_memory(sdxl(), Setting(1, 1, False), _card(12), allow_8bit=True)
    assert plan.setting == Setting(1, 1, True) and plan.fits
    assert "gradient checkpointing on" in plan.describe(Setting(1, 1, False))


def test_large_batches_take_the_cheapest_fitting_mix_of_splitting_and_checkpointing():
    configured = Setting(8, 8, False)
    plan = plan_memory(sdxl(), configured, _card(24), allow_8bit=True)
    options = [s for s in candidates(configured, allow_8bit=False) if estimate_gib(sdxl(), s) <= _card(24)]
    assert plan.fits and plan.setting == min(options, key=lambda s: step_cost(sdxl(), s))
    assert plan.setting.batch == 8  # the batch itself never changes
    odd = plan_memory(sdxl(), Setting(3, 3, False), _card(24), allow_8bit=True).setting
    assert odd.micro_batch == 2 and odd.micro_batches == 2  # 3 images: a part of 2 and a part of 1


def test_eight_bit_adam_only_when_nothing_else_fits():
    tiny_card = estimate_gib(sdxl(), Setting(1, 1, True)) - 0.1  # just below the smallest fp32-state option
    plan = plan_memory(sdxl(), Setting(1, 1, False), tiny_card, allow_8bit=True)
    assert plan.setting == Setting(1, 1, True, adam_8bit=True) and plan.fits
    refused = plan_memory(sdxl(), Setting(1, 1, False), tiny_card, allow_8bit=False)
    assert not refused.fits and refused.setting == Setting(1, 1, True)
    assert "may not fit" in refused.describe(Setting(1, 1, False))


def test_fp32_activations_count_double():
    bf16 = estimate_gib(sd15(), Setting(4, 4, False))
    fp32 = Footprint("sd15", sd15().weights_gib, SD15_LORA_UNET_TE, 512 * 512, activation_scale=2.0)
    assert estimate_gib(fp32, Setting(4, 4, False)) == pytest.approx(bf16 + 4 * 1.04, rel=1e-6)


def test_fit_config_leaves_batches_alone_and_returns_the_micro_batch(make_config):
    _, cfg = make_config(batch_size=2, gradient_accumulation_steps=1)
    footprint = Footprint("sdxl", SDXL_UNET * 2 / GIB, SDXL_LORA, 1024 * 1024)
    fitted, micro_batch, _, text = fit_config(cfg, footprint, _card(16))
    assert micro_batch == 1 and "2 micro-batches" in text
    assert (fitted.batch_size, fitted.gradient_accumulation_steps, fitted.gradient_checkpointing) == (2, 1, False)
    same, micro_batch, _, text = fit_config(cfg, footprint, _card(80))
    assert micro_batch is None and same.batch_size == 2 and "as configured" in text


def test_a_resumed_run_never_switches_to_eight_bit_state(make_config, monkeypatch):
    from remote.trainer import memory

    monkeypatch.setattr(memory, "bitsandbytes_available", lambda: True)
    _, cfg = make_config(batch_size=1, optimizer_type="AdamW")
    footprint = Footprint("sdxl", SDXL_UNET * 2 / GIB, SDXL_LORA, 1024 * 1024)
    squeezed = estimate_gib(footprint, Setting(1, 1, True)) - 0.1  # only 8-bit AdamW state would fit
    fitted, _, _, _ = fit_config(cfg, footprint, squeezed)
    assert fitted.optimizer_type == "AdamW8bit"
    fitted, _, _, text = fit_config(cfg, footprint, squeezed, resuming=True)  # AdamW moments cannot become 8-bit
    assert fitted.optimizer_type == "AdamW" and "may not fit" in text
    monkeypatch.setattr(memory, "bitsandbytes_available", lambda: False)
    fitted, _, _, _ = fit_config(cfg, footprint, squeezed)
    assert fitted.optimizer_type == "AdamW"  # without bitsandbytes, never


def test_a_state_resumes_only_with_the_optimizer_it_was_trained_with(make_config):
    import io
    import json
    from pathlib import Path

    from remote.events import EventWriter
    from remote.trainer.loop import Stopped, train
    from remote.trainer.state import ResumeError, find_latest_state

    _, cfg = make_config(max_train_steps=4)
    with pytest.raises(Stopped):
        train(cfg, EventWriter(None, stream=io.StringIO()), stop_after_step=2)
    state = find_latest_state(Path(cfg.output_dir))
    written = json.loads((state / "state.json").read_text())
    assert written["optimizer_type"] == "AdamW"
    (state / "state.json").write_text(json.dumps({**written, "optimizer_type": "Lion"}))
    with pytest.raises(ResumeError, match="trained with optimizer_type = Lion"):
        train(cfg, EventWriter(None, stream=io.StringIO()), resume=state)
    del written["optimizer_type"]  # a state from before the key: resumes as configured
    (state / "state.json").write_text(json.dumps(written))
    train(cfg, EventWriter(None, stream=io.StringIO()), resume=state)


def test_the_trainer_plans_from_the_cards_memory_and_its_cap(make_config, monkeypatch):
    """run_setup.fit_memory reads the card's size and the process's memory fraction (what --cap-gib sets)."""
    import torch

    from remote.trainer import run_setup
    from remote.trainer.distributed import Ranks
    from remote.trainer.lora import LoRANetwork
    from remote.trainer.models import load_model

    _, cfg = make_config(batch_size=4, sizes=[(64, 64)] * 4)
    bundle = load_model(cfg)
    dataset = data_mod.build_dataset(cfg)
    network = LoRANetwork(bundle.unet, [], bundle.family, cfg.network_dim, cfg.scale_alpha)

    class Properties:
        total_memory = 24 * GIB

    seen = {}

    def fraction(device):
        seen["device"] = device
        return 0.5

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Properties())
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", fraction)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # a tiny model fits anywhere: planned as configured, against half of the 24 GiB card
    _fitted, micro_batch, _, text = run_setup.fit_memory(
        cfg, bundle, dataset, network, torch.device("cuda"), torch.bfloat16, None, Ranks()
    )
    assert seen["device"] == 0  # torch wants the index: a bare "cuda" device is refused there
    assert micro_batch is None and "of a 10.5 GiB budget; settings as configured" in text


def test_the_clients_footprints_are_the_measured_architectures():

    assert footprint_for("sd15", 512 * 512, 32, True) == sd15()
    assert footprint_for("sd15", 512 * 512, 32, False) == sd15(trains_te=False)
    assert footprint_for("sdxl", 1024 * 1024, 32, False) == sdxl()
    assert footprint_for("sdxl", 1024 * 1024, 16, False).lora_params == SDXL_LORA // 2


def test_configured_checkpointing_is_dropped_where_the_card_holds_the_activations():
    """Checkpointing trains the same function more slowly: asked for on a card with room, the plan runs without
    it and says so; on a card without room, it stays."""
    configured = Setting(2, 2, True)
    roomy = plan_memory(sdxl(), configured, _card(80), allow_8bit=True)
    assert roomy.setting == Setting(2, 2, False) and roomy.fits
    assert roomy.relative_time == pytest.approx(1 / 1.37, rel=0.01)  # SDXL's measured checkpointing factor
    assert "faster: gradient checkpointing off (the card holds the activations)" in roomy.describe(configured)
    tight = plan_memory(sdxl(), configured, _card(12), allow_8bit=True)
    assert tight.setting == configured and "settings as configured" in tight.describe(configured)


@pytest.mark.parametrize("pixels", [1024 * 1024, 512 * 512])
def test_flux_runs_without_checkpointing_on_an_80_gb_card(pixels):
    configured = Setting(1, 1, True)  # kohya's Flux.1 recipe
    roomy = plan_memory(flux(pixels), configured, _card(80), allow_8bit=True)
    assert roomy.setting == Setting(1, 1, False) and roomy.relative_time == pytest.approx(1 / 1.39, rel=0.01)


@pytest.mark.parametrize(("pixels", "unchecked"), [(1024 * 1024, 12), (512 * 512, 49)])
def test_flux_leaves_as_many_of_its_last_blocks_unchecked_as_a_24_gb_card_holds(pixels, unchecked):
    """Flux.1's 57 blocks are alike: k of them unchecked cost k / 57 of the activations checkpointing saves, and
    save k / 57 of its recompute. Such a setting is not measured: it keeps INTERPOLATED_MARGIN_GIB more room, so
    that a 24 GiB card plans at most 22 GiB."""
    configured = Setting(1, 1, True)
    plan = plan_memory(flux(pixels), configured, _card(24), allow_8bit=True)
    assert plan.setting == Setting(1, 1, True, plain_blocks=unchecked) and plan.fits
    one_more = Setting(1, 1, True, plain_blocks=unchecked + 1)
    room = _card(24) - INTERPOLATED_MARGIN_GIB
    assert estimate_gib(flux(pixels), plan.setting) <= room < estimate_gib(flux(pixels), one_more)
    assert plan.estimate_gib <= 22.0
    assert plan.relative_time == pytest.approx((1 + 0.39 * (57 - unchecked) / 57) / 1.39)
    assert f"gradient checkpointing off for the last {unchecked} blocks" in plan.describe(configured)
    # the endpoints are the measured settings: all blocks checkpointed, none
    full, none = Setting(1, 1, True), Setting(1, 1, False)
    assert estimate_gib(flux(pixels), Setting(1, 1, True, plain_blocks=57)) == pytest.approx(
        estimate_gib(flux(pixels), none)
    )
    assert estimate_gib(flux(pixels), full) < estimate_gib(flux(pixels), plan.setting)


def test_a_unet_is_checkpointed_all_or_nothing():
    """A UNet's blocks differ many times over in size: no partial setting is ever planned for SD or SDXL."""
    for footprint in (footprint_for("sd15", 512 * 512, 32, True), footprint_for("sdxl", 1024 * 1024, 32, False)):
        assert footprint.blocks == 0
        for card in (8, 12, 16, 24):
            plan = plan_memory(footprint, Setting(2, 2, True), _card(card), allow_8bit=False)
            assert plan.setting.plain_blocks == 0
