"""Vast.ai adapter against the documented REST shapes (PROVIDERS.md §1)."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime

import pytest
import responses
from responses import matchers

from providers.base import (
    AuthError,
    BadRequest,
    InsufficientFunds,
    LaunchSpec,
    NotFound,
    OfferGone,
    ProviderDown,
    RateLimited,
)
from providers.vast import RUNTYPE_SSH_DIRECT, VastProvider
from rentrain.offers import requirements_from

from .conftest import SSH_KEY, VAST_KEY, VAST_URL, FakeClock, body, load

VAST_V1 = VAST_URL.removesuffix("/api/v0") + "/api/v1"
V1_INSTANCES = f"{VAST_V1}/instances/"

LAUNCH = LaunchSpec(
    job_id="job42",
    image="pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime",
    disk_gb=40,
    ssh_public_key=SSH_KEY,
    env={"RENTRAIN_JOB": "job42"},
    onstart="bash /root/rentrain/watchdog.sh &",
)


def _search(mocked, vast, req=None, fixture="vast_bundles.json"):
    mocked.add(responses.POST, f"{VAST_URL}/bundles/", json=load(fixture))
    return vast.search(req or requirements_from(disk_gb=40))


def test_search_sends_the_documented_filter_with_units(mocked, vast):
    _search(mocked, vast, requirements_from(min_vram_gb=24, disk_gb=55, max_price_per_hour=0.6, min_cuda=12.1))
    sent = body(mocked.calls[0])
    assert mocked.calls[0].request.headers["Authorization"] == f"Bearer {VAST_KEY}"
    assert sent["gpu_ram"] == {"gte": 24000}  # MB per GPU on the wire
    assert sent["allocated_storage"] == 55  # the disk we will create, so dph_total includes it
    assert sent["dph_total"] == {"lte": 0.6}
    assert sent["reliability"] == {"gte": 0.98}
    assert sent["verified"] == {"eq": True}
    assert sent["rentable"] == {"eq": True}
    assert sent["direct_port_count"] == {"gte": 1}
    assert sent["cuda_max_good"] == {"gte": 12.1}
    assert sent["num_gpus"] == {"eq": 1}
    assert sent["type"] == "on-demand"
    assert sent["order"] == [["dph_total", "asc"]]


def test_search_gpu_filter_uses_vast_wire_names(mocked, vast):
    _search(mocked, vast, requirements_from(gpu_models=["RTX 4090", "A10G", "RTX 6000 Ada"]))
    assert body(mocked.calls[0])["gpu_name"] == {"in": ["RTX 4090", "A10g", "A10G", "RTX 6000Ada"]}


def test_search_maps_offers(mocked, vast):
    offers = _search(mocked, vast)
    first = offers[0]
    assert first.provider == "vast"
    assert first.offer_id == "4001"
    assert first.gpu_model == "RTX 4090"
    assert first.vram_gb == pytest.approx(24.0, abs=0.05)  # 24564 MB
    assert first.price_per_hour == 0.412
    assert first.reliability == 0.995
    assert first.download_mbps == 850.2
    assert first.location == "Oslo, NO"
    assert first.verified is True
    assert first.max_cuda == 12.4
    assert first.interruptible is False
    assert [o.verified for o in offers].count(False) == 1  # "unverified" is kept as data, filtered later


def test_interruptible_adds_a_bid_search(mocked, vast):
    mocked.add(responses.POST, f"{VAST_URL}/bundles/", json=load("vast_bundles.json"))
    mocked.add(responses.POST, f"{VAST_URL}/bundles/", json=load("vast_bundles_bid.json"))
    offers = vast.search(requirements_from(include_interruptible=True))
    assert [body(c)["type"] for c in mocked.calls] == ["on-demand", "bid"]
    bid = [o for o in offers if o.interruptible]
    assert len(bid) == 1 and bid[0].bid_price_per_hour == 0.09 and bid[0].price_per_hour == 0.106


def test_create_rents_the_ask_and_attaches_the_job_key(mocked, vast):
    offers = _search(mocked, vast)
    mocked.add(responses.PUT, f"{VAST_URL}/asks/4001/", json=load("vast_create.json"))
    mocked.add(
        responses.POST,
        f"{VAST_URL}/instances/7770001/ssh/",
        json={"success": True, "msg": "SSH key attached successfully"},
        match=[matchers.json_params_matcher({"ssh_key": SSH_KEY})],
    )
    instance = vast.create(offers[0], LAUNCH)
    sent = body(mocked.calls[1])
    assert sent == {
        "client_id": "me",
        "image": LAUNCH.image,
        "disk": 40,
        "runtype": RUNTYPE_SSH_DIRECT,
        "env": {"RENTRAIN_JOB": "job42", "RENTRAIN_LABEL": "rentrain-job42"},  # the watchdog's stop mark needs it
        "label": "rentrain-job42",
        "cancel_unavail": True,
        "onstart": "bash /root/rentrain/watchdog.sh &",
    }
    assert RUNTYPE_SSH_DIRECT == "ssh_direc ssh_proxy"  # what the official CLI sends, typo included
    assert instance.id == "7770001"
    assert instance.status == "provisioning"
    assert instance.label == "rentrain-job42"
    assert "d15a0c0ffee0instancekey" not in repr(instance) + instance.model_dump_json()


def test_create_bid_offer_sends_the_bid_price(mocked, vast):
    mocked.add(responses.POST, f"{VAST_URL}/bundles/", json=load("vast_bundles.json"))
    mocked.add(responses.POST, f"{VAST_URL}/bundles/", json=load("vast_bundles_bid.json"))
    bid = next(o for o in vast.search(requirements_from(include_interruptible=True)) if o.interruptible)
    mocked.add(responses.PUT, f"{VAST_URL}/asks/3001/", json=load("vast_create.json"))
    mocked.add(responses.POST, f"{VAST_URL}/instances/7770001/ssh/", json={"success": True})
    vast.create(bid, LAUNCH)
    assert body(mocked.calls[2])["price"] == 0.09


def test_create_destroys_the_instance_when_the_key_cannot_be_attached(mocked, vast):
    offers = _search(mocked, vast)
    mocked.add(responses.PUT, f"{VAST_URL}/asks/4001/", json=load("vast_create.json"))
    mocked.add(
        responses.POST,
        f"{VAST_URL}/instances/7770001/ssh/",
        status=400,
        json={"success": False, "error": "invalid_args", "msg": "bad ssh key"},
    )
    mocked.add(responses.DELETE, f"{VAST_URL}/instances/7770001/", json={"success": True})
    with pytest.raises(BadRequest, match="bad ssh key"):
        vast.create(offers[0], LAUNCH)
    assert mocked.calls[-1].request.method == "DELETE"


@pytest.mark.parametrize(
    ("status", "payload", "error"),
    [
        (
            404,
            {
                "success": False,
                "error": "invalid_args",
                "msg": "error 404/3603: no_such_ask Instance type by id 4001 is not available.",
                "ask_id": 4001,
            },
            OfferGone,
        ),
        (410, {"success": False, "error": "no_such_ask", "msg": "no longer available"}, OfferGone),
        (400, {"success": False, "error": "invalid_price", "msg": "price too low"}, BadRequest),
        (400, {"success": False, "error": "no_ssh_key_for_vm", "msg": "no ssh key"}, BadRequest),
        (401, {"success": False, "error": "auth_error", "msg": "Invalid API key"}, AuthError),
        (403, {"detail": "permission denied: instance_write"}, AuthError),
        (402, {"success": False, "error": "insufficient_credit", "msg": "Insufficient credit"}, InsufficientFunds),
    ],
)
def test_create_errors_are_typed_and_carry_the_message(mocked, vast, status, payload, error):
    offers = _search(mocked, vast)
    mocked.add(responses.PUT, f"{VAST_URL}/asks/4001/", status=status, json=payload)
    with pytest.raises(error) as caught:
        vast.create(offers[0], LAUNCH)
    assert caught.value.provider == "vast"
    assert caught.value.status == status
    assert payload.get("msg", payload.get("detail")) in caught.value.message
    assert len(mocked.calls) == 2  # never retried


def test_get_running_instance_prefers_the_direct_port(mocked, vast):
    mocked.add(
        responses.GET,
        f"{VAST_URL}/instances/7770001/",
        json=load("vast_instance_running.json"),
        match=[matchers.query_param_matcher({"owner": "me"})],
    )
    instance = vast.get("7770001")
    assert instance.status == "running"
    assert instance.ssh is not None
    assert (instance.ssh.host, instance.ssh.port, instance.ssh.user, instance.ssh.via) == (
        "63.135.50.11",
        20000,
        "root",
        "direct",
    )
    assert instance.price_per_hour == pytest.approx(1.002, abs=0.001)
    assert instance.started_at == datetime.fromtimestamp(1761008618.225083, tz=UTC)
    assert instance.gpu_model == "RTX A5000"


def test_get_falls_back_to_the_ssh_proxy(mocked, vast):
    raw = load("vast_instance_running.json")
    raw["instances"]["ports"] = {}
    mocked.add(responses.GET, f"{VAST_URL}/instances/7770001/", json=raw)
    ssh = vast.get("7770001").ssh
    assert ssh is not None and (ssh.host, ssh.port, ssh.via) == ("ssh2281.vast.ai", 10882, "proxy")


@pytest.mark.parametrize(
    ("actual", "ours"),
    [
        (None, "provisioning"),
        ("loading", "provisioning"),
        ("running", "running"),
        ("stopped", "stopped"),
        ("exited", "exited"),
        ("offline", "exited"),
        ("unknown", "exited"),
    ],
)
def test_status_is_normalised(mocked, vast, actual, ours):
    raw = load("vast_instance_running.json")
    raw["instances"]["actual_status"] = actual
    mocked.add(responses.GET, f"{VAST_URL}/instances/7770001/", json=raw)
    instance = vast.get("7770001")
    assert instance.status == ours
    assert instance.provider_status == actual
    if ours != "running":
        assert instance.ssh is None


def test_get_missing_instance_is_not_found(mocked, vast):
    mocked.add(responses.GET, f"{VAST_URL}/instances/99/", json={"instances": None})
    with pytest.raises(NotFound):
        vast.get("99")


def _v1_page(rows: list[dict], next_token: str | None, total: int) -> dict:
    """A GET /api/v1/instances/ answer (vast-ai/docs show_instances.yaml)."""
    return {
        "success": True,
        "instances_found": len(rows),
        "total_instances": total,
        "label_counts": {},
        "next_token": next_token,
        "instances": rows,
    }


def _instance_row(number: int, label: str) -> dict:
    row = dict(load("vast_instances.json")["instances"][0])
    return {**row, "id": 8000000 + number, "label": label}


def test_list_keeps_only_our_labels(mocked, vast):
    rows = load("vast_instances.json")["instances"]
    mocked.add(
        responses.GET, V1_INSTANCES, json=_v1_page(rows, None, 3), match=[matchers.query_param_matcher({"limit": "25"})]
    )
    found = vast.list_instances()
    assert [(i.id, i.status) for i in found] == [("7770001", "running"), ("7770002", "provisioning")]
    assert found[1].status_message == "pulling image"


def test_list_follows_next_token_across_v1_pages(mocked, vast):
    """30 instances: 25 on the first page, 5 on the second, fetched with the first page's token."""
    rows = [_instance_row(n, f"rentrain-job{n}") for n in range(30)]
    mocked.add(
        responses.GET,
        V1_INSTANCES,
        json=_v1_page(rows[:25], "eyJpZCI6IDI1fQ==", 30),
        match=[matchers.query_param_matcher({"limit": "25"})],
    )
    mocked.add(
        responses.GET,
        V1_INSTANCES,
        json=_v1_page(rows[25:], None, 30),
        match=[matchers.query_param_matcher({"limit": "25", "after_token": "eyJpZCI6IDI1fQ=="})],
    )
    found = vast.list_instances()
    assert [i.id for i in found] == [str(8000000 + n) for n in range(30)]
    assert len(mocked.calls) == 2  # v1 only: the v0 list (410 on migrated accounts) is never asked


