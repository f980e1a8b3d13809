"""A job's report.html: built from the ledger and the output folder alone, everything embedded, every outside
text escaped."""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

from PIL import Image

from rentrain.ledger import OPEN_STATES, InstanceRecord, Ledger, Transition
from rentrain.report import write_job_report
from rentrain.report_facts import PHASE_OF_STATE, PHASES, phase_costs
from tests.report.builders import (
    CLOSED_AT,
    STEPS,
    T0,
    grid_png,
    job_record,
    new_job,
    run_job,
    succeeded_job,
    write_run_output,
)

EMBEDDED = re.compile(r'<img src="data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)"')


def embedded_images(text: str) -> list[tuple[str, bytes]]:
    return [(kind, base64.b64decode(data)) for kind, data in EMBEDDED.findall(text)]


def money_row(text: str, label: str) -> list[str]:
    """The cells after `label` in the report's table row that starts with it."""
    row = re.search(rf"<tr><td>{re.escape(label)}</td>(.*?)</tr>", text)
    assert row, f"no row {label!r}"
    return re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))


def test_the_report_embeds_every_checkpoint_grid_labelled_and_linked(tmp_path: Path) -> None:
    ledger = Ledger()
    files = succeeded_job(ledger, tmp_path)
    path = write_job_report(ledger, "job-a1")
    text = path.read_text(encoding="utf-8")
    assert path == files.output_dir / "report.html"
    assert embedded_images(text) == [("image/png", grid) for grid in files.grids]
    assert "epoch 1, step 10" in text and "epoch 2, step 20 (final)" in text
    assert '<a href="samples/sample-e1-s10.png">full size</a>' in text
    assert "<script" not in text and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_the_report_still_shows_its_images_when_moved_alone(tmp_path: Path) -> None:
    ledger = Ledger()
    files = succeeded_job(ledger, tmp_path)
    moved = tmp_path / "elsewhere" / "report.html"
    moved.parent.mkdir()
    write_job_report(ledger, "job-a1").rename(moved)
    (files.output_dir / "samples" / "sample-e1-s10.png").unlink()
    assert [data for _, data in embedded_images(moved.read_text(encoding="utf-8"))] == files.grids


def test_the_final_file_shows_its_size_and_the_sha256_checked_against_the_trainers(tmp_path: Path) -> None:
    ledger = Ledger()
    files = succeeded_job(ledger, tmp_path)
    assert files.lora is not None and files.lora_sha256 is not None
    text = write_job_report(ledger, "job-a1").read_text(encoding="utf-8")
    assert files.lora_sha256 in text
    assert "13,000 bytes (0.0 MB)" in text
    assert "matches the sha256 the trainer reported" in text

    files.lora.write_bytes(b"changed on disk")
    text = write_job_report(ledger, "job-a1").read_text(encoding="utf-8")
    assert "differs from the sha256 the trainer reported" in text and "15 bytes" in text


def test_each_phase_has_its_time_and_money_beside_the_estimate(tmp_path: Path) -> None:
    ledger = Ledger()
    succeeded_job(ledger, tmp_path)
    text = write_job_report(ledger, "job-a1").read_text(encoding="utf-8")
    # builders.RUN_MOVES at $0.001 a second
    assert money_row(text, "provision") == ["1 min 00 s", "$0.060"]
    assert money_row(text, "setup") == ["2 min 00 s", "$0.120"]
    assert money_row(text, "training") == ["30 min 00 s", "$1.800"]
    assert money_row(text, "fetch") == ["1 min 00 s", "$0.060"]
    assert money_row(text, "teardown") == ["30 s", "$0.010"]  # the instance ended 10 s into it
    assert money_row(text, "<b>total</b>") == ["34 min 30 s", "<b>$2.050</b>"]
    assert money_row(text, "money") == ["$2.160", "$2.050"]  # estimate, billed
    assert money_row(text, "total time") == ["36 min 00 s", "34 min 30 s"]


