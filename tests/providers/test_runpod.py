"""RunPod REST v2 adapter against the documented shapes (PROVIDERS.md §2)."""

from __future__ import annotations

import json
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
    NoCapacity,
    NotFound,
    OfferGone,
    ProviderDown,
    RateLimited,
    Unsupported,
)
from providers.runpod import RunPodProvider
from rentrain.offers import requirements_from

from .conftest import RUNPOD_KEY, RUNPOD_URL, SSH_KEY, FakeClock, body, load

CATALOG = f"{RUNPOD_URL}/v2/catalog/gpus"
KEYS = f"{RUNPOD_URL}/v2/account/ssh-keys"
PODS = f"{RUNPOD_URL}/v2/pods"
USER_KEYS = [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIUserLaptopKey me@laptop",
    "ssh-rsa AAAAB3NzaC1yc2EAAAADAQUserDesktop me@desk",
]
LAUNCH = LaunchSpec(
    job_id="job42",
    image="runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404",
    disk_gb=40,
    ssh_public_key=SSH_KEY,
    env={"RENTRAIN_JOB": "job42"},
)


def _catalog(mocked, min_cuda="12.1", count=1):
    for cloud, fixture in (("COMMUNITY", "runpod_catalog_community.json"), ("SECURE", "runpod_catalog_secure.json")):
        params = {"include": "AVAILABILITY", "product": "POD", "cloud": cloud, "count": str(count)}
        if min_cuda:
            params["minCudaVersion"] = min_cuda
        mocked.add(responses.GET, CATALOG, json=load(fixture), match=[matchers.query_param_matcher(params)])


def _offers(mocked, runpod, req=None):
    _catalog(mocked)
    return runpod.search(req or requirements_from(disk_gb=40))


def test_catalog_gives_one_offer_per_gpu_type_per_cloud(mocked, runpod):
    offers = _offers(mocked, runpod)
    assert mocked.calls[0].request.headers["Authorization"] == f"Bearer {RUNPOD_KEY}"
    assert sorted((o.cloud, o.gpu_model) for o in offers) == [
        ("COMMUNITY", "RTX 3090"),
        ("COMMUNITY", "RTX 4090"),
        ("COMMUNITY", "RTX A4000"),
        ("SECURE", "RTX 4090"),
        ("SECURE", "RTX A5000"),
    ]
    community_4090 = next(o for o in offers if o.cloud == "COMMUNITY" and o.gpu_model == "RTX 4090")
    assert community_4090.gpu_name_raw == "NVIDIA GeForce RTX 4090"
    assert community_4090.offer_id == "COMMUNITY/NVIDIA GeForce RTX 4090"
    assert community_4090.vram_gb == 24
    # list price per GPU plus 40 GB container disk and a 40 GB volume, each at $0.10/GB-month
    assert community_4090.price_per_hour == pytest.approx(0.31 + 2 * 40 * 0.10 / 730, abs=1e-4)
    assert community_4090.availability == "HIGH"
    assert community_4090.location == "US-KS-2 +1"


def test_catalog_rows_with_cuda_version_objects_are_read(mocked, runpod):
    """Schema GpuType: cudaVersions is a list of {"version", "available"}; only available versions count."""
    offers = {(o.cloud, o.gpu_model): o for o in _offers(mocked, runpod)}
    assert offers[("COMMUNITY", "RTX 4090")].max_cuda == 12.8  # 13.0 is listed but full
    assert offers[("COMMUNITY", "RTX 3090")].max_cuda is None  # every version full: unknown, not the highest listed
    assert offers[("SECURE", "RTX A5000")].max_cuda == 12.2
    assert runpod.last_search_skipped == []


def test_bare_version_strings_are_still_read(mocked, runpod):
    raw = load("runpod_catalog_community.json")
    raw["gpus"][0]["cudaVersions"] = ["11.8", "12.4"]
    raw["gpus"][2].pop("cudaVersions")  # "treat a missing cudaVersions the same as an empty one"
    mocked.add(responses.GET, CATALOG, json=raw)
    mocked.add(responses.GET, CATALOG, json={"gpus": []})
    offers = {o.gpu_model: o for o in runpod.search(requirements_from())}
    assert offers["RTX 4090"].max_cuda == 12.4
    assert offers["RTX A4000"].max_cuda is None


def test_cuda_versions_compare_as_numbers():
    from providers.runpod import CatalogGpu, _max_cuda

    gpu = CatalogGpu.model_validate(
        {
            "id": "g",
            "memory": 24,
            "cudaVersions": [{"version": "12.9", "available": True}, {"version": "12.10", "available": True}],
        }
    )
    assert _max_cuda(gpu.cudaVersions) == 12.1  # 12.10, newer than 12.9


