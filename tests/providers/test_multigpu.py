"""`--gpus N`: N-GPU offers from every market, the data-parallel estimate, and clear errors for bad counts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import responses
from click.testing import CliRunner
from responses import matchers

from providers.base import Offer
from remote.buckets import StepPlan
from remote.config import load_config
from rentrain import job_profile, speed_model
from rentrain.cli import main
from rentrain.costs import estimate_job
from rentrain.job_profile import JobProfile, profile_from_config, steps_on
from rentrain.multigpu import plan_with_gpus
from rentrain.setup_time import setup_seconds
from rentrain.speed_model import scaling_efficiency

from .conftest import RUNPOD_URL, VAST_URL, load

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "config.toml"
RUNPOD_PER_GPU_COMMUNITY_4090 = 0.31  # runpod_catalog_community.json
DISK_PER_HOUR = 2 * 40 * 0.10 / 730  # a 40 GB container disk and a 40 GB volume at $0.10/GB-month


def vast_machines(gpus: int) -> dict:
    """The documented bundle shapes as N-GPU machines: dph_total is the whole machine's price."""
    data = load("vast_bundles.json")
    for offer in data["offers"]:
        offer["num_gpus"] = gpus
        offer["dph_total"] = round(offer["dph_total"] * gpus, 4)
    return data


def record_markets(mocked, gpus: int, runpod: bool = True) -> None:
    mocked.add(responses.POST, f"{VAST_URL}/bundles/", json=vast_machines(gpus))
    if not runpod:
        return
    for cloud, fixture in (("COMMUNITY", "runpod_catalog_community.json"), ("SECURE", "runpod_catalog_secure.json")):
        params = {
            "include": "AVAILABILITY",
            "product": "POD",
            "cloud": cloud,
            "count": str(gpus),
            "minCudaVersion": "12.1",
        }
        mocked.add(
            responses.GET,
            f"{RUNPOD_URL}/v2/catalog/gpus",
            json=load(fixture),
            match=[matchers.query_param_matcher(params)],
        )


def vast_search_body(mocked) -> dict:
    return json.loads(next(c for c in mocked.calls if "bundles" in c.request.url).request.body)


def config_with_gpu_count(tmp_path: Path, gpu_count: int) -> Path:
    shutil.copytree(EXAMPLE.parent / "dataset", tmp_path / "dataset")
    text = EXAMPLE.read_text().replace('provider = "local"', f'provider = "local"\ngpu_count = {gpu_count}')
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ the search


def test_gpus_reaches_both_markets_and_prices_are_whole_machines(mocked, markets):
    record_markets(mocked, gpus=2)  # the RunPod mocks match only count=2
    result = CliRunner().invoke(main, ["offers", "--json", "--gpus", "2", "--provider", "vast", "--provider", "runpod"])
    assert result.exit_code == 0, result.output
    assert vast_search_body(mocked)["num_gpus"] == {"eq": 2}
    data = json.loads(result.output)
    assert data["requirements"]["gpu_count"] == 2
    assert {o["gpu_count"] for o in data["offers"]} == {2}
    by_id = {o["offer_id"]: o for o in data["offers"]}
    assert by_id["3001"]["price_per_hour"] == vast_machines(2)["offers"][1]["dph_total"]  # Vast: dph_total as is
    runpod_4090 = by_id["COMMUNITY/NVIDIA GeForce RTX 4090"]
    assert runpod_4090["price_per_hour"] == pytest.approx(2 * RUNPOD_PER_GPU_COMMUNITY_4090 + DISK_PER_HOUR, abs=1e-4)


def test_the_flag_overrides_the_config_and_the_config_counts_without_it(mocked, markets, tmp_path):
    config = config_with_gpu_count(tmp_path, 4)
    record_markets(mocked, gpus=4)
    record_markets(mocked, gpus=2)
    from_config = CliRunner().invoke(
        main, ["offers", "--json", "--config", str(config), "--provider", "vast", "--provider", "runpod"]
    )
    from_flag = CliRunner().invoke(
        main, ["offers", "--json", "--config", str(config), "--gpus", "2", "--provider", "vast", "--provider", "runpod"]
    )
    assert from_config.exit_code == 0 and from_flag.exit_code == 0, from_config.output + from_flag.output
    sent = [json.loads(c.request.body)["num_gpus"] for c in mocked.calls if "bundles" in c.request.url]
    assert sent == [{"eq": 4}, {"eq": 2}]
    assert json.loads(from_flag.output)["requirements"]["gpu_count"] == 2