def test_money_follows_the_instance_live_in_each_phase_across_a_lost_host() -> None:
    def move(at: float, state: str) -> Transition:
        return Transition(job_id="j", at=at, from_state=None, to_state=state, detail="")

    moves = [
        move(0, "planned"),
        move(10, "intent_recorded"),
        move(20, "syncing"),
        move(50, "training"),
        move(100, "destroying"),  # the host was lost
        move(110, "intent_recorded"),
        move(130, "syncing"),
        move(150, "training"),
        move(250, "fetching"),
        move(260, "destroying"),
        move(270, "closed"),
    ]
    first = InstanceRecord(
        job_id="j",
        provider="vast",
        instance_id="a",
        offer_id="1",
        gpu="A",
        usd_per_hour=3.6,
        created_at=10,
        ended_at=105,
    )
    second = InstanceRecord(
        job_id="j",
        provider="vast",
        instance_id="b",
        offer_id="2",
        gpu="B",
        usd_per_hour=7.2,
        created_at=110,
        ended_at=265,
    )
    never_created = InstanceRecord(
        job_id="j", provider="vast", offer_id="3", gpu="C", usd_per_hour=99.0, created_at=105
    )
    costs = {p.name: (p.seconds, round(p.usd, 6)) for p in phase_costs(moves, [first, second, never_created], now=0)}
    assert costs == {
        "provision": (10 + 20, 0.010 + 0.040),
        "setup": (30 + 20, 0.030 + 0.040),
        "training": (50 + 100, 0.050 + 0.200),
        "fetch": (10, 0.020),
        "teardown": (10 + 10, 0.005 + 0.010),
    }
    billed = first.cost() + second.cost()
    assert round(sum(usd for _, usd in costs.values()), 6) == round(billed, 6)


def test_every_state_an_instance_may_exist_in_belongs_to_a_phase() -> None:
    assert set(PHASE_OF_STATE) == set(OPEN_STATES)
    assert set(PHASE_OF_STATE.values()) == set(PHASES)


def test_loss_and_learning_rate_are_drawn_as_inline_svg(tmp_path: Path) -> None:
    ledger = Ledger()
    succeeded_job(ledger, tmp_path)
    text = write_job_report(ledger, "job-a1").read_text(encoding="utf-8")
    charts = re.findall(r"<svg .*?</svg>", text, re.S)
    assert len(charts) == 2
    loss, lr = charts
    assert 'aria-label="loss' in loss and 'aria-label="learning rate"' in lr
    lr_points = re.findall(r'<polyline points="([^"]+)"', lr)[0].split()
    assert len(lr_points) == STEPS
    ys = [float(point.split(",")[1]) for point in lr_points]
    assert ys == sorted(ys, reverse=True)  # a rising learning rate climbs the chart (SVG's y grows downwards)
    assert len(re.findall(r"<polyline ", loss)) == 2  # each step, and the moving average over it


def test_steps_whose_loss_is_not_a_number_are_left_out_of_the_chart_and_counted(tmp_path: Path) -> None:
    ledger = Ledger()
    job = new_job(tmp_path, "job-a1")
    ledger.create_job(job)
    write_run_output(Path(job.output_dir), [], finished=False, nan_from=STEPS - 4)
    run_job(ledger, job, outcome="failed", error="training diverged at step 36")
    text = write_job_report(ledger, "job-a1").read_text(encoding="utf-8")
    loss = re.findall(r"<svg .*?</svg>", text, re.S)[0]
    points = re.findall(r'<polyline points="([^"]+)"', loss)[0].split()
    assert len(points) == STEPS - 5 and "nan" not in loss.lower()
    assert f"5 steps had a loss that is not a finite number (first at step {STEPS - 4})" in text


