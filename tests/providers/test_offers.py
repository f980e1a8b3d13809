"""Comparing offers: concurrent query, requirement filter, ranking, and the `offers` / `estimate` commands."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import responses
from click.testing import CliRunner
from responses import matchers

from providers.base import Offer, ProviderDown, ProviderInfo
from rentrain.cli import main
from rentrain.job_profile import JobProfile
from rentrain.offers import find_offers, meets, query_providers, rank, requirements_from

from .conftest import RUNPOD_KEY, RUNPOD_URL, VAST_KEY, VAST_URL, load

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "config.toml"


def offer(**kw) -> Offer:
    base = dict(
        provider="vast",
        offer_id="1",
        gpu_model="RTX 3090",
        gpu_name_raw="RTX 3090",
        gpu_count=1,
        vram_gb=24.0,
        price_per_hour=0.2,
        reliability=0.99,
        verified=True,
        max_cuda=12.4,
        download_mbps=500,
    )
    base.update(kw)
    return Offer(**base)


# ------------------------------------------------------------------------------------------ filtering


@pytest.mark.parametrize(
    ("change", "kept"),
    [
        ({}, True),
        ({"vram_gb": 23.99}, True),  # a "24 GB" card reporting a little under
        ({"vram_gb": 16}, False),
        ({"reliability": 0.95}, False),
        ({"reliability": None}, True),  # unknown is not bad
        ({"max_cuda": 11.8}, False),
        ({"max_cuda": None}, True),
        ({"verified": False}, False),
        ({"verified": None}, True),
        ({"gpu_count": 2}, False),
        ({"interruptible": True}, False),
        ({"price_per_hour": 0.9}, False),
        ({"availability": "NONE"}, False),
        ({"availability": "LOW"}, True),
        ({"gpu_model": "RTX 4090"}, False),
    ],
)
def test_requirements(change, kept):
    req = requirements_from(max_price_per_hour=0.5, gpu_models=["RTX 3090"])
    assert meets(offer(**change), req) is kept


def test_interruptible_allowed_when_asked():
    assert meets(offer(interruptible=True), requirements_from(include_interruptible=True))


def test_requirements_from_config_then_flags():
    from remote.config import load_config

    job = load_config(EXAMPLE).job
    req = requirements_from(job, max_price_per_hour=0.5, gpu_models=None)
    assert (req.min_vram_gb, req.min_reliability, req.min_cuda, req.verified_only, req.disk_gb) == (
        24,
        0.98,
        12.1,
        True,
        40,
    )
    assert req.max_price_per_hour == 0.5
    assert requirements_from(None, min_vram_gb=48).min_vram_gb == 48


# ------------------------------------------------------------------------------------------ ranking


def test_rank_by_price_without_a_job():
    offers = [
        offer(offer_id="a", price_per_hour=0.3),
        offer(offer_id="b", price_per_hour=0.1),
        offer(offer_id="c", price_per_hour=0.1, reliability=0.999),
    ]
    assert [r.offer.offer_id for r in rank(offers)] == ["c", "b", "a"]


def test_rank_by_job_cost_can_prefer_a_dearer_faster_card():
    profile = JobProfile(family="sdxl", steps=10_000, batch_size=1, resolution=(1024, 1024))
    slow_cheap = offer(offer_id="3090", gpu_model="RTX 3090", price_per_hour=0.30)
    fast_dear = offer(offer_id="h100", gpu_model="H100 SXM", price_per_hour=0.50)
    unknown = offer(offer_id="mystery", gpu_model="Imaginary RTX 9999", price_per_hour=0.01)
    ranked = rank([slow_cheap, unknown, fast_dear], profile)
    assert [r.offer.offer_id for r in ranked] == ["h100", "3090", "mystery"]  # no speed figure: last
    assert ranked[0].estimate.cost_usd < ranked[1].estimate.cost_usd
    assert ranked[2].estimate is None


# ------------------------------------------------------------------------------------------ querying


class FakeProvider:
    def __init__(self, name, offers=None, error=None):
        self.info = ProviderInfo(name=name, display_name=name)
        self._offers, self._error = offers or [], error

    def search(self, requirements):
        if self._error:
            raise self._error
        return self._offers


def test_one_failing_provider_is_a_note_not_a_crash():
    providers = {
        "vast": FakeProvider("vast", [offer()]),
        "runpod": FakeProvider("runpod", error=ProviderDown("runpod", "503 maintenance", 503)),
    }
    answers = query_providers(
        ["vast", "runpod", "gpuflow"], requirements_from(), opener=lambda n: providers.get(n) or _real(n)
    )
    assert [o.offer_id for o in answers.offers] == ["1"]
    assert [(n.provider, n.kind) for n in answers.notes] == [("runpod", "error"), ("gpuflow", "unsupported")]
    assert "503 maintenance" in answers.notes[0].message
    assert answers.skipped == []


def _real(name):
    from rentrain.credentials import open_provider

    return open_provider(name)


def test_missing_key_is_a_note():
    search = find_offers(["vast"], requirements_from())
    assert search.ranked == []
    assert search.notes[0].kind == "error" and "VAST_API_KEY" in search.notes[0].message
    assert search.notes[0].summary == "no API key"


def test_providers_are_asked_concurrently():
    import threading

    barrier = threading.Barrier(2, timeout=5)

    class Waiting(FakeProvider):
        def search(self, requirements):
            barrier.wait()  # only returns if both searches run at the same time
            return [offer(provider=self.info.name)]

    answers = query_providers(["vast", "runpod"], requirements_from(), opener=lambda n: Waiting(n))
    assert sorted(o.provider for o in answers.offers) == ["runpod", "vast"] and answers.notes == []


# ------------------------------------------------------------------------------------------ the commands


def record_markets(mocked, runpod_status=200):
    mocked.add(responses.POST, f"{VAST_URL}/bundles/", json=load("vast_bundles.json"))
    for cloud, fixture in (("COMMUNITY", "runpod_catalog_community.json"), ("SECURE", "runpod_catalog_secure.json")):
        params = {"include": "AVAILABILITY", "product": "POD", "cloud": cloud, "count": "1", "minCudaVersion": "12.1"}
        if runpod_status == 200:
            mocked.add(
                responses.GET,
                f"{RUNPOD_URL}/v2/catalog/gpus",
                json=load(fixture),
                match=[matchers.query_param_matcher(params)],
            )
    if runpod_status != 200:
        mocked.add(
            responses.GET,
            f"{RUNPOD_URL}/v2/catalog/gpus",
            status=runpod_status,
            json={"title": "Unauthorized", "status": runpod_status, "detail": "invalid api key"},
        )


EXPECTED_ORDER = [  # cheapest job first; the tiny example's steps cost the same on every card
    ("vast", "3001"),
    ("runpod", "SECURE/NVIDIA RTX A5000"),
    ("runpod", "COMMUNITY/NVIDIA GeForce RTX 4090"),
    ("vast", "4001"),
    ("runpod", "SECURE/NVIDIA GeForce RTX 4090"),
]


def test_offers_with_config_prints_a_sorted_table(mocked, markets, caplog):
    caplog.set_level(logging.DEBUG)
    record_markets(mocked)
    result = CliRunner().invoke(main, ["offers", "--config", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = [line for line in lines if line.startswith("│")]
    cells = [[c.strip() for c in row.strip("│").split("│")] for row in rows]
    assert [c[0] for c in cells] == ["vast", "runpod secure", "runpod community", "vast", "runpod secure", "gpuflow"]
    assert cells[0][1:4] == ["RTX 3090 24 GB", "$0.168", "0.991"]
    assert cells[1][3] == "unknown"  # RunPod publishes no reliability
    assert cells[0][5] == "610 Mbps"
    assert all(c[7].endswith(" (assumed)") for c in cells[:5])  # the example's tiny model: an assumed speed
    costs = [float(c[7].split()[0].lstrip("$").split("-")[0]) for c in cells[:5]]  # "$0.03 (assumed)": low end
    assert costs == sorted(costs)
    assert cells[5][1] == "no offers: no renter API or SSH*"
    assert "* gpuflow (no offers): GPUFlow has no renter API" in " ".join(result.output.split())
    assert "200 steps" in result.output
    for secret in (VAST_KEY, RUNPOD_KEY):
        assert secret not in result.output and secret not in caplog.text


def test_offers_json_is_ranked_with_estimates(mocked, markets):
    record_markets(mocked)
    result = CliRunner().invoke(main, ["offers", "--config", str(EXAMPLE), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [(o["provider"], o["offer_id"]) for o in data["offers"]] == EXPECTED_ORDER
    assert all(o["estimate"]["steps"] == 200 for o in data["offers"])
    assert data["job"]["steps"] == 200
    assert data["notes"][0]["provider"] == "gpuflow"


def test_offers_without_config_sorts_by_price_and_applies_flags(mocked, markets):
    record_markets(mocked)
    result = CliRunner().invoke(main, ["offers", "--json", "--max-price", "0.4", "--limit", "2"])
    data = json.loads(result.output)
    assert [o["price_per_hour"] for o in data["offers"]] == sorted(o["price_per_hour"] for o in data["offers"])
    assert len(data["offers"]) == 2
    assert all(o["estimate"] is None for o in data["offers"])
    assert body_of_vast_search(mocked)["dph_total"] == {"lte": 0.4}


def body_of_vast_search(mocked):
    return json.loads(next(c for c in mocked.calls if "bundles" in c.request.url).request.body)


def test_gpu_flag_is_normalised_and_sent(mocked, markets):
    record_markets(mocked)
    result = CliRunner().invoke(main, ["offers", "--json", "--gpu", "4090"])
    data = json.loads(result.output)
    assert {o["gpu_model"] for o in data["offers"]} == {"RTX 4090"}
    assert body_of_vast_search(mocked)["gpu_name"] == {"in": ["RTX 4090"]}


def test_a_failing_provider_is_a_warning_row(mocked, markets, caplog):
    caplog.set_level(logging.DEBUG)
    record_markets(mocked, runpod_status=401)
    result = CliRunner().invoke(main, ["offers", "--provider", "vast", "--provider", "runpod"])
    assert result.exit_code == 0, result.output
    assert "failed: AuthError*" in result.output
    assert (
        "* runpod (failed): AuthError: runpod rejected the API key from the environment variable RUNPOD_API_KEY "
        "(HTTP 401): Unauthorized: invalid api key"
    ) in " ".join(result.output.split())
    assert "$0.168" in result.output
    for secret in (VAST_KEY, RUNPOD_KEY):
        assert secret not in result.output and secret not in caplog.text


def test_gpuflow_only(markets):
    result = CliRunner().invoke(main, ["offers", "--provider", "gpuflow"])
    assert result.exit_code == 0
    assert "gpuflow" in result.output and "no renter API" in result.output


def test_estimate_best_per_provider_and_gpu(mocked, markets):
    record_markets(mocked)
    result = CliRunner().invoke(main, ["estimate", "--config", str(EXAMPLE), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [(o["provider"], o["offer_id"]) for o in data["best_per_provider"]] == [
        ("vast", "3001"),
        ("runpod", "SECURE/NVIDIA RTX A5000"),
    ]
    assert [o["gpu_model"] for o in data["best_per_gpu"]] == ["RTX 3090", "RTX A5000", "RTX 4090"]
    assert data["best_per_gpu"][2]["offer_id"] == "COMMUNITY/NVIDIA GeForce RTX 4090"
    assert data["job"]["steps"] == 200


def test_estimate_table_without_keys_still_gives_hours(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(main, ["estimate", "--config", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "No live prices" in result.output and "RTX 4090" in result.output
    assert "VAST_API_KEY" in result.output  # the note says where the key goes


def test_bad_config_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nno_such_key = 1\n")
    result = CliRunner().invoke(main, ["offers", "--config", str(bad)])
    assert result.exit_code != 0
    assert "no_such_key" in result.output


def test_include_interruptible_flag_adds_bid_offers(mocked, markets):
    record_markets(mocked)
    mocked.add(responses.POST, f"{VAST_URL}/bundles/", json=load("vast_bundles_bid.json"))
    result = CliRunner().invoke(main, ["offers", "--json", "--include-interruptible"])
    data = json.loads(result.output)
    assert [json.loads(c.request.body)["type"] for c in mocked.calls if "bundles" in c.request.url] == [
        "on-demand",
        "bid",
    ]
    cheapest = data["offers"][0]
    assert (cheapest["offer_id"], cheapest["interruptible"], cheapest["price_per_hour"]) == ("3001", True, 0.106)


def test_without_the_flag_the_config_decides(mocked, markets):
    record_markets(mocked)
    result = CliRunner().invoke(main, ["offers", "--json"])
    assert all(not o["interruptible"] for o in json.loads(result.output)["offers"])
    assert [json.loads(c.request.body)["type"] for c in mocked.calls if "bundles" in c.request.url] == ["on-demand"]


def _markets_with_a_bad_runpod_row(mocked):
    mocked.add(responses.POST, f"{VAST_URL}/bundles/", json=load("vast_bundles.json"))
    community = load("runpod_catalog_community.json")
    community["gpus"][0]["memory"] = "24 GB"
    mocked.add(
        responses.GET,
        f"{RUNPOD_URL}/v2/catalog/gpus",
        json=community,
        match=[matchers.query_param_matcher({"cloud": "COMMUNITY"}, strict_match=False)],
    )
    mocked.add(
        responses.GET,
        f"{RUNPOD_URL}/v2/catalog/gpus",
        json=load("runpod_catalog_secure.json"),
        match=[matchers.query_param_matcher({"cloud": "SECURE"}, strict_match=False)],
    )


SKIPPED_REASON = "COMMUNITY catalog row 1 (id NVIDIA GeForce RTX 4090): memory: Input should be a valid number"


def test_a_skipped_row_is_counted_in_one_line_and_the_provider_still_answers(mocked, markets):
    _markets_with_a_bad_runpod_row(mocked)
    result = CliRunner().invoke(main, ["offers", "--provider", "vast", "--provider", "runpod"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "runpod: 1 unreadable row of its answer skipped (--verbose shows which and why)" in output
    assert SKIPPED_REASON not in output
    assert "runpod secure" in output  # the catalog's other rows are offered


def test_verbose_shows_each_skipped_row_and_why(mocked, markets):
    _markets_with_a_bad_runpod_row(mocked)
    result = CliRunner().invoke(main, ["offers", "--provider", "vast", "--provider", "runpod", "--verbose"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "runpod: 1 unreadable row of its answer skipped:" in output
    assert f"runpod: skipped {SKIPPED_REASON}" in output


def test_json_lists_skipped_rows_per_provider(mocked, markets):
    _markets_with_a_bad_runpod_row(mocked)
    result = CliRunner().invoke(main, ["offers", "--provider", "vast", "--provider", "runpod", "--json"])
    data = json.loads(result.output)
    assert list(data["skipped_rows"]) == ["runpod"]
    assert data["skipped_rows"]["runpod"][0].startswith(SKIPPED_REASON)
    assert any(o["offer_id"] == "SECURE/NVIDIA RTX A5000" for o in data["offers"])


# ------------------------------------------------------------------------------------------ ranges and kinds


def sd15_config(tmp_path: Path) -> Path:
    """The example's dataset with an SD 1.5 job at bench/train_speed.py's settings (512px, batch 4, UNet + text
    encoder LoRA dim 32, bf16), 200 epochs: 10,000 steps."""
    import shutil

    shutil.copytree(EXAMPLE.parent / "dataset", tmp_path / "dataset")
    text = EXAMPLE.read_text()
    for old, new in (
        ("builtin:tiny-sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("resolution = 64", "resolution = 512"),
        ("min_bucket_reso = 64", "min_bucket_reso = 256"),
        ("max_bucket_reso = 128", "max_bucket_reso = 1024"),
        ("batch_size = 2", "batch_size = 4"),
        ("max_train_epochs = 2", "max_train_epochs = 200"),
        ("network_dim = 8", "network_dim = 32"),
        ('network_args = ["conv_dim=8", "conv_alpha=8"]', ""),
        ('mixed_precision = "no"', 'mixed_precision = "bf16"'),
    ):
        assert old in text
        text = text.replace(old, new)
    config = tmp_path / "config.toml"
    config.write_text(text)
    return config


COST_CELL = r"^\$\d+\.\d\d-\d+\.\d\d \((measured|modelled)\)$"


def test_offers_show_each_estimate_as_a_range_with_its_kind(mocked, markets, tmp_path):
    record_markets(mocked)
    result = CliRunner().invoke(main, ["offers", "--config", str(sd15_config(tmp_path))])
    assert result.exit_code == 0, result.output
    rows = [[c.strip() for c in line.strip("│").split("│")] for line in result.output.splitlines() if "│" in line]
    priced = [row for row in rows if row[2].startswith("$")]
    assert len(priced) == 5
    for row in priced:
        assert re.match(COST_CELL, row[7]) and row[7].endswith("(modelled)"), row  # no H100/H200 offer here
        low, high = (float(x) for x in row[6].split("-"))
        assert low < high


def test_offers_json_carries_the_range(mocked, markets, tmp_path):
    record_markets(mocked)
    result = CliRunner().invoke(main, ["offers", "--config", str(sd15_config(tmp_path)), "--json"])
    estimates = [o["estimate"] for o in json.loads(result.output)["offers"]]
    assert estimates and all(e["speed_kind"] == "modelled" for e in estimates)
    assert all(e["cost_low_usd"] < e["cost_usd"] < e["cost_high_usd"] for e in estimates)
    assert all(e["seconds_per_step_low"] < e["seconds_per_step"] < e["seconds_per_step_high"] for e in estimates)


def test_estimate_tables_show_ranges_and_kinds(mocked, markets, tmp_path):
    record_markets(mocked)
    result = CliRunner().invoke(main, ["estimate", "--config", str(sd15_config(tmp_path))])
    assert result.exit_code == 0, result.output
    rows = [[c.strip() for c in line.strip("│").split("│")] for line in result.output.splitlines() if "│" in line]
    rtx4090 = next(row for row in rows if row[1] == "RTX 4090")
    assert re.match(r"^0\.\d{3} \(0\.\d{3}-0\.\d{3}\)$", rtx4090[4])  # s/step and its range
    assert re.match(COST_CELL, rtx4090[6]) and rtx4090[6].endswith("(modelled)")


def test_estimate_without_prices_says_which_figures_are_measured(monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(main, ["estimate", "--config", str(sd15_config(tmp_path))])
    assert result.exit_code == 0, result.output
    rows = {
        cells[0]: cells
        for cells in ([c.strip() for c in line.strip("│").split("│")] for line in result.output.splitlines())
        if len(cells) == 4
    }
    assert rows["H200"][2] == "measured" and rows["H100 SXM"][2] == "measured"  # the benchmark's own settings
    assert rows["RTX 4090"][2] == "modelled" and rows["A100 SXM 80 GB"][2] == "modelled"
    assert rows["H200"][1] == "0.038 (0.037-0.040)"  # 38.5 ms +-5%


def test_estimate_shows_the_parts_of_each_best_offer(mocked, markets, tmp_path, monkeypatch):
    """GPU time with each setup phase, bandwidth at the Vast offer's own $/GB, and storage beyond the price."""
    monkeypatch.setenv("COLUMNS", "200")
    record_markets(mocked)
    config = sd15_config(tmp_path)
    result = CliRunner().invoke(main, ["estimate", "--config", str(config)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    vast_parts = text[text.index("vast RTX 4090: $") :]
    assert re.search(r"time \$\d\.\d{3}-\d\.\d{3}: training \d\.\d\d-\d\.\d\d h \+ setup", vast_parts)
    phases = r"image pull [\d.]+ min, bootstrap [\d.]+ min, model download [\d.]+ (s|min)"
    assert re.search(r"setup, modelled [^:]*: " + phases, vast_parts)
    assert "GB in at $0.001/GB" in vast_parts and "GB out at $0.002/GB" in vast_parts  # offer 4001's own rates
    assert re.search(r"storage \$0\.000 beyond the hourly price \(destroyed at the end; \$0\.\d{4}/h", vast_parts)
    assert "GB in at $0/GB" in text[text.index("runpod RTX 4090: $") :]  # RunPod bills no bandwidth
    data = json.loads(CliRunner().invoke(main, ["estimate", "--config", str(config), "--json"]).output)
    best = {row["provider"]: row["estimate"] for row in data["best_per_provider"]}
    assert best["vast"]["bandwidth_usd"] > 0 and best["runpod"]["bandwidth_usd"] == 0
    for estimate in best.values():
        assert set(estimate["setup_seconds"]) >= {"image_pull", "model_download", "fetch", "teardown"}
        parts = estimate["gpu_usd"] + estimate["bandwidth_usd"] + estimate["storage_usd"]
        assert estimate["cost_usd"] == pytest.approx(parts, abs=0.001)
        assert estimate["cost_low_usd"] < estimate["cost_usd"] < estimate["cost_high_usd"]