def test_the_table_shows_the_gpu_count(mocked, markets):
    record_markets(mocked, gpus=2)
    result = CliRunner().invoke(
        main, ["offers", "--gpus", "2", "--config", str(EXAMPLE), "--provider", "vast", "--provider", "runpod"]
    )
    assert result.exit_code == 0, result.output
    assert "2x RTX 3090 24 GB" in result.output and "2x RTX 4090" in result.output
    assert "Requirements: 2 GPUs" in result.output


@pytest.mark.parametrize("command", [["offers"], ["estimate", "--config", str(EXAMPLE)], ["run", str(EXAMPLE)]])
@pytest.mark.parametrize("value", ["0", "9", "-1", "two"])
def test_bad_gpu_counts_are_clear_errors(command, value):
    result = CliRunner().invoke(main, [*command, "--gpus", value])
    assert result.exit_code == 2
    assert "Invalid value for '--gpus'" in result.output
    if value != "two":
        assert "1 to 8 GPUs" in result.output


# ------------------------------------------------------------------------------------------ the cost model


def gpu_offer(gpu_model: str, gpus: int, price: float) -> Offer:
    return Offer(
        provider="vast",
        offer_id=f"{gpu_model}/{gpus}",
        gpu_model=gpu_model,
        gpu_name_raw=gpu_model,
        gpu_count=gpus,
        vram_gb=24,
        price_per_hour=price,
        download_mbps=800,
    )


def sdxl_epochs(**kw) -> JobProfile:
    """SDXL, 10 epochs of 101 batches: an odd count, so the ceil of the split shows."""
    return JobProfile(
        **{"family": "sdxl", "steps": 1010, "epochs": 10, "batches_per_epoch": 101, "resolution": (1024, 1024), **kw}
    )


def test_two_pcie_gpus_halve_the_steps_and_pay_the_assumed_efficiency():
    profile = sdxl_epochs()
    one = estimate_job(profile, gpu_offer("RTX 3090", 1, 0.2))
    two = estimate_job(profile, gpu_offer("RTX 3090", 2, 0.4))
    efficiency = speed_model.DATA_PARALLEL_EFFICIENCY["pcie"][2].value
    steps = 10 * math.ceil(101 / 2)
    step_seconds = speed_model.seconds_per_step("RTX 3090", profile, 24).seconds_per_step / efficiency
    assert two.steps == steps and two.gpus == 2
    assert two.seconds_per_step == pytest.approx(step_seconds)
    assert two.train_hours == pytest.approx(steps * step_seconds / 3600)
    assert two.train_hours < one.train_hours
    assert two.train_hours == pytest.approx(one.train_hours * (steps / 1010) / efficiency)
    offer = gpu_offer("RTX 3090", 2, 0.4)
    assert two.overhead_hours == pytest.approx(sum(setup_seconds(profile, offer).values()) / 3600)
    # the offer's price is the whole machine's: both GPUs, once
    assert two.cost_usd == pytest.approx(two.total_hours * 0.4, abs=0.001)
    assert two.scaling is not None and two.scaling.kind == "assumed" and two.scaling.efficiency == efficiency
    assert one.scaling is None


def test_nvlink_boards_use_their_row_and_counts_between_rows_interpolate():
    assert scaling_efficiency("H100 SXM", 8).efficiency == speed_model.DATA_PARALLEL_EFFICIENCY["nvlink"][8].value
    assert scaling_efficiency("RTX 4090", 8).efficiency == speed_model.DATA_PARALLEL_EFFICIENCY["pcie"][8].value
    rows = speed_model.DATA_PARALLEL_EFFICIENCY["pcie"]
    assert scaling_efficiency("RTX 4090", 3).efficiency == pytest.approx((rows[2].value + rows[4].value) / 2)
    assert scaling_efficiency("RTX 4090", 6).kind == "assumed"
    assert scaling_efficiency("RTX 4090", 1).efficiency == 1.0