def test_one_unreadable_catalog_row_is_dropped_and_counted_the_others_kept(mocked, runpod, caplog):
    raw = load("runpod_catalog_community.json")
    raw["gpus"][1]["cudaVersions"] = [{"version": "12.4"}]  # no "available"
    mocked.add(responses.GET, CATALOG, json=raw)
    mocked.add(responses.GET, CATALOG, json=load("runpod_catalog_secure.json"))
    offers = runpod.search(requirements_from(disk_gb=40))
    assert sorted((o.cloud, o.gpu_model) for o in offers) == [
        ("COMMUNITY", "RTX 4090"),
        ("COMMUNITY", "RTX A4000"),
        ("SECURE", "RTX 4090"),
        ("SECURE", "RTX A5000"),
    ]
    assert runpod.last_search_skipped == [
        "COMMUNITY catalog row 2 (id NVIDIA GeForce RTX 3090): cudaVersions.0.available: Field required"
    ]
    assert "runpod: skipped COMMUNITY catalog row 2" in caplog.text


def test_reliability_is_unknown_never_invented(mocked, runpod):
    offers = _offers(mocked, runpod)
    assert all(o.reliability is None and o.download_mbps is None and o.verified is None for o in offers)


def test_out_of_stock_is_reported_as_such(mocked, runpod):
    offers = _offers(mocked, runpod)
    assert next(o for o in offers if o.gpu_model == "RTX 3090").availability == "NONE"


def test_multi_gpu_price_and_max_count(mocked, runpod):
    _catalog(mocked, count=8)
    offers = runpod.search(requirements_from(gpu_count=8, disk_gb=40))
    # community 4090 allows 4 at most; secure allows 8
    assert [(o.cloud, o.gpu_model) for o in offers if o.gpu_model == "RTX 4090"] == [("SECURE", "RTX 4090")]
    secure = next(o for o in offers if o.gpu_model == "RTX 4090")
    assert secure.gpu_count == 8
    assert secure.price_per_hour == pytest.approx(8 * 0.44 + 2 * 40 * 0.1 / 730, abs=1e-4)


def test_create_merges_our_key_into_the_account_keys_and_sends_the_documented_body(mocked, runpod):
    offer = next(o for o in _offers(mocked, runpod) if o.cloud == "COMMUNITY" and o.gpu_model == "RTX 4090")
    mocked.add(responses.GET, KEYS, json={"keys": USER_KEYS})
    mocked.add(responses.PUT, KEYS, json={"keys": [*USER_KEYS, SSH_KEY]})
    mocked.add(responses.POST, PODS, status=201, json=load("runpod_pod_created.json"))
    instance = runpod.create(offer, LAUNCH)

    put = next(c for c in mocked.calls if c.request.method == "PUT")
    assert body(put) == {"keys": [*USER_KEYS, SSH_KEY]}  # the user's keys survive the full replacement
    sent = body(mocked.calls[-1])
    assert sent == {
        "name": "rentrain-job42",
        "image": LAUNCH.image,
        "gpu": {"id": "NVIDIA GeForce RTX 4090", "count": 1},
        "cloud": "COMMUNITY",
        "disk": 40,
        "mounts": {"persistent": {"size": 40, "path": "/workspace"}},
        "ports": ["22/tcp"],
        "startSsh": True,
        "env": {"RENTRAIN_JOB": "job42", "PUBLIC_KEY": SSH_KEY, "SSH_PUBLIC_KEY": SSH_KEY},
    }
    assert instance.id == "7h9k2m4n6p"
    assert instance.status == "provisioning"
    assert instance.ssh is None  # ssh.direct is null until the pod runs; the proxy allows no rsync
    assert instance.label == "rentrain-job42"


def test_create_passes_the_minimum_cuda_to_the_scheduler(mocked, runpod):
    mocked.add(responses.GET, KEYS, json={"keys": [SSH_KEY]})
    mocked.add(responses.POST, PODS, status=201, json=load("runpod_pod_created.json"))
    runpod.create(_any_offer(), LAUNCH.model_copy(update={"min_cuda": 12.0}))
    assert body(mocked.calls[-1])["gpu"] == {"id": "NVIDIA GeForce RTX 4090", "count": 1, "minCudaVersion": "12.0"}