def test_an_empty_next_token_ends_the_list(mocked, vast):
    mocked.add(responses.GET, V1_INSTANCES, json=_v1_page([_instance_row(1, "rentrain-a")], "", 1))
    assert [i.label for i in vast.list_instances()] == ["rentrain-a"]


def test_a_page_token_that_repeats_is_an_error_not_an_endless_loop(mocked, vast):
    mocked.add(responses.GET, V1_INSTANCES, json=_v1_page([_instance_row(1, "rentrain-a")], "same", 2))
    with pytest.raises(ProviderDown, match="repeated a page token"):
        vast.list_instances()
    assert len(mocked.calls) == 2


def test_the_v0_list_is_used_only_where_v1_is_missing(mocked, vast):
    mocked.add(
        responses.GET, V1_INSTANCES, status=404, json={"success": False, "error": "not_found", "msg": "no route"}
    )
    mocked.add(
        responses.GET,
        f"{VAST_URL}/instances/",
        json=load("vast_instances.json"),
        match=[matchers.query_param_matcher({"owner": "me"})],
    )
    assert [i.id for i in vast.list_instances()] == ["7770001", "7770002"]


def test_a_404_auth_error_is_a_rejected_key_naming_its_source(mocked, markets):
    """Vast may answer a wrong or revoked key with 404 + auth_error: not a missing route, not "provider down"."""
    from rentrain.credentials import open_provider

    mocked.add(
        responses.GET,
        V1_INSTANCES,
        status=404,
        json={"success": False, "error": "auth_error", "msg": "Invalid user key"},
    )
    with pytest.raises(AuthError) as caught:
        open_provider("vast").list_instances()
    assert str(caught.value) == (
        "vast rejected the API key from the environment variable VAST_API_KEY (HTTP 404): auth_error: Invalid user key"
    )
    assert caught.value.message == str(caught.value) and caught.value.status == 404
    assert VAST_KEY not in str(caught.value)
    assert len(mocked.calls) == 1  # a rejected key does not send us to the v0 list