def test_the_efficiency_table_is_an_assumption_and_falls_with_more_gpus():
    for rows in speed_model.DATA_PARALLEL_EFFICIENCY.values():
        values = [rows[n].value for n in sorted(rows)]
        assert values == sorted(values, reverse=True) and all(0 < v <= 1 for v in values)
        assert all(f.kind == "assumed" and len(f.source) > 10 for f in rows.values())
    for gpus in (2, 4, 8):
        assert (
            speed_model.DATA_PARALLEL_EFFICIENCY["nvlink"][gpus].value
            >= speed_model.DATA_PARALLEL_EFFICIENCY["pcie"][gpus].value
        )


def test_a_fixed_step_count_stays_and_each_step_trains_more():
    profile = JobProfile(family="sdxl", steps=1000, resolution=(1024, 1024))  # max_train_steps: no epochs
    two = estimate_job(profile, gpu_offer("RTX 3090", 2, 0.4))
    assert two.steps == 1000 == steps_on(profile, 2)
    efficiency = speed_model.DATA_PARALLEL_EFFICIENCY["pcie"][2].value
    one_gpu_step = speed_model.seconds_per_step("RTX 3090", profile, 24).seconds_per_step
    assert two.train_hours == pytest.approx(1000 * one_gpu_step / efficiency / 3600)


def test_steps_per_epoch_divide_by_ranks_and_accumulation():
    assert job_profile.steps_per_epoch(101, 1) == 101
    assert job_profile.steps_per_epoch(101, 2) == 51
    assert job_profile.steps_per_epoch(101, 2, 2) == 26
    assert job_profile.steps_per_epoch(8, 8) == 1
    profile = sdxl_epochs(gradient_accumulation_steps=2)
    assert steps_on(profile, 4) == 10 * math.ceil(101 / 8)


def test_the_step_plan_with_gpus_matches_the_estimate():
    loaded = load_config(EXAMPLE)
    profile = profile_from_config(EXAMPLE)
    assert (profile.epochs, profile.batches_per_epoch) == (2, 100)  # 20 images x 10 repeats / batch 2
    plan = StepPlan(
        bucket_samples={"64x64": 200},
        samples_per_epoch=200,
        batches_per_epoch=100,
        steps_per_epoch=100,
        epochs=2,
        total_steps=200,
    )
    for gpus in (1, 2, 3, 8):
        assert plan_with_gpus(plan, loaded.train, gpus).total_steps == steps_on(profile, gpus)
    assert plan_with_gpus(plan, loaded.train, 3).steps_per_epoch == 34
    by_steps = loaded.train.model_copy(update={"max_train_epochs": None, "max_train_steps": 150})
    fixed = plan_with_gpus(plan.model_copy(update={"total_steps": 150}), by_steps, 2)
    assert (fixed.total_steps, fixed.steps_per_epoch, fixed.epochs) == (150, 50, 3)


def test_estimate_says_the_scaling_is_assumed(mocked, markets):
    record_markets(mocked, gpus=2, runpod=False)
    table = CliRunner().invoke(main, ["estimate", "--config", str(EXAMPLE), "--gpus", "2", "--provider", "vast"])
    assert table.exit_code == 0, table.output
    text = " ".join(table.output.split())
    assert "ASSUMED from published DDP scaling, not measured by rentrain" in text
    assert f"pcie {speed_model.DATA_PARALLEL_EFFICIENCY['pcie'][2].value:.2f}" in text
    assert "100 steps on 2 GPUs (200 on one)" in text and "2x RTX 3090" in text


def test_estimate_json_carries_the_scaling(mocked, markets):
    record_markets(mocked, gpus=2, runpod=False)
    result = CliRunner().invoke(
        main, ["estimate", "--config", str(EXAMPLE), "--gpus", "2", "--json", "--provider", "vast"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    best = data["best_per_provider"][0]["estimate"]
    assert best["gpus"] == 2 and best["steps"] == 100
    assert best["scaling"]["kind"] == "assumed" and best["scaling"]["interconnect"] == "pcie"
    assert "ASSUMED" in data["scaling_note"]


def test_estimate_without_prices_still_scales(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(main, ["estimate", "--config", str(EXAMPLE), "--gpus", "4", "--json"])
    data = json.loads(result.output)
    rows = {row["gpu"]: row for row in data["without_prices"]}
    single = speed_model.seconds_per_step("RTX 4090", profile_from_config(EXAMPLE)).seconds_per_step
    assert rows["4x RTX 4090"]["seconds_per_step"] == pytest.approx(
        single / speed_model.DATA_PARALLEL_EFFICIENCY["pcie"][4].value
    )
    assert "ASSUMED" in data["scaling_note"]