def test_create_does_not_rewrite_keys_when_ours_is_already_there(mocked, runpod):
    offer = _offers(mocked, runpod)[0]
    mocked.add(responses.GET, KEYS, json={"keys": [*USER_KEYS, SSH_KEY.rsplit(" ", 1)[0] + " other-comment"]})
    mocked.add(responses.POST, PODS, status=201, json=load("runpod_pod_created.json"))
    runpod.create(offer, LAUNCH)
    assert not any(c.request.method == "PUT" for c in mocked.calls)


def test_forget_ssh_key_keeps_every_other_key(mocked, runpod):
    mocked.add(responses.GET, KEYS, json={"keys": [USER_KEYS[0], SSH_KEY, USER_KEYS[1]]})
    mocked.add(responses.PUT, KEYS, json={"keys": USER_KEYS}, match=[matchers.json_params_matcher({"keys": USER_KEYS})])
    runpod.forget_ssh_key(SSH_KEY)


def test_onstart_is_refused_rather_than_silently_dropped(runpod):
    offer_launch = LAUNCH.model_copy(update={"onstart": "echo hi"})
    assert runpod.info.runs_onstart is False
    with pytest.raises(Unsupported, match="over SSH"):
        runpod.create(_any_offer(), offer_launch)


def _any_offer():
    from providers.base import Offer

    return Offer(
        provider="runpod",
        offer_id="COMMUNITY/NVIDIA GeForce RTX 4090",
        gpu_model="RTX 4090",
        gpu_name_raw="NVIDIA GeForce RTX 4090",
        gpu_count=1,
        vram_gb=24,
        price_per_hour=0.31,
        cloud="COMMUNITY",
    )


@pytest.mark.parametrize(
    ("status", "problem", "error"),
    [
        (
            400,
            {
                "title": "Bad Request",
                "status": 400,
                "detail": "There are no longer any instances available with the requested specifications.",
            },
            NoCapacity,
        ),
        (
            402,
            {
                "title": "Payment Required",
                "status": 402,
                "detail": "Insufficient balance: at least one hour of credit is required",
            },
            InsufficientFunds,
        ),
        (403, {"title": "Forbidden", "status": 403, "detail": "GPU pool not accessible"}, OfferGone),
        (401, {"title": "Unauthorized", "status": 401, "detail": "invalid api key"}, AuthError),
        (
            422,
            {
                "title": "Unprocessable Entity",
                "status": 422,
                "detail": "request body invalid",
                "errors": [{"detail": "unevaluated property 'foo'"}],
            },
            BadRequest,
        ),
    ],
)
def test_create_errors_are_typed_and_never_retried(mocked, runpod, clock: FakeClock, status, problem, error):
    mocked.add(responses.GET, KEYS, json={"keys": [SSH_KEY]})
    mocked.add(responses.POST, PODS, status=status, json=problem, content_type="application/problem+json")
    with pytest.raises(error) as caught:
        runpod.create(_any_offer(), LAUNCH)
    assert problem["detail"] in caught.value.message
    assert caught.value.status == status
    assert sum(1 for c in mocked.calls if c.request.method == "POST") == 1
    assert clock.sleeps == []


def test_422_detail_lists_the_field_errors(mocked, runpod):
    mocked.add(responses.GET, KEYS, json={"keys": [SSH_KEY]})
    mocked.add(
        responses.POST,
        PODS,
        status=422,
        json={"title": "Unprocessable Entity", "status": 422, "errors": [{"detail": "unevaluated property 'foo'"}]},
    )
    with pytest.raises(BadRequest, match="unevaluated property 'foo'"):
        runpod.create(_any_offer(), LAUNCH)


def test_retry_after_is_honoured(mocked, runpod, clock: FakeClock):
    mocked.add(
        responses.GET,
        f"{PODS}/7h9k2m4n6p",
        status=429,
        headers={"Retry-After": "12"},
        json={"title": "Too Many Requests", "status": 429, "detail": "rate limit exceeded for the minute window"},
    )
    mocked.add(responses.GET, f"{PODS}/7h9k2m4n6p", json=load("runpod_pod_running.json"))
    assert runpod.get("7h9k2m4n6p").status == "running"
    assert clock.sleeps == [12.0]


def test_create_retries_a_429_with_retry_after(mocked, runpod, clock: FakeClock):
    mocked.add(responses.GET, KEYS, json={"keys": [SSH_KEY]})
    mocked.add(
        responses.POST,
        PODS,
        status=429,
        headers={"Retry-After": "3"},
        json={"title": "Too Many Requests", "status": 429, "detail": "slow down"},
    )
    mocked.add(responses.POST, PODS, status=201, json=load("runpod_pod_created.json"))
    assert runpod.create(_any_offer(), LAUNCH).id == "7h9k2m4n6p"
    assert clock.sleeps == [3.0]


