"""The job's states as an explicit machine (rentrain.ledger.ALLOWED_TRANSITIONS): every state can end, every move
the table lists is recorded, every other move is a bug that raises, and every simple path from "planned" to
"closed" walks through a real ledger."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest

from rentrain.commands.jobs import _close_job
from rentrain.ledger import ALLOWED_TRANSITIONS, OPEN_STATES, IllegalTransition, JobRecord, JobState, Ledger

STATES: tuple[JobState, ...] = get_args(JobState)
EDGES = [(source, target) for source, targets in ALLOWED_TRANSITIONS.items() for target in sorted(targets)]
NOT_EDGES = [(a, b) for a, b in itertools.product(STATES, STATES) if b not in ALLOWED_TRANSITIONS[a]]


def _job_in(ledger: Ledger, job_id: str, state: JobState) -> None:
    ledger.create_job(
        JobRecord(
            id=job_id,
            created_at=time.time(),
            config_path="config.toml",
            provider="vast",
            label=f"rentrain-{job_id}",
            state=state,
            output_dir="output",
        )
    )


def _reachable(source: JobState) -> set[JobState]:
    seen, todo = {source}, [source]
    while todo:
        for target in ALLOWED_TRANSITIONS[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def _simple_paths(source: JobState, goal: JobState) -> Iterator[list[JobState]]:
    """Every path from source to goal that visits no state twice (self-loops included in no path)."""
    stack: list[list[JobState]] = [[source]]
    while stack:
        path = stack.pop()
        if path[-1] == goal:
            yield path
            continue
        stack.extend([*path, target] for target in sorted(ALLOWED_TRANSITIONS[path[-1]]) if target not in path)


def test_the_table_names_every_state_and_only_states() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(STATES)
    assert all(targets <= set(STATES) for targets in ALLOWED_TRANSITIONS.values())


@pytest.mark.parametrize("state", STATES)
def test_every_state_reaches_closed_and_closed_is_final(state: JobState) -> None:
    assert "closed" in _reachable(state)
    assert ALLOWED_TRANSITIONS["closed"] == frozenset()


def test_every_open_state_can_be_destroyed_and_closed() -> None:
    """Ctrl-C, a failure and the sweep destroy from wherever the job is; `rentrain down` closes it there."""
    for state in OPEN_STATES:
        assert {"destroying", "closed"} <= ALLOWED_TRANSITIONS[state], state


@pytest.mark.parametrize(("source", "target"), EDGES)
def test_every_legal_move_is_accepted_and_recorded(tmp_path: Path, source: JobState, target: JobState) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    _job_in(ledger, "j1", source)
    job = ledger.transition("j1", target, "why", last_step=3)
    assert job.state == target and job.last_step == 3
    last = ledger.transitions("j1")[-1]
    assert (last.from_state, last.to_state, last.detail) == (source, target, "why")


def test_every_move_not_in_the_table_raises_and_changes_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    for number, (source, target) in enumerate(NOT_EDGES):
        job_id = f"j{number}"
        _job_in(ledger, job_id, source)
        with pytest.raises(IllegalTransition, match=f"no move from '{source}' to '{target}'") as raised:
            ledger.transition(job_id, target, last_step=3)
        assert (raised.value.from_state, raised.value.to_state) == (source, target)
        job = ledger.job(job_id)
        assert job.state == source and job.last_step == 0
        assert [t.to_state for t in ledger.transitions(job_id)] == [source]
    assert ("closed", "closed") in NOT_EDGES and ("planned", "syncing") in NOT_EDGES


def test_every_simple_path_from_planned_to_closed_walks_through_a_ledger(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    paths = list(_simple_paths("planned", "closed"))
    for number, path in enumerate(paths):
        job_id = f"p{number}"
        _job_in(ledger, job_id, "planned")
        for state in path[1:]:
            ledger.transition(job_id, state)
        assert [(t.from_state, t.to_state) for t in ledger.transitions(job_id)] == list(
            zip([None, *path[:-1]], path, strict=True)
        )
        assert ledger.job(job_id).outcome is None and not ledger.job(job_id).is_open
    assert {state for path in paths for state in path} == set(STATES)  # no state is off every path
    assert ["planned", "closed"] in paths  # no offer at all
    happy = ["planned", "intent_recorded", "creating", "waiting_ssh", "syncing", "watchdog", "bootstrapping"]
    assert [*happy, "training", "following", "fetching", "destroying", "closed"] in paths


def test_a_close_that_loses_the_race_to_the_jobs_own_client_is_not_an_error(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    _job_in(ledger, "j1", "following")
    ledger.transition("j1", "closed", "its own client", outcome="succeeded")
    _close_job(ledger, "j1", "rentrain down")  # it looked open a moment ago
    assert ledger.job("j1").outcome == "succeeded"
