"""When the providers say an instance began billing, read from answers in their documented shapes: Vast
`start_date`, RunPod `createdAt` (not `startedAt`, when the pod's container last started)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import responses
from responses import matchers

from providers.base import LaunchSpec, Offer

from .conftest import SSH_KEY, VAST_URL, load

V1_INSTANCES = VAST_URL.removesuffix("/api/v0") + "/api/v1/instances/"
PODS = "https://runpod.test/v2/pods"
KEYS = "https://runpod.test/v2/account/ssh-keys"
LAUNCH = LaunchSpec(job_id="job42", image="runpod/pytorch:1.0.2", disk_gb=40, ssh_public_key=SSH_KEY)
RUNPOD_OFFER = Offer(
    provider="runpod",
    offer_id="COMMUNITY/NVIDIA GeForce RTX 4090",
    gpu_model="RTX 4090",
    gpu_name_raw="NVIDIA GeForce RTX 4090",
    gpu_count=1,
    vram_gb=24,
    price_per_hour=0.31,
    cloud="COMMUNITY",
)


def test_a_vast_instance_is_billed_since_its_start_date(mocked, vast):
    mocked.add(
        responses.GET,
        f"{VAST_URL}/instances/7770001/",
        json=load("vast_instance_running.json"),
        match=[matchers.query_param_matcher({"owner": "me"})],
    )
    assert vast.get("7770001").billed_since == datetime.fromtimestamp(1761008618.225083, tz=UTC)


def test_vast_list_rows_carry_their_start_date_and_none_when_the_row_has_none(mocked, vast):
    rows = load("vast_instances.json")["instances"]
    page = {"success": True, "instances_found": 3, "total_instances": 3, "next_token": None, "instances": rows}
    mocked.add(responses.GET, V1_INSTANCES, json=page)
    found = {i.id: i.billed_since for i in vast.list_instances()}
    assert found == {"7770001": datetime.fromtimestamp(1761008618.2, tz=UTC), "7770002": None}


def test_a_runpod_pod_is_billed_since_it_was_created_not_since_its_container_last_started(mocked, runpod):
    mocked.add(responses.GET, f"{PODS}/7h9k2m4n6p", json=load("runpod_pod_running.json"))
    pod = runpod.get("7h9k2m4n6p")
    assert pod.billed_since == datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    assert pod.started_at == datetime(2026, 6, 1, 12, 1, 30, tzinfo=UTC)


def test_the_create_answer_gives_when_the_pod_was_made(mocked, runpod):
    mocked.add(responses.GET, KEYS, json={"keys": [SSH_KEY]})
    mocked.add(responses.POST, PODS, status=201, json=load("runpod_pod_created.json"))
    created = runpod.create(RUNPOD_OFFER, LAUNCH)
    assert created.billed_since == datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    assert created.started_at is None  # "startedAt": null until the container starts
    assert json.loads(mocked.calls[-1].request.body)["name"] == "rentrain-job42"


def test_a_pod_without_created_at_gives_no_billing_start(mocked, runpod):
    raw = load("runpod_pod_running.json")
    raw.pop("createdAt")
    mocked.add(responses.GET, f"{PODS}/7h9k2m4n6p", json=raw)
    assert runpod.get("7h9k2m4n6p").billed_since is None