def test_a_long_retry_after_is_raised_not_slept(mocked, runpod, clock: FakeClock):
    mocked.add(
        responses.GET,
        f"{PODS}/x",
        status=429,
        headers={"Retry-After": "3600"},
        json={"title": "Too Many Requests", "status": 429, "detail": "rate limit exceeded for the hour window"},
    )
    with pytest.raises(RateLimited) as caught:
        runpod.get("x")
    assert caught.value.retry_after == 3600
    assert clock.sleeps == []


def test_an_idempotent_500_is_retried(mocked, runpod, clock: FakeClock):
    mocked.add(responses.GET, f"{PODS}/x", status=500, json={"title": "Internal Server Error", "status": 500})
    mocked.add(responses.GET, f"{PODS}/x", json=load("runpod_pod_running.json"))
    assert runpod.get("x").status == "running"
    assert len(clock.sleeps) == 1


def test_server_errors_retry_reads_then_give_up(mocked, runpod, clock: FakeClock):
    for _ in range(5):
        mocked.add(
            responses.GET,
            f"{PODS}/x",
            status=503,
            json={"title": "Service Unavailable", "status": 503, "detail": "maintenance"},
        )
    with pytest.raises(ProviderDown, match="maintenance"):
        runpod.get("x")
    assert len(mocked.calls) == 5
    assert len(clock.sleeps) == 4


def test_get_running_pod_uses_ssh_direct(mocked, runpod):
    mocked.add(responses.GET, f"{PODS}/7h9k2m4n6p", json=load("runpod_pod_running.json"))
    pod = runpod.get("7h9k2m4n6p")
    assert pod.status == "running"
    assert pod.ssh is not None
    assert (pod.ssh.host, pod.ssh.port, pod.ssh.user, pod.ssh.via) == ("195.26.233.3", 34446, "root", "direct")
    assert pod.price_per_hour == 0.31
    assert pod.started_at == datetime(2026, 6, 1, 12, 1, 30, tzinfo=UTC)
    assert pod.gpu_model == "RTX 4090"


@pytest.mark.parametrize(
    ("status", "ours"),
    [
        ("PROVISIONING", "provisioning"),
        ("STARTING", "provisioning"),
        ("RUNNING", "running"),
        ("EXITED", "stopped"),
        ("ERROR", "exited"),
        ("TERMINATED", "gone"),
    ],
)
def test_pod_status_is_normalised(mocked, runpod, status, ours):
    raw = load("runpod_pod_running.json")
    raw["status"] = status
    mocked.add(responses.GET, f"{PODS}/7h9k2m4n6p", json=raw)
    assert runpod.get("7h9k2m4n6p").status == ours


def test_get_unknown_pod_is_not_found(mocked, runpod):
    mocked.add(
        responses.GET, f"{PODS}/nope", status=404, json={"title": "Not Found", "status": 404, "detail": "pod not found"}
    )
    with pytest.raises(NotFound, match="pod not found"):
        runpod.get("nope")


def test_a_rejected_key_names_where_it_came_from(mocked, clock: FakeClock):
    source = "/home/me/.runpod/config.toml (apikey)"
    runpod = RunPodProvider(RUNPOD_KEY, RUNPOD_URL, sleep=clock.sleep, clock=clock, key_source=source)
    mocked.add(
        responses.GET, PODS, status=401, json={"title": "Unauthorized", "status": 401, "detail": "invalid api key"}
    )
    with pytest.raises(AuthError) as caught:
        runpod.list_instances()
    expected = f"runpod rejected the API key from {source} (HTTP 401): Unauthorized: invalid api key"
    assert caught.value.message == expected


@pytest.mark.parametrize(
    ("status", "mounts", "disk", "expected"),
    [
        ("EXITED", {"persistent": {"size": 20, "path": "/workspace"}}, 40, 20 * 0.20 / 730),  # volume only, doubled
        ("RUNNING", {"persistent": {"size": 20, "path": "/workspace"}}, 40, (40 + 20) * 0.10 / 730),
        ("EXITED", {}, 40, 0.0),  # no volume: a stopped pod's container disk is erased, not billed
        ("TERMINATED", {"persistent": {"size": 20, "path": "/workspace"}}, 40, 0.0),
        ("EXITED", None, None, None),  # the answer gives no size
    ],
)
def test_storage_cost_per_hour_follows_the_pod_state(mocked, runpod, status, mounts, disk, expected):
    raw = {**load("runpod_pod_running.json"), "status": status}
    if mounts is not None:
        raw["mounts"] = mounts
    if disk is not None:
        raw["disk"] = disk
    mocked.add(responses.GET, f"{PODS}/7h9k2m4n6p", json=raw)
    storage = runpod.get("7h9k2m4n6p").storage_usd_per_hour
    assert storage == (None if expected is None else pytest.approx(expected))


