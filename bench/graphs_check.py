"""Does the CUDA-graph machinery (remote/trainer/graphs.py) replay what the eager step computes? On a GPU:

    replay == eager    the tiny SD 1.5 model with its fused LoRA, batches of two shapes: each micro-batch's
                       loss and the accumulated LoRA gradient, through StepGraphs and eagerly
    planning           which batches ran eagerly (the first of each shape) and which shapes were captured
    fallback           a backward pass that reads a value on the host cannot be captured: the graphs turn
                       off with a message and the batch still trains, eagerly, to the same loss
    optimizer graph    fused, capturable AdamW stepped through OptimizerGraph against the same optimizer
                       stepped eagerly, with the learning-rate schedule moving; the same for Lion
                       (remote/trainer/lion.py's GraphableLion)

tests/trainer/test_graphs.py checks the decisions on the CPU with stand-ins; this runs the real graphs.
Prints one line per check and a JSON summary; exits 1 when a check fails.

    python bench/graphs_check.py [--batches 6]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOLERANCE = 1e-5  # relative; the replay runs the same kernels, so it is expected to match to the bit


def tiny_run(device, dtype):  # type: ignore[no-untyped-def]
    """The pieces of a run that step.backward_pass reads, around the tiny SD 1.5 model and its LoRA."""
    import torch

    from remote.trainer.families import get_family
    from remote.trainer.lora import LoRANetwork
    from remote.trainer.tiny import build_tiny

    family = get_family("sd15")
    parts = build_tiny("sd15")
    unet = parts["unet"].to(device, dtype)
    torch.manual_seed(0)
    network = LoRANetwork(unet, [], "sd15", 8, 4)
    network.apply_to()
    for lora in network.loras():  # a LoRA that does something (kohya starts its up weights at zero)
        torch.nn.init.normal_(lora.lora_up.weight, std=0.02)
    network.to(device, torch.float32)
    network.use_flat_buffers(dtype, side_stream=True)
    cfg = SimpleNamespace(min_snr_gamma=5.0, gradient_accumulation_steps=1, trains_text_encoder=False, clip_skip=None)
    bundle = SimpleNamespace(unet=unet)
    return SimpleNamespace(
        cfg=cfg,
        family=family,
        objective=family.objective(False),
        bundle=bundle,
        dtype=dtype,
        device=device,
        network=network,
        scaler=None,
        ranks=SimpleNamespace(world=1),
    )


def batches(device, count: int):  # type: ignore[no-untyped-def]
    import torch

    from remote.trainer.graphs import StepInputs

    gen = torch.Generator(device=device).manual_seed(1)
    out = []
    for index in range(count):
        size = 8 if index % 3 else 16  # two shapes: 16 px latents every third batch
        out.append(
            StepInputs(
                latents=torch.randn(2, 4, size, size, generator=gen, device=device),
                noise=torch.randn(2, 4, size, size, generator=gen, device=device),
                timesteps=torch.randint(0, 1000, (2,), generator=gen, device=device),
                weights=torch.ones(2, device=device),
                context=torch.randn(2, 77, 32, generator=gen, device=device, dtype=torch.bfloat16),
            )
        )
    return out


def relative(a, b) -> float:  # type: ignore[no-untyped-def]
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def check_replay(device, count: int) -> dict:  # type: ignore[type-arg]
    import torch

    from remote.trainer.graphs import StepGraphs
    from remote.trainer.step import backward_pass

    inputs = batches(device, count)
    results = {}
    for label in ("eager", "graphs"):
        run = tiny_run(device, torch.bfloat16)
        graphs = StepGraphs(lambda x, run=run: backward_pass(run, x)) if label == "graphs" else None
        losses = []
        for batch in inputs:
            losses.append(graphs.backward(batch) if graphs is not None else backward_pass(run, batch))
        torch.cuda.synchronize()
        results[label] = (torch.stack(losses), run.network.flat_buffers.master_grad.clone(), graphs)
    eager_losses, eager_grad, _ = results["eager"]
    graph_losses, graph_grad, graphs = results["graphs"]
    loss_error = max(relative(g, e) for g, e in zip(graph_losses, eager_losses, strict=True))
    grad_error = relative(graph_grad, eager_grad)
    shapes = 2 if count >= 4 else 1
    planning_ok = graphs.captured_shapes == shapes and graphs.eager_steps == shapes and graphs.disabled is None
    return {
        "replay == eager": {
            "ok": loss_error <= TOLERANCE and grad_error <= TOLERANCE,
            "loss": loss_error,
            "gradient": grad_error,
        },
        "planning": {"ok": planning_ok, "captured_shapes": graphs.captured_shapes, "eager_steps": graphs.eager_steps},
    }


def check_fallback(device) -> dict:  # type: ignore[type-arg]
    import torch

    from remote.trainer.graphs import StepGraphs
    from remote.trainer.step import backward_pass

    run = tiny_run(device, torch.bfloat16)
    messages: list[str] = []

    def syncing(batch):  # type: ignore[no-untyped-def]
        loss = backward_pass(run, batch)
        if float(loss) < 0:  # a host read: illegal while a stream is being captured
            raise AssertionError("a loss is never negative")
        return loss

    graphs = StepGraphs(syncing, on_disable=messages.append)
    inputs = batches(device, 1)[0]
    losses = [graphs.backward(inputs) for _ in range(3)]
    torch.cuda.synchronize()
    same = all(torch.equal(loss, losses[0]) for loss in losses)  # the weights do not move: one loss, three times
    ok = graphs.disabled is not None and messages == [graphs.disabled] and not graphs.graphs and same
    return {"fallback": {"ok": ok and graphs.eager_steps == 3, "message": graphs.disabled}}


def check_optimizer(device, name: str = "AdamW", steps: int = 6) -> dict:  # type: ignore[type-arg]
    import torch

    from remote.trainer.graphs import OptimizerGraph
    from remote.trainer.optim import is_graphable, make_optimizer, make_scheduler, place_learning_rates

    def build():  # type: ignore[no-untyped-def]
        gen = torch.Generator(device=device).manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(64, 32, generator=gen, device=device)) for _ in range(3)]
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer, _ = make_optimizer(name, [{"params": params, "lr": 1e-2}], 1e-2, [], device, graphable=True)
        place_learning_rates(optimizer, device)
        return params, optimizer, make_scheduler(optimizer, "cosine", 2, steps)

    grads = [[torch.randn(64, 32, device=device) for _ in range(3)] for _ in range(steps)]
    finals = {}
    for label in ("eager", "graph"):
        params, optimizer, scheduler = build()
        graph = OptimizerGraph(optimizer.step) if label == "graph" else None
        for step in range(steps):
            for p, g in zip(params, grads[step], strict=True):
                p.grad.copy_(g)  # in place: the graph reads these tensors
            graph.step() if graph is not None else optimizer.step()
            scheduler.step()
        torch.cuda.synchronize()
        finals[label] = (torch.cat([p.detach().flatten() for p in params]), graph, is_graphable(optimizer))
    error = relative(finals["graph"][0], finals["eager"][0])
    graph = finals["graph"][1]
    ok = error <= TOLERANCE and graph.graph is not None and graph.disabled is None and finals["graph"][2]
    key = "optimizer graph" if name == "AdamW" else f"optimizer graph ({name})"
    return {key: {"ok": ok, "parameters": error, "disabled": graph.disabled}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("graphs_check: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    checks = {
        "replay": lambda: check_replay(device, args.batches),
        "fallback": lambda: check_fallback(device),
        "optimizer": lambda: check_optimizer(device),
        "optimizer (Lion)": lambda: check_optimizer(device, "Lion"),
    }
    summary: dict[str, Any] = {}
    for name, check in checks.items():  # in this order: the optimizer check draws random numbers after a fallback
        try:
            summary.update(check())
        except Exception as exc:  # a crashed check is a failed one; the others still run
            summary[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    for name, result in summary.items():
        print(f"{'ok  ' if result['ok'] else 'FAIL'} {name}: {result}", file=sys.stderr)
    print(json.dumps({"device": torch.cuda.get_device_name(device), **summary}))
    return 0 if all(result["ok"] for result in summary.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