@pytest.mark.parametrize(
    ("method", "path", "call"),
    [
        (responses.GET, "/instances/7/", lambda vast: vast.get("7")),
        (responses.DELETE, "/instances/7/", lambda vast: vast.destroy("7")),
        (responses.POST, "/bundles/", lambda vast: vast.search(requirements_from())),
    ],
)
def test_a_404_auth_error_is_an_auth_error_on_every_endpoint(mocked, vast, method, path, call):
    mocked.add(
        method,
        f"{VAST_URL}{path}",
        status=404,
        json={"success": False, "error": "auth_error", "msg": "Invalid user key"},
    )
    with pytest.raises(AuthError, match="auth_error: Invalid user key"):
        call(vast)


def test_storage_cost_per_hour_of_an_instance(mocked, vast):
    """Vast's own $/h figure where given, else $/GB/month x allocated GB / 730 h."""
    stated = {**_instance_row(1, "rentrain-a"), "storage_cost": 0.15, "disk_space": 10.08, "storage_total_cost": 0.0021}
    computed = {**_instance_row(2, "rentrain-b"), "actual_status": "stopped", "storage_cost": 0.2, "disk_space": 73.0}
    unknown = _instance_row(3, "rentrain-c")
    mocked.add(responses.GET, V1_INSTANCES, json=_v1_page([stated, computed, unknown], None, 3))
    found = {i.label: i for i in vast.list_instances()}
    assert found["rentrain-a"].storage_usd_per_hour == 0.0021
    assert found["rentrain-b"].status == "stopped"
    assert found["rentrain-b"].storage_usd_per_hour == pytest.approx(0.2 * 73 / 730)
    assert found["rentrain-c"].storage_usd_per_hour is None


