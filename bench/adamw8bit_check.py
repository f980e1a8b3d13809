"""GraphableAdamW8bit (remote/trainer/adamw8bit.py) on a CUDA GPU, with LoRA-shaped tensors (800 of rank 16, some
under min_8bit_size so that they keep float32 states):

    graph == eager     12 steps eagerly and through a CUDA graph replay, one of them skipped through found_inf,
                       the learning rates written in place at each step: the parameters and the 8-bit states must
                       be equal to the bit, with 11 steps counted. No eager step after the first may synchronize
                       with the host (the first works out the row layout once, a host-to-device copy)
    vs bitsandbytes    20 steps against bitsandbytes' CUDA AdamW8bit (the same algorithm with other roundings)
                       and against our own optimizer on the CPU: the parameters must end within 2% of how far
                       they moved (UPDATE_TOLERANCE); the largest differences of parameters and dequantized
                       states, and the state bytes that differ, are reported. Without bitsandbytes (it does not
                       import) only the CPU comparison runs, and that is no failure
    speed              ms and CUDA kernels per step, eager and as a graph replay, against bitsandbytes' AdamW8bit
                       and torch's fused AdamW, for ranks 16 and 64 (reported, not judged)
    memory             the states, the temporaries of one step and the graph's memory pool (reported, not judged)

tests/trainer/test_adamw8bit.py checks the arithmetic against bitsandbytes on the CPU; this runs the CUDA step.
Prints one line per check and a JSON summary; exits 1 when a check fails, 2 without a CUDA GPU.

    python bench/adamw8bit_check.py [--bitsandbytes-path DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from remote.trainer.adamw8bit import GraphableAdamW8bit  # noqa: E402  (after the path)
from remote.trainer.lora_fused import flatten_parameters  # noqa: E402
from remote.trainer.optim import place_learning_rates  # noqa: E402

CUDA = torch.device("cuda")
Shapes = list[tuple[int, int]]
Check = dict[str, Any]

BASE_RATES = (1e-4, 2e-4)  # the two parameter groups' learning rates (the second without weight decay)
GRAPH_STEPS, SKIPPED_STEP = 12, 5
COMPARED_STEPS = 20
BLOCK = 256  # bitsandbytes' block of 8-bit state values, one absmax each
# Two runs are judged by how far apart their parameters end, in norm, relative to how far the parameters moved.
# bitsandbytes' native CPU library, which rounds through a lookup table, ends these 20 steps 0.2% from ours by that
# measure, while the few elements where a state code differs end up to 4.4 x lr apart: the largest elementwise
# differences are reported, not judged. Its CUDA kernel rounds in other ways too (adamw8bit.py's module doc).
UPDATE_TOLERANCE = 0.02
SYNC_MESSAGE = "called a synchronizing CUDA operation"  # torch's sync debug mode (c10/cuda/CUDAFunctions.cpp)


def lora_shapes(tensors: int, rank: int) -> Shapes:
    """Down and up matrices of LoRA layers; every third pair of rank // 4, under min_8bit_size."""
    widths = [320, 640, 1280, 768, 2560, 1024]
    shapes: Shapes = []
    for i in range(tensors // 2):
        width = widths[i % len(widths)]
        r = rank if i % 3 else max(1, rank // 4)
        shapes += [(r, width), (width, r)]
    return shapes


def make_parameters(shapes: Shapes, flat: bool = True) -> list[nn.Parameter]:
    """The same values at each call; ``flat``: views of one buffer, as the trainer's LoRA (lora_fused.py)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    params = [nn.Parameter((torch.randn(s, generator=generator) * 0.02).to(CUDA)) for s in shapes]
    if flat:
        flatten_parameters(params, torch.float32)
    else:
        for p in params:
            p.grad = torch.zeros_like(p)
    return params


def param_groups(params: list[nn.Parameter]) -> list[dict[str, Any]]:
    quarter = len(params) // 4
    return [
        {"params": params[:quarter], "lr": BASE_RATES[0]},
        {"params": params[quarter:], "lr": BASE_RATES[1], "weight_decay": 0.0},
    ]


def gradients(step: int, shapes: Shapes) -> list[torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(1000 + step)
    return [torch.randn(s, generator=generator).to(CUDA) * 1e-3 for s in shapes]


def set_gradients(params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        assert p.grad is not None
        p.grad.copy_(g)  # in place: a captured step reads these tensors


def set_learning_rates(optimizer: torch.optim.Optimizer, step: int, total: int) -> None:
    """A falling schedule: written into device tensors in place (a graph reads them), or as floats."""
    for group, base in zip(optimizer.param_groups, BASE_RATES, strict=True):
        rate = base * (1 - step / (total + 5))
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate


def same_state(
    a: torch.optim.Optimizer, a_params: list[nn.Parameter], b: torch.optim.Optimizer, b_params: list[nn.Parameter]
) -> bool:
    for x, y in zip(a_params, b_params, strict=True):
        if not torch.equal(x, y):
            return False
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in a.state[x] and not torch.equal(a.state[x][key], b.state[y][key]):
                return False
        if float(a.state[x]["step"]) != float(b.state[y]["step"]):
            return False
    return True


def eager_step_syncs(optimizer: torch.optim.Optimizer) -> bool:
    """Step once under torch's sync debug mode; whether the step synchronized with the host. Warnings, not
    errors, so that the step always completes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return any(SYNC_MESSAGE in str(w.message) for w in caught)


def step_on_side_stream(optimizer: torch.optim.Optimizer) -> None:
    """An eager step on a side stream: the warm-up before a capture."""
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        optimizer.step()
    torch.cuda.current_stream().wait_stream(side)


def with_graphable_rates(optimizer: GraphableAdamW8bit) -> GraphableAdamW8bit:
    place_learning_rates(optimizer, CUDA)
    return optimizer


def check_graph_equals_eager() -> Check:
    shapes = lora_shapes(800, 16)
    eager_params, graph_params = make_parameters(shapes), make_parameters(shapes)
    eager = with_graphable_rates(GraphableAdamW8bit(param_groups(eager_params)))
    graphed = with_graphable_rates(GraphableAdamW8bit(param_groups(graph_params)))
    for optimizer in (eager, graphed):
        optimizer.found_inf = torch.zeros((), device=CUDA)  # type: ignore[attr-defined]
    graph: torch.cuda.CUDAGraph | None = None
    syncs: list[bool] = []
    for step in range(GRAPH_STEPS):
        grads = gradients(step, shapes)
        if step == SKIPPED_STEP:
            grads[3].fill_(float("inf"))
        for params, optimizer in ((eager_params, eager), (graph_params, graphed)):
            set_gradients(params, grads)
            set_learning_rates(optimizer, step, GRAPH_STEPS)
            optimizer.found_inf.fill_(1.0 if step == SKIPPED_STEP else 0.0)  # type: ignore[attr-defined]
        syncs.append(eager_step_syncs(eager))
        if step == 0:
            step_on_side_stream(graphed)
            continue
        if graph is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graphed.step()
        graph.replay()
    torch.cuda.synchronize()
    equal = same_state(eager, eager_params, graphed, graph_params)
    counted = [float(eager.state[eager_params[0]]["step"]), float(graphed.state[graph_params[0]]["step"])]
    expected = GRAPH_STEPS - 1
    return {
        "ok": equal and counted == [expected, expected] and not any(syncs[1:]),
        "values": sum(a * b for a, b in shapes),
        "tensors": len(shapes),
        "passes": len(eager._passes),
        "graph_equals_eager": equal,
        "steps_counted": counted,
        "steps_expected": expected,
        "first_step_synced": syncs[0],  # expected: the row layout's one host-to-device copy
        "later_steps_synced": any(syncs[1:]),
    }


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in units of the largest learning rate."""
    return float((a.detach().float() - b.detach().float()).abs().max()) / max(BASE_RATES)


def update_difference(mine: list[nn.Parameter], theirs: list[nn.Parameter], start: list[torch.Tensor]) -> float:
    """||mine - theirs|| / ||theirs - start||, over all the parameters (on the CPU)."""
    apart = torch.cat([(a.detach().cpu() - b.detach().cpu()).flatten() for a, b in zip(mine, theirs, strict=True)])
    moved = torch.cat([(b.detach().cpu() - s).flatten() for b, s in zip(theirs, start, strict=True)])
    return float(apart.norm() / moved.norm().clamp_min(1e-30))


def check_against_bitsandbytes(bitsandbytes_missing: str | None) -> Check:
    shapes = lora_shapes(800, 16)
    ours_params = make_parameters(shapes)
    start = [p.detach().cpu().clone() for p in ours_params]
    ours = GraphableAdamW8bit(param_groups(ours_params))
    cpu_params = [nn.Parameter(p.detach().cpu().clone()) for p in ours_params]
    for p in cpu_params:
        p.grad = torch.zeros_like(p)
    cpu = GraphableAdamW8bit(param_groups(cpu_params))
    pairs: list[tuple[list[nn.Parameter], torch.optim.Optimizer]] = [(ours_params, ours)]
    if bitsandbytes_missing is None:
        from bitsandbytes.optim.adamw import AdamW8bit

        bnb_params = make_parameters(shapes, flat=False)
        bnb: torch.optim.Optimizer = AdamW8bit(param_groups(bnb_params))  # type: ignore[no-untyped-call]
        pairs.append((bnb_params, bnb))
    for step in range(COMPARED_STEPS):
        grads = gradients(step, shapes)
        for params, optimizer in pairs:
            set_gradients(params, grads)
            set_learning_rates(optimizer, step, COMPARED_STEPS)
            optimizer.step()
        set_gradients(cpu_params, [g.cpu() for g in grads])
        set_learning_rates(cpu, step, COMPARED_STEPS)
        cpu.step()

    cpu_update = update_difference(ours_params, cpu_params, start)
    cpu_worst, cpu_differing, state_values = 0.0, 0, 0
    for p, c in zip(ours_params, cpu_params, strict=True):
        cpu_worst = max(cpu_worst, largest_difference(p.cpu(), c))
        for key in ("state1", "state2"):
            cpu_differing += int((ours.state[p][key].cpu() != cpu.state[c][key]).sum())
            state_values += p.numel()
    result: Check = {
        f"ours_cuda_vs_ours_cpu_after_{COMPARED_STEPS}_steps": {
            "update_difference": cpu_update,
            "max_param_diff_in_units_of_the_largest_lr": cpu_worst,
            "state_values_differing": cpu_differing,
            "fraction_of_state_values_differing": cpu_differing / state_values,
        }
    }
    ok = cpu_update <= UPDATE_TOLERANCE
    if bitsandbytes_missing is not None:
        result["bitsandbytes"] = f"not compared: {bitsandbytes_missing}"
    else:
        bnb_params, bnb = pairs[1]
        bnb_update = update_difference(ours_params, bnb_params, start)
        worst_param, worst_state, differing, eight_bit_values = compare_with_bitsandbytes(
            ours, ours_params, bnb, bnb_params
        )
        result[f"vs_bitsandbytes_cuda_after_{COMPARED_STEPS}_steps"] = {
            "update_difference": bnb_update,
            "max_param_diff_in_units_of_the_largest_lr": worst_param,
            "max_dequantized_state_diff_over_block_absmax": worst_state,
            "fraction_of_8bit_state_bytes_differing": differing / max(1, eight_bit_values),
        }
        ok = ok and bnb_update <= UPDATE_TOLERANCE
    return {"ok": ok, **result}


def compare_with_bitsandbytes(
    ours: torch.optim.Optimizer,
    ours_params: list[nn.Parameter],
    bnb: torch.optim.Optimizer,
    bnb_params: list[nn.Parameter],
) -> tuple[float, float, int, int]:
    """(largest parameter difference in units of the largest lr, largest dequantized state difference over its
    block's absmax, 8-bit state bytes that differ, 8-bit state bytes)."""
    import bitsandbytes.functional as bnb_functional

    worst_param, worst_state, differing, total = 0.0, 0.0, 0, 0
    for p, q in zip(ours_params, bnb_params, strict=True):
        worst_param = max(worst_param, largest_difference(p, q))
        a, b = ours.state[p], bnb.state[q]
        if "absmax1" not in a:
            continue  # a float32 state: under min_8bit_size
        for i in (1, 2):
            state, absmax, code = f"state{i}", f"absmax{i}", f"qmap{i}"
            mine = bnb_functional.dequantize_blockwise(a[state], absmax=a[absmax], code=a[code], blocksize=BLOCK)
            theirs = bnb_functional.dequantize_blockwise(b[state], absmax=b[absmax], code=b[code], blocksize=BLOCK)
            block = b[absmax].repeat_interleave(BLOCK)[: p.numel()].view(p.shape)
            worst_state = max(worst_state, float(((mine - theirs).abs() / block.clamp(min=1e-30)).max()))
            differing += int((a[state] != b[state]).sum())
            total += p.numel()
    return worst_param, worst_state, differing, total


def timed(fn: Callable[[], object], warm: int = 5, runs: int = 30) -> float:
    """ms per call."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / runs * 1e3


def kernels(fn: Callable[[], object]) -> int:
    """CUDA kernels (and copies) one call launches."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        fn()
        torch.cuda.synchronize()
    return sum(1 for event in profiler.events() if event.device_type == DeviceType.CUDA)


def temporaries_mib(fn: Callable[[], object]) -> float:
    """The peak memory of one call above what was allocated before it."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def state_mib(optimizer: torch.optim.Optimizer) -> float:
    """The optimizer's per-parameter state tensors (the shared quantization maps and step counts left out)."""
    return (
        sum(
            t.numel() * t.element_size()
            for state in optimizer.state.values()
            for key, t in state.items()
            if isinstance(t, torch.Tensor) and key not in ("qmap1", "qmap2", "step")
        )
        / 2**20
    )


def measure_bitsandbytes(shapes: Shapes) -> tuple[Check, Check]:
    from bitsandbytes.optim.adamw import AdamW8bit

    params = make_parameters(shapes, flat=False)
    optimizer: torch.optim.Optimizer = AdamW8bit(param_groups(params))  # type: ignore[no-untyped-call]
    optimizer.step()
    speed = {"bitsandbytes_eager_ms": timed(optimizer.step), "bitsandbytes_kernels": kernels(optimizer.step)}
    memory = {
        "bitsandbytes_state_MiB": state_mib(optimizer),
        "bitsandbytes_step_temp_MiB": temporaries_mib(optimizer.step),
    }
    return speed, memory


def measure_ours(shapes: Shapes) -> tuple[Check, Check]:
    optimizer = with_graphable_rates(GraphableAdamW8bit(param_groups(make_parameters(shapes))))
    optimizer.step()
    speed: Check = {
        "ours_passes": len(optimizer._passes),
        "ours_eager_ms": timed(optimizer.step),
        "ours_kernels": kernels(optimizer.step),
    }
    memory: Check = {"ours_state_MiB": state_mib(optimizer), "ours_step_temp_MiB": temporaries_mib(optimizer.step)}
    step_on_side_stream(optimizer)
    graph = torch.cuda.CUDAGraph()
    before = torch.cuda.memory_reserved()
    with torch.cuda.graph(graph):
        optimizer.step()
    memory["ours_graph_pool_MiB"] = (torch.cuda.memory_reserved() - before) / 2**20
    speed["ours_graph_replay_ms"] = timed(graph.replay)
    return speed, memory


def measure_fused_adamw(shapes: Shapes) -> float:
    """ms per eager step of torch's fused, capturable AdamW (32-bit states) on the same parameters."""
    params = [nn.Parameter(torch.zeros(s, device=CUDA)) for s in shapes]
    flatten_parameters(params, torch.float32)
    optimizer = torch.optim.AdamW(params, lr=torch.tensor(1e-4, device=CUDA), fused=True, capturable=True)
    optimizer.step()
    return timed(optimizer.step)


def check_speed_and_memory(bitsandbytes_missing: str | None) -> tuple[Check, Check]:
    speed: Check = {"ok": True}
    memory: Check = {"ok": True}
    for rank in (16, 64):
        label = f"800 tensors rank {rank}"
        shapes = lora_shapes(800, rank)
        speed[label] = {"values": sum(a * b for a, b in shapes)}
        memory[label] = {}
        if bitsandbytes_missing is None:
            try:
                bnb_speed, bnb_memory = measure_bitsandbytes(shapes)
                speed[label].update(bnb_speed)
                memory[label].update(bnb_memory)
            except Exception as error:  # its numbers are missing, ours still come
                speed[label]["bitsandbytes_error"] = f"{type(error).__name__}: {error}"
        ours_speed, ours_memory = measure_ours(shapes)
        speed[label].update(ours_speed)
        memory[label].update(ours_memory)
        speed[label]["torch_fused_adamw_eager_ms"] = measure_fused_adamw(shapes)
        torch.cuda.empty_cache()
    return speed, memory


def import_bitsandbytes(path: Path | None) -> tuple[dict[str, str], str | None]:
    """Import bitsandbytes, from ``path`` first when given: (its version and file, None), or ({}, why not)."""
    if path is not None:
        sys.path.insert(0, str(path.resolve()))
    try:
        import bitsandbytes
    except Exception as error:
        return {}, f"bitsandbytes does not import: {type(error).__name__}: {error}"
    return {"version": bitsandbytes.__version__, "file": str(bitsandbytes.__file__)}, None


def guarded(check: Callable[[], Check]) -> Check:
    """A check's result, or a failure with its error: the other checks still run and report."""
    try:
        return check()
    except Exception as error:
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--bitsandbytes-path", type=Path, metavar="DIR", help="a folder put first on sys.path to import bitsandbytes"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the JSON summary here")
    args = parser.parse_args()
    if args.bitsandbytes_path is not None and not args.bitsandbytes_path.is_dir():
        parser.error(f"--bitsandbytes-path {args.bitsandbytes_path}: not a folder")
    if not torch.cuda.is_available():
        print("adamw8bit_check: needs a CUDA GPU, and torch finds none", file=sys.stderr)
        return 2

    bitsandbytes, missing = import_bitsandbytes(args.bitsandbytes_path)
    summary: dict[str, Check] = {
        "graph == eager": guarded(check_graph_equals_eager),
        "vs bitsandbytes": guarded(lambda: check_against_bitsandbytes(missing)),
    }
    try:
        summary["speed"], summary["memory"] = check_speed_and_memory(missing)
    except Exception as error:
        summary["speed"] = summary["memory"] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    for name, result in summary.items():
        print(f"{'ok  ' if result['ok'] else 'FAIL'} {name}: {result}", file=sys.stderr)
    environment = {"device": torch.cuda.get_device_name(CUDA), "torch": torch.__version__, "bitsandbytes": bitsandbytes}
    text = json.dumps({**environment, **summary}, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text)
    return 0 if all(result["ok"] for result in summary.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