def test_create_prices_storage_from_the_sizes_we_asked_for_when_the_answer_has_none(mocked, runpod):
    mocked.add(responses.GET, KEYS, json={"keys": [SSH_KEY]})
    created = load("runpod_pod_created.json")
    created.pop("mounts")
    mocked.add(responses.POST, PODS, status=201, json=created)
    instance = runpod.create(_any_offer(), LAUNCH)
    assert instance.storage_usd_per_hour == pytest.approx((40 + 40) * 0.10 / 730)  # 40 GB disk, 40 GB volume


def test_list_keeps_only_our_pods(mocked, runpod):
    mocked.add(responses.GET, PODS, json=load("runpod_pods.json"))
    found = runpod.list_instances()
    assert [(p.id, p.status) for p in found] == [("7h9k2m4n6p", "running"), ("a1b2c3d4e5", "stopped")]


def test_stop_and_terminate(mocked, runpod):
    stopped = {**load("runpod_pod_running.json"), "status": "EXITED"}
    mocked.add(
        responses.POST,
        f"{PODS}/7h9k2m4n6p/action",
        json=stopped,
        match=[matchers.json_params_matcher({"action": "stop"})],
    )
    mocked.add(responses.DELETE, f"{PODS}/7h9k2m4n6p", status=204)
    runpod.stop("7h9k2m4n6p")
    runpod.destroy("7h9k2m4n6p")
    assert [c.request.method for c in mocked.calls] == ["POST", "DELETE"]


def test_stop_in_a_state_that_forbids_it_is_a_bad_request(mocked, runpod):
    mocked.add(
        responses.POST,
        f"{PODS}/p/action",
        status=409,
        json={"title": "Conflict", "status": 409, "detail": "action stop not allowed in status EXITED"},
    )
    with pytest.raises(BadRequest, match="not allowed"):
        runpod.stop("p")


def test_self_destroy_recipe_v2_first_then_graphql(tmp_path):
    recipe = RunPodProvider(RUNPOD_KEY, RUNPOD_URL).self_destroy_recipe()
    assert recipe.env_vars == ["RUNPOD_POD_ID", "RUNPOD_API_KEY"]
    assert RUNPOD_KEY not in recipe.model_dump_json()
    env = {"RUNPOD_POD_ID": "7h9k2m4n6p", "RUNPOD_API_KEY": "pod-scoped-key", "PATH": "/usr/bin:/bin"}

    def run(command: str) -> list[str]:
        script = 'curl() { printf "%s\\n" "$@"; }\n' + command
        return subprocess.run(
            ["bash", "-c", script], env=env, capture_output=True, text=True, check=True
        ).stdout.splitlines()

    v2 = run(recipe.destroy[0].curl())
    assert "DELETE" in v2 and f"{RUNPOD_URL}/v2/pods/7h9k2m4n6p" in v2 and "Authorization: Bearer pod-scoped-key" in v2
    graphql = run(recipe.destroy[1].curl())
    assert f"{RUNPOD_URL}/graphql" in graphql
    sent = json.loads(graphql[graphql.index("--data") + 1])
    assert sent == {"query": 'mutation { podTerminate(input:{podId:"7h9k2m4n6p"}) }'}
    assert recipe.cli_fallback_destroy == "runpodctl remove pod $RUNPOD_POD_ID"


def test_an_unexpected_answer_shape_is_a_provider_error(mocked, runpod):
    mocked.add(responses.GET, f"{PODS}/p", json={"id": "p", "status": "RUNNING", "startedAt": "not a date"})
    with pytest.raises(ProviderDown, match="unexpected Pod in the answer: startedAt"):
        runpod.get("p")


def test_start_and_stop_use_the_pod_action(mocked, runpod):
    mocked.add(responses.POST, f"{PODS}/7h9k2m4n6p/action", json=load("runpod_pod_created.json"))
    mocked.add(responses.POST, f"{PODS}/7h9k2m4n6p/action", json=load("runpod_pod_created.json"))
    runpod.stop("7h9k2m4n6p")
    runpod.start("7h9k2m4n6p")
    assert [body(c) for c in mocked.calls] == [{"action": "stop"}, {"action": "start"}]