def test_stop_and_destroy(mocked, vast):
    mocked.add(
        responses.PUT,
        f"{VAST_URL}/instances/7770001/",
        json={"success": True},
        match=[matchers.json_params_matcher({"state": "stopped"})],
    )
    mocked.add(responses.DELETE, f"{VAST_URL}/instances/7770001/", json={"success": True})
    mocked.add(
        responses.PUT,
        f"{VAST_URL}/instances/7770001/",
        json={"success": True},
        match=[matchers.json_params_matcher({"state": "running"})],
    )
    vast.stop("7770001")
    vast.destroy("7770001")
    vast.start("7770001")
    assert [c.request.method for c in mocked.calls] == ["PUT", "DELETE", "PUT"]


def test_destroy_unknown_instance_is_not_found(mocked, vast):
    mocked.add(
        responses.DELETE,
        f"{VAST_URL}/instances/7770001/",
        status=404,
        json={"success": False, "error": "not_found", "msg": "Instance not found"},
    )
    with pytest.raises(NotFound, match="Instance not found"):
        vast.destroy("7770001")


def test_429_without_retry_after_backs_off_then_succeeds(mocked, vast, clock: FakeClock):
    mocked.add(responses.GET, f"{VAST_URL}/instances/7770001/", status=429, body="API requests too frequent")
    mocked.add(
        responses.GET,
        f"{VAST_URL}/instances/7770001/",
        status=429,
        json={"detail": "API requests too frequent endpoint threshold=2.0"},
    )
    mocked.add(responses.GET, f"{VAST_URL}/instances/7770001/", json=load("vast_instance_running.json"))
    assert vast.get("7770001").status == "running"
    assert len(clock.sleeps) == 2
    # first wait starts from the endpoint's documented interval (2.0 s for GET instance), jittered into [1, 2]
    assert 1.0 <= clock.sleeps[0] <= 2.0
    assert 2.0 <= clock.sleeps[1] <= 4.0