def test_the_dataset_summary_shows_the_run_and_the_dataset_as_it_is_now(tmp_path: Path) -> None:
    ledger = Ledger()
    succeeded_job(ledger, tmp_path)
    text = write_job_report(ledger, "job-a1").read_text(encoding="utf-8")
    assert money_row(text, "samples per epoch (images x repeats)") == ["20"]
    assert money_row(text, "device") == ["cuda:0 (NVIDIA H100 80GB HBM3)"]
    assert money_row(text, "model") == ["<code>runwayml/stable-diffusion-v1-5</code>"]
    subset = re.search(r"<tr><td><code>[^<]*10_sks dog</code></td>(.*?)</tr>", text)
    assert subset and re.findall(r"<td[^>]*>(.*?)</td>", subset.group(1)) == ["10", "training", "3", "3"]


def test_a_config_that_is_gone_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    ledger = Ledger()
    succeeded_job(ledger, tmp_path)
    config = Path(ledger.job("job-a1").config_path)
    config.unlink()
    text = write_job_report(ledger, "job-a1").read_text(encoding="utf-8")
    assert f"The dataset cannot be inspected now: {config}: no such file" in text
    assert "Traceback" not in text
    assert "samples per epoch" in text  # what the trainer reported is still shown


def test_text_from_outside_is_escaped(tmp_path: Path) -> None:
    ledger = Ledger()
    hostile = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'
    job = new_job(tmp_path, "job-h1")
    job = job.model_copy(update={"config_path": job.config_path + "<b>.toml"})
    ledger.create_job(job)
    write_run_output(Path(job.output_dir), ["grid<i>.png"], finished=False, error=f"trainer said {hostile}")
    run_job(ledger, job, T0, outcome="failed", error=f"failed: {hostile}")
    text = write_job_report(ledger, "job-h1").read_text(encoding="utf-8")
    assert "<script" not in text and "<img src=x" not in text and "<b>.toml" not in text and "grid<i>" not in text
    assert "failed: &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img src=x" in text
    assert "internal: trainer said &lt;script&gt;" in text
    assert "config.toml&lt;b&gt;.toml" in text
    assert 'href="samples/grid&lt;i&gt;.png"' in text
    assert "No final LoRA file" in text


def test_a_job_that_never_started_gets_a_short_report(tmp_path: Path) -> None:
    ledger = Ledger()
    ledger.create_job(job_record("job-s1", tmp_path / "gone.toml", tmp_path / "outputs" / "job-s1"))
    text = write_job_report(ledger, "job-s1").read_text(encoding="utf-8")
    assert "Job job-s1: running (planned)" in text
    assert "no events.jsonl in" in text and "No sample grid was written" in text
    assert money_row(text, "<b>total</b>") == ["0 s", "<b>$0.000</b>"]


def test_a_large_grid_is_embedded_smaller_and_an_unreadable_one_is_named(tmp_path: Path) -> None:
    ledger = Ledger()
    files = succeeded_job(ledger, tmp_path)
    samples = files.output_dir / "samples"
    noise = Image.frombytes("RGB", (2600, 500), os.urandom(2600 * 500 * 3))
    noise.save(samples / "sample-e1-s10.png")
    assert (samples / "sample-e1-s10.png").stat().st_size > 1_000_000
    (samples / "sample-e2-s20.png").write_bytes(grid_png(tmp_path / "whole.png")[:200])  # a torn copy
    text = write_job_report(ledger, "job-a1").read_text(encoding="utf-8")
    [(kind, data)] = embedded_images(text)
    assert kind == "image/jpeg" and Image.open(io.BytesIO(data)).width == 2048
    assert f"cannot be read: {samples / 'sample-e2-s20.png'}" in text


def test_an_open_job_counts_its_current_phase_until_now(tmp_path: Path) -> None:
    ledger = Ledger()
    job = new_job(tmp_path, "job-o1")
    ledger.create_job(job)
    run_job(ledger, job, T0)
    moves = ledger.transitions(job.id)
    closed = {p.name: p.seconds for p in phase_costs(moves, ledger.instances(job.id), now=T0 + CLOSED_AT + 500)}
    assert closed["teardown"] == 30
    moves = moves[:-1]  # as if still destroying
    still_open = {p.name: p.seconds for p in phase_costs(moves, ledger.instances(job.id), now=moves[-1].at + 500)}
    assert still_open["teardown"] == 500
