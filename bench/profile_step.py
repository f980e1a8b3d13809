"""Where a training step's time goes: torch.profiler around a few steady-state steps of the real trainer.

The trainer runs unchanged; this script wraps `remote.trainer.loop.train_step` from outside, so the
profiling stays beside the loop, not in it.

    python bench/profile_step.py --case sd15 [--skip 15] [--steps 5] [--workdir DIR] [--out FILE]

Writes: wall ms per step, GPU kernel ms per step, kernel launches per step, and the busiest operators.
"""

from __future__ import annotations

import argparse
import contextlib
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataclasses import replace  # noqa: E402

from bench.train_speed import (  # noqa: E402
    CASES,
    PATCHES,
    add_override_option,
    build_dataset,
    build_model,
    parse_override,
    write_config,
)

KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")),
    ("gemm", ("gemm", "matmul", "cutlass", "sm90_xmma", "nvjet", "cublas")),
    ("convolution", ("conv", "implicit", "winograd", "cudnn")),
    (
        "copy / cast / layout",
        ("copy", "cast", "to_copy", "nchwtonhwc", "nhwctonchw", "transpose", "elementwise_kernel_with_index"),
    ),
    ("normalisation", ("norm", "welford")),
    ("optimizer", ("adam", "multi_tensor")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(n in lowered for n in needles):
            return kind
    return "other elementwise / reduction"


GAP_CLASSES = ((5.0, "< 5 us"), (20.0, "5-20 us"), (200.0, "20-200 us"), (float("inf"), ">= 200 us"))


def timeline(kernels) -> tuple[float, dict[str, tuple[int, float]]]:  # type: ignore[no-untyped-def]
    """(microseconds the GPU ran at least one kernel, idle gaps between kernels by length: (count, us)).
    Short gaps are the per-kernel start and drain of back-to-back kernels; long ones are the GPU waiting
    for the host."""
    intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, gaps = 0.0, {label: (0, 0.0) for _, label in GAP_CLASSES}
    current_start, current_end = intervals[0] if intervals else (0.0, 0.0)
    for start, end in intervals[1:]:
        if start > current_end:
            busy += current_end - current_start
            gap = start - current_end
            label = next(label for limit, label in GAP_CLASSES if gap < limit)
            count, total = gaps[label]
            gaps[label] = (count + 1, total + gap)
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    busy += current_end - current_start
    return busy, gaps


def busiest(kernels, steps: int, rows: int = 25) -> list[str]:  # type: ignore[no-untyped-def]
    totals: dict[str, list[float]] = {}
    for e in kernels:
        entry = totals.setdefault(e.name, [0.0, 0])
        entry[0] += e.device_time
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:rows]
    return [
        f"  {total / 1000 / steps:6.2f} ms {count / steps:6.0f}x  {kernel_kind(name):<28} {name[:220]}"
        for name, (total, count) in ranked
    ]