def test_429_backoff_is_bounded(mocked, vast, clock: FakeClock):
    mocked.add(
        responses.POST,
        f"{VAST_URL}/bundles/",
        status=429,
        json={"detail": "API requests too frequent endpoint threshold=6"},
    )
    with pytest.raises(RateLimited, match="too frequent"):
        vast.search(requirements_from())
    assert 1 <= len(mocked.calls) <= 5
    assert sum(clock.sleeps) <= 90
    assert all(s <= 30 for s in clock.sleeps)


def test_gateway_errors_are_retried_for_reads_but_create_is_not(mocked, vast):
    mocked.add(responses.GET, V1_INSTANCES, status=502, body="Bad Gateway")
    mocked.add(responses.GET, V1_INSTANCES, json=_v1_page(load("vast_instances.json")["instances"], None, 3))
    assert len(vast.list_instances()) == 2
    offers_mock = load("vast_bundles.json")["offers"][0]
    from providers.vast import VastOffer, _offer

    offer = _offer(VastOffer.model_validate(offers_mock), False, 40)
    mocked.add(responses.PUT, f"{VAST_URL}/asks/4001/", status=503, body="Service Unavailable")
    with pytest.raises(ProviderDown):
        vast.create(offer, LAUNCH)
    assert sum(1 for c in mocked.calls if c.request.method == "PUT") == 1


def test_self_destroy_recipe_runs_as_shell_without_secrets(tmp_path):
    recipe = VastProvider(VAST_KEY, VAST_URL).self_destroy_recipe()
    assert recipe.env_vars == ["CONTAINER_ID", "CONTAINER_API_KEY", "RENTRAIN_LABEL"]
    assert VAST_KEY not in recipe.model_dump_json()
    command = recipe.destroy[0].curl()
    script = 'curl() { printf "%s\\n" "$@"; }\n' + command
    out = subprocess.run(
        ["bash", "-c", script],
        env={"CONTAINER_ID": "7770001", "CONTAINER_API_KEY": "ck-123", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert "DELETE" in out
    assert "Authorization: Bearer ck-123" in out
    assert f"{VAST_URL}/instances/7770001/" in out
    assert "vastai destroy instance $CONTAINER_ID" in (recipe.cli_fallback_destroy or "")
    stop = subprocess.run(
        ["bash", "-c", 'curl() { printf "%s\\n" "$@"; }\n' + recipe.stop[0].curl()],
        env={"CONTAINER_ID": "7", "CONTAINER_API_KEY": "k"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert "PUT" in stop and '{"state": "stopped"}' in stop


def test_one_unreadable_offer_row_is_dropped_and_counted_the_others_kept(mocked, vast, caplog):
    raw = load("vast_bundles.json")
    good = len(raw["offers"])
    raw["offers"].insert(1, {"id": 4999, "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": "lots", "dph_total": 0.3})
    mocked.add(responses.POST, f"{VAST_URL}/bundles/", json=raw)
    offers = vast.search(requirements_from())
    assert len(offers) == good and "4999" not in [o.offer_id for o in offers]
    assert vast.last_search_skipped == [
        "on-demand offer row 2 (id 4999): gpu_ram: Input should be a valid number, unable to parse string as a number"
    ]
    assert "vast: skipped on-demand offer row 2 (id 4999): gpu_ram" in caplog.text


def test_skipped_rows_are_those_of_the_last_search(mocked, vast):
    mocked.add(responses.POST, f"{VAST_URL}/bundles/", json={"offers": [{"id": 1, "gpu_name": "RTX 4090"}]})
    mocked.add(responses.POST, f"{VAST_URL}/bundles/", json=load("vast_bundles.json"))
    assert vast.search(requirements_from()) == [] and len(vast.last_search_skipped) == 1
    assert vast.search(requirements_from()) and vast.last_search_skipped == []
