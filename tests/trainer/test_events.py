from __future__ import annotations

import io
import json
import subprocess
import sys

from remote.events import (
    CheckpointEvent,
    DoneEvent,
    ErrorEvent,
    EventWriter,
    SampleEvent,
    StartEvent,
    StepEvent,
    parse_event,
    read_events,
)


def test_events_module_imports_without_torch():
    code = "import sys, remote.events; print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_round_trip_and_log(tmp_path):
    stream = io.StringIO()
    writer = EventWriter(tmp_path / "events.jsonl", stream=stream)
    events = [
        StartEvent(
            total_steps=10,
            epochs=1,
            steps_per_epoch=10,
            samples_per_epoch=20,
            batch_size=2,
            model_family="sd15",
            model="builtin:tiny-sd15",
            device="cpu",
            dtype="float32",
        ),
        StepEvent(step=1, total_steps=10, epoch=1, loss=0.5, lr=1e-4, seconds_per_step=0.1, samples_per_second=20),
        CheckpointEvent(path="/o/a-000001.safetensors", sha256="ab" * 32, epoch=1, step=10, state_dir="/o/s"),
        SampleEvent(path="/o/samples/a.png", epoch=1, step=10),
        DoneEvent(path="/o/a.safetensors", sha256="cd" * 32, step=10, epoch=1, wall_seconds=3.0),
        ErrorEvent(kind="data", message="bad image"),
    ]
    for event in events:
        writer.emit(event)
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["start", "step", "checkpoint", "sample", "done", "error"]
    parsed = [parse_event(line) for line in lines]
    assert [type(p) for p in parsed] == [type(e) for e in events]
    assert parsed[1].loss == 0.5
    with open(tmp_path / "events.jsonl", "a") as handle:
        handle.write('{"event": "step", "st')  # a torn last line
    assert len(read_events(tmp_path / "events.jsonl")) == 6