def durations(kernels) -> dict[str, int]:  # type: ignore[no-untyped-def]
    classes = ((3.0, "< 3 us"), (10.0, "3-10 us"), (100.0, "10-100 us"), (float("inf"), ">= 100 us"))
    counts = {label: 0 for _, label in classes}
    for e in kernels:
        counts[next(label for limit, label in classes if e.device_time < limit)] += 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="sd15", choices=sorted(CASES))
    parser.add_argument("--skip", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rentrain-bench"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--patch", dest="patches", action="append", default=[], choices=sorted(PATCHES))
    add_override_option(parser, "config override, e.g. cuda_graphs=false (eager: kernels by operator)")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    import remote.trainer.loop as loop
    import remote.trainer.step as step

    case = CASES[args.case]
    case = replace(case, extra={**case.extra, **dict(parse_override(item) for item in args.overrides)})
    model = build_model(case.family, args.workdir / f"model-{case.family}")
    dataset = build_dataset(args.workdir / "data", case.resolution)
    config = write_config(
        args.workdir / f"profile-{args.case}.toml",
        case,
        model,
        dataset,
        args.workdir / f"out-profile-{args.case}-{int(time.time())}",
        args.skip + args.steps + 1,
    )

    for name in args.patches:
        exec(PATCHES[name], {"L": loop, "torch": torch})

    # host time per phase of the step, measured around the trainer's own functions
    host: dict[str, float] = {}

    def timed(name: str, function):  # type: ignore[no-untyped-def]
        def wrapper(*a, **k):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                if "started" in state and "wall" not in state:
                    host[name] = host.get(name, 0.0) + time.perf_counter() - started

        return wrapper

    for module, name in ((step, "batch_inputs"), (step, "optimizer_step"), (loop, "emit_step"), (loop, "after_step")):
        setattr(module, name, timed(name, getattr(module, name)))

    original = loop.train_step
    state: dict[str, object] = {"count": 0}

    def profiled_step(*step_args, **step_kwargs):  # type: ignore[no-untyped-def]
        state["count"] = int(state["count"]) + 1  # type: ignore[arg-type]
        if state["count"] == args.skip + 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            state["profiler"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            state["profiler"].__enter__()  # type: ignore[attr-defined]
            state["started"] = time.perf_counter()
        result = original(*step_args, **step_kwargs)
        if state["count"] == args.skip + args.steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            state["wall"] = time.perf_counter() - float(state["started"])  # type: ignore[arg-type]
            state["profiler"].__exit__(None, None, None)  # type: ignore[attr-defined]
        return result

    loop.train_step = profiled_step
    sys.argv = ["remote.trainer", str(config)]
    with contextlib.suppress(SystemExit):
        runpy.run_module("remote.trainer", run_name="__main__")
    profiler = state.get("profiler")
    if profiler is None:
        print("the run ended before the profiled steps", file=sys.stderr)
        return 1
    events = profiler.events()  # type: ignore[attr-defined]
    # GPU-side ranges of user annotations (Optimizer.step#AdamW.step, ...) are not kernels; kernel names can
    # hold a '#' too ("{lambda()#2}" in most elementwise and copy kernels), but always with a parenthesis
    kernels = [
        e
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and not ("#" in e.name and "(" not in e.name)
    ]
    gpu_ms = sum(e.device_time for e in kernels) / 1000 / args.steps
    busy, gaps = timeline(kernels)
    by_kind: dict[str, float] = {}
    for e in kernels:
        by_kind[kernel_kind(e.name)] = by_kind.get(kernel_kind(e.name), 0.0) + e.device_time / 1000 / args.steps
    lines = [
        f"case: {case.name}; {args.steps} steps profiled after {args.skip}",
        f"wall per step: {float(state['wall']) / args.steps * 1000:.1f} ms",  # type: ignore[arg-type]
        f"GPU kernel time per step: {gpu_ms:.1f} ms",
        f"kernel launches per step: {len(kernels) / args.steps:.0f}",
        "GPU busy per step (union of kernel intervals; overlapping kernels counted once): "
        f"{busy / 1000 / args.steps:.1f} ms",
        "idle gaps between kernels per step: "
        + ", ".join(
            f"{label}: {n / args.steps:.0f} gaps, {total / 1000 / args.steps:.1f} ms"
            for label, (n, total) in gaps.items()
        ),
        "kernels per step by duration: "
        + ", ".join(f"{label}: {n / args.steps:.0f}" for label, n in durations(kernels).items()),
        "host time per step in the trainer's phases (ms): "
        + ", ".join(f"{k} {v / args.steps * 1000:.2f}" for k, v in host.items()),
        "GPU time by kind (ms per step):",
        *[f"  {kind}: {ms:.1f}" for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])],
        "",
        "busiest kernels (ms per step, launches per step, kind, name):",
        *busiest(kernels, args.steps),
        "",
        profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60),  # type: ignore[attr-defined]
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
