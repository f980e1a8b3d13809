"""GraphableAdamW8bit (remote/trainer/adamw8bit.py) against bitsandbytes' AdamW8bit on the CPU, and the properties
that let a CUDA graph hold its step: no host reads, learning rates read from device tensors, skipped steps."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import bitsandbytes.backends.cpu.ops as bnb_cpu_ops
import bitsandbytes.functional as bnb_functional
import pytest
import torch
from bitsandbytes.optim.adamw import AdamW8bit
from bitsandbytes.optim.lion import Lion8bit
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from remote.trainer.adamw8bit import GraphableAdamW8bit, dynamic_map
from remote.trainer.lora_fused import flatten_parameters
from remote.trainer.optim import (
    OptimizerError,
    is_graphable,
    make_scheduler,
    optimizer_class,
    place_learning_rates,
)

# below and above min_8bit_size (4096), most not multiples of the 256-value block
SHAPES = [(5000,), (64, 100), (4096,), (33, 7), (4095,), (300, 17), (256,), (1,), (2, 3, 600)]
STEPS = 20


@pytest.fixture
def bitsandbytes_pytorch_quantizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """bitsandbytes' CPU optimizer quantizes through its native library when that loads (a lookup table of 65536
    entries); this sends it to bitsandbytes' own PyTorch quantize_blockwise (backends/default), which the CPU
    backend uses without the library and which GraphableAdamW8bit follows."""
    pytorch_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

    def quantize(values, code, absmax_out, out_uint8, blocksize):
        codes, absmax = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
            pytorch_kernel, values, code, blocksize
        )
        out_uint8.copy_(codes)
        absmax_out.copy_(absmax)

    monkeypatch.setattr(bnb_cpu_ops, "_quant_blockwise_fp32_direct", quantize)


def _parameters(flat: bool, seed: int = 0, shapes: list[tuple[int, ...]] = SHAPES) -> list[nn.Parameter]:
    """Separate tensors, or views of one flat buffer with their gradients views of another (the trainer's
    layout, lora_fused.py)."""
    generator = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    if flat:
        flatten_parameters(params, torch.float32)
    return params


def _groups(params: list[nn.Parameter]) -> list[dict]:
    return [
        {"params": params[:4], "lr": 1e-3},
        {"params": params[4:], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)},
    ]


def _gradients(step: int, shapes: list[tuple[int, ...]] = SHAPES) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(shape, generator=generator) * (0.1 + step) for shape in shapes]


def _set_gradients(params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)  # in place: views of the flat gradient buffer stay views


def _run(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], steps: range) -> None:
    """Steps with fresh gradients and a learning rate that falls each step (written as the groups hold it)."""
    for step in steps:
        _set_gradients(params, _gradients(step))
        for group, base in zip(optimizer.param_groups, (1e-3, 3e-3), strict=True):
            rate = base * (1 - step / 25)
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(rate)
            else:
                group["lr"] = rate
        optimizer.step()


STATE_TENSORS = ("state1", "state2", "absmax1", "absmax2")


def _assert_same_state(a: torch.optim.Optimizer, pa: list, b: torch.optim.Optimizer, pb: list) -> None:
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y), tuple(x.shape)
        sa, sb = a.state[x], b.state[y]
        assert int(sa["step"]) == int(sb["step"])
        for name in STATE_TENSORS:
            assert (name in sa) == (name in sb)
            if name in sa:
                assert torch.equal(sa[name], sb[name]), (tuple(x.shape), name)


@pytest.mark.parametrize("flat", [False, True], ids=["separate-tensors", "flat-buffer"])
def test_same_states_and_parameters_as_bitsandbytes_byte_for_byte(bitsandbytes_pytorch_quantizer, flat):
    """20 steps, two groups (one without weight decay, other betas), a falling learning rate, tensors below and
    above min_8bit_size, and small passes so that tensors straddle them: every parameter and state byte agrees."""
    ours_params, theirs_params = _parameters(flat), _parameters(flat=False)
    ours = GraphableAdamW8bit(_groups(ours_params), weight_decay=0.05, rows_per_pass=8)
    theirs = AdamW8bit(_groups(theirs_params), weight_decay=0.05)
    _run(ours, ours_params, range(STEPS))
    _run(theirs, theirs_params, range(STEPS))

    _assert_same_state(ours, ours_params, theirs, theirs_params)
    for p, q in zip(ours_params, theirs_params, strict=True):
        mine, bnb = ours.state[p], theirs.state[q]
        assert set(mine) == set(bnb)  # the same names: step, state1/2, and for 8-bit ones qmap1/2, absmax1/2
        for name in set(bnb) - {"step"}:
            assert (mine[name].dtype, mine[name].shape) == (bnb[name].dtype, bnb[name].shape), name
        assert ("qmap1" in bnb) == (p.numel() >= 4096)
        if "qmap1" in bnb:
            assert torch.equal(mine["qmap1"], bnb["qmap1"]) and torch.equal(mine["qmap2"], bnb["qmap2"])


def test_blocks_at_the_edges_quantized_as_bitsandbytes(bitsandbytes_pytorch_quantizer):
    """bitsandbytes' PyTorch quantizer treats a tensor's last, partial block apart: it divides by the block's
    absmax (full blocks: multiplied by its reciprocal) and stores that absmax clamped to 1e-38. These gradients
    (found by a search) give a first momentum whose code differs between the two roundings; the second tensor's
    are zero, as a LoRA down matrix's are until its up matrix moves."""
    sizes, partial = (4096 + 8, 4096 + 100), [3.0, -2.4515624046325684, 1.5234376192092896, -0.2915624976158142]
    ours_params = [nn.Parameter(torch.ones(n)) for n in sizes]
    theirs_params = [nn.Parameter(torch.ones(n)) for n in sizes]
    grads = [torch.zeros(n) for n in sizes]
    grads[0][-len(partial) :] = torch.tensor(partial)
    ours, theirs = GraphableAdamW8bit(ours_params), AdamW8bit(theirs_params)
    for params, optimizer in ((ours_params, ours), (theirs_params, theirs)):
        _set_gradients(params, grads)
        optimizer.step()
    _assert_same_state(ours, ours_params, theirs, theirs_params)


def test_dynamic_maps_are_bitsandbytes():
    assert torch.equal(dynamic_map(signed=True), bnb_functional.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_map(signed=False), bnb_functional.create_dynamic_map(signed=False))


def _dequantized(state: dict, index: int) -> torch.Tensor:
    codes, absmax, qmap = state[f"state{index}"], state[f"absmax{index}"], state[f"qmap{index}"]
    return bnb_functional.dequantize_blockwise(codes, absmax=absmax, code=qmap, blocksize=256)


def test_close_to_bitsandbytes_with_its_native_cpu_quantizer():
    """bitsandbytes' native CPU library picks codes from a table of 65536 steps over [-1, 1]: a value within
    1/32768 of a block's absmax from the midpoint of two codes (the codes near zero are closer than that) may get
    the other one. Where a second moment near zero gets another code, that value's next update differs by up
    to about the learning rate, and the runs drift apart from there. Measured over these 20 steps: parameters
    within 0.6 lr, dequantized states within 3% of their block's absmax, 5% of the state bytes different; the
    bounds below leave room for that."""
    ours_params, theirs_params = _parameters(flat=True), _parameters(flat=False)
    ours = GraphableAdamW8bit(_groups(ours_params), weight_decay=0.05)
    theirs = AdamW8bit(_groups(theirs_params), weight_decay=0.05)
    _run(ours, ours_params, range(STEPS))
    _run(theirs, theirs_params, range(STEPS))

    largest_lr, differing, values = 3e-3, 0, 0
    for p, q in zip(ours_params, theirs_params, strict=True):
        assert (p - q).abs().max() <= largest_lr
        mine, bnb = ours.state[p], theirs.state[q]
        if "qmap1" not in bnb:
            assert torch.equal(mine["state1"], bnb["state1"]) and torch.equal(mine["state2"], bnb["state2"])
            continue
        for index in (1, 2):
            block_absmax = bnb[f"absmax{index}"].repeat_interleave(256)[: p.numel()].view(p.shape)
            assert ((_dequantized(mine, index) - _dequantized(bnb, index)).abs() <= 0.06 * block_absmax).all()
            differing += int((mine[f"state{index}"] != bnb[f"state{index}"]).sum())
            values += p.numel()
    assert differing <= 0.1 * values


# --------------------------------------------------------------------------------------------------------
# What a CUDA graph needs


@contextmanager
def no_host_reads() -> Iterator[None]:
    """Reading a tensor's value on the host (.item(), bool(), float(), .tolist(), ...) raises, as a host sync
    raises inside a CUDA graph capture."""

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor's value was read on the host")

    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
            patch.setattr(torch.Tensor, name, refuse)
        yield


def test_step_reads_nothing_on_the_host_and_the_lr_tensor_each_time():
    """Learning rates as the trainer holds them for a graph (float64 device tensors that the scheduler fills
    in place); with found_inf set. Written into the same tensor, a new rate changes the next step."""
    params, reference_params = _parameters(flat=True), _parameters(flat=True)
    optimizer = GraphableAdamW8bit(_groups(params), weight_decay=0.05)
    reference = GraphableAdamW8bit(_groups(reference_params), weight_decay=0.05)
    place_learning_rates(optimizer, torch.device("cpu"))
    rates = [group["lr"] for group in optimizer.param_groups]
    assert all(isinstance(rate, torch.Tensor) and rate.dtype == torch.float64 for rate in rates)
    optimizer.found_inf = torch.zeros(())  # type: ignore[attr-defined]

    for step, factor in enumerate((1.0, 0.25)):
        for rate, ref_group, base in zip(rates, reference.param_groups, (1e-3, 3e-3), strict=True):
            rate.fill_(base * factor)
            ref_group["lr"] = base * factor
        _set_gradients(params, _gradients(step))
        _set_gradients(reference_params, _gradients(step))
        with no_host_reads():
            optimizer.step()
        reference.step()
    assert [group["lr"] for group in optimizer.param_groups] == rates  # the same tensor objects
    _assert_same_state(optimizer, params, reference, reference_params)

    unchanged_params = _parameters(flat=True)
    unchanged = GraphableAdamW8bit(_groups(unchanged_params), weight_decay=0.05)
    for step in range(2):
        _set_gradients(unchanged_params, _gradients(step))
        unchanged.step()
    assert any(not torch.equal(p, q) for p, q in zip(params, unchanged_params, strict=True))


def test_host_read_guard_catches_a_read():
    with no_host_reads(), pytest.raises(AssertionError, match="read on the host"):
        bool(torch.ones(()) > 0)


def test_found_inf_skips_the_step_entirely():
    """A step with found_inf set (and gradients full of inf and NaN) changes no parameter, state byte or step
    count; the next clean step goes on as if the skipped one had never been."""
    params, reference_params = _parameters(flat=True), _parameters(flat=True)
    optimizer = GraphableAdamW8bit(_groups(params), weight_decay=0.05, rows_per_pass=8)
    reference = GraphableAdamW8bit(_groups(reference_params), weight_decay=0.05, rows_per_pass=8)
    optimizer.found_inf = torch.zeros(())  # type: ignore[attr-defined]
    _run(optimizer, params, range(3))
    _run(reference, reference_params, range(3))

    before = [p.clone() for p in params]
    states_before = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params]
    optimizer.found_inf.fill_(1.0)  # type: ignore[attr-defined]
    _set_gradients(params, [torch.full(shape, float("inf")) for shape in SHAPES])
    params[0].grad[0] = float("nan")  # type: ignore[index]
    optimizer.step()
    for p, old, old_state in zip(params, before, states_before, strict=True):
        assert torch.equal(p, old)
        for name, value in optimizer.state[p].items():
            assert torch.equal(value, old_state[name]), name

    optimizer.found_inf.zero_()  # type: ignore[attr-defined]
    _run(optimizer, params, range(3, 5))
    _run(reference, reference_params, range(3, 5))
    _assert_same_state(optimizer, params, reference, reference_params)


def test_gradscaler_hands_it_the_scale_and_the_overflow():
    """torch's GradScaler, through the attributes it sets on optimizers with _step_supports_amp_scaling: scaled
    gradients give the unscaled step (a power-of-two scale: exactly), an overflow skips it."""
    params, reference_params = _parameters(flat=True), _parameters(flat=True)
    optimizer = GraphableAdamW8bit(_groups(params), weight_decay=0.05)
    reference = GraphableAdamW8bit(_groups(reference_params), weight_decay=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        grads = _gradients(step)
        scaled_one = scaler.scale(torch.ones(()))  # as a scaled loss's backward would scale the gradients
        _set_gradients(params, [g * scaled_one for g in grads])
        _set_gradients(reference_params, grads)
        scaler.step(optimizer)
        scaler.update()
        reference.step()
    _assert_same_state(optimizer, params, reference, reference_params)

    before = [p.clone() for p in params]
    _set_gradients(params, [torch.full(shape, float("inf")) for shape in SHAPES])
    scaler.step(optimizer)
    assert all(torch.equal(p, old) for p, old in zip(params, before, strict=True))
    assert int(optimizer.state[params[0]]["step"]) == 3


def _count_operations(optimizer: torch.optim.Optimizer) -> Counter:
    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    optimizer.step()  # the first step finds the layout
    with Count() as count:
        optimizer.step()
    return count.calls


def _lora_like(tensors: int) -> list[nn.Parameter]:
    shapes = [(4, 320), (320, 4), (16, 640), (640, 16)] * (tensors // 4)
    params = [nn.Parameter(torch.randn(shape) * 0.01) for shape in shapes]
    flatten_parameters(params, torch.float32)
    for p in params:
        p.grad.normal_()  # type: ignore[union-attr]
    return params


def test_operations_per_step_do_not_grow_with_the_number_of_tensors():
    """The same operations for 8 tensors and 800 (views of one buffer, as the trainer's LoRA): no per-tensor
    loop (bitsandbytes' step: one kernel per tensor). About 80 compute operations and 36 views here, for one
    pass over the 8-bit tensors and one over the others."""
    counts = []
    for tensors in (8, 800):
        params = _lora_like(tensors)
        groups = [{"params": params[: tensors // 2]}, {"params": params[tensors // 2 :], "lr": 2e-4}]
        optimizer = GraphableAdamW8bit(groups, lr=1e-4)
        place_learning_rates(optimizer, torch.device("cpu"))
        counts.append(_count_operations(optimizer))
    assert counts[0] == counts[1]
    assert sum(counts[0].values()) < 150


def test_every_parameter_needs_a_gradient():
    params = _parameters(flat=False)
    optimizer = GraphableAdamW8bit(_groups(params))
    _set_gradients(params[1:], _gradients(0)[1:])
    with pytest.raises(ValueError, match=r"shape \(5000,\) has no gradient"):
        optimizer.step()


# --------------------------------------------------------------------------------------------------------
# Saving and loading


def _saved(optimizer: torch.optim.Optimizer) -> dict:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_round_trip_continues_as_uninterrupted():
    params, fresh_params = _parameters(flat=True), _parameters(flat=True, seed=7)
    optimizer = GraphableAdamW8bit(_groups(params), weight_decay=0.05)
    place_learning_rates(optimizer, torch.device("cpu"))
    _run(optimizer, params, range(5))
    saved = _saved(optimizer)
    for fresh, p in zip(fresh_params, params, strict=True):
        fresh.data.copy_(p)
    resumed = GraphableAdamW8bit(_groups(fresh_params), weight_decay=0.05)
    place_learning_rates(resumed, torch.device("cpu"))
    rate = resumed.param_groups[0]["lr"]
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] is rate  # filled in place: a captured step reads this tensor
    _run(optimizer, params, range(5, 10))
    _run(resumed, fresh_params, range(5, 10))
    _assert_same_state(optimizer, params, resumed, fresh_params)


def test_state_dict_is_bitsandbytes_format_both_ways(bitsandbytes_pytorch_quantizer):
    """A state saved here loads into bitsandbytes' AdamW8bit and the other way round (a run resumed with CUDA
    graphs on or off), and both go on identically."""
    params, bnb_params = _parameters(flat=True), _parameters(flat=False)
    optimizer = GraphableAdamW8bit(_groups(params), weight_decay=0.05)
    _run(optimizer, params, range(4))
    for q, p in zip(bnb_params, params, strict=True):
        q.data.copy_(p)
    bnb = AdamW8bit(_groups(bnb_params), weight_decay=0.05)
    bnb.load_state_dict(_saved(optimizer))
    _run(optimizer, params, range(4, 7))
    _run(bnb, bnb_params, range(4, 7))
    _assert_same_state(optimizer, params, bnb, bnb_params)

    back_params = _parameters(flat=True, seed=3)
    for q, p in zip(back_params, bnb_params, strict=True):
        q.data.copy_(p)
    back = GraphableAdamW8bit(_groups(back_params), weight_decay=0.05)
    back.load_state_dict(_saved(bnb))
    _run(back, back_params, range(7, 9))
    _run(bnb, bnb_params, range(7, 9))
    _assert_same_state(back, back_params, bnb, bnb_params)


# --------------------------------------------------------------------------------------------------------
# The trainer's choice (remote/trainer/optim.py)


def test_adamw8bit_for_a_cuda_graph_is_this_one_else_bitsandbytes():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert optimizer_class("AdamW8bit", {}, cuda, graphable=True) is GraphableAdamW8bit
    assert optimizer_class("AdamW8bit", {"weight_decay": 0.1}, cuda, graphable=True) is GraphableAdamW8bit
    assert optimizer_class("AdamW8bit", {}, cuda, graphable=False) is AdamW8bit
    assert optimizer_class("AdamW8bit", {"is_paged": True}, cuda, graphable=True) is AdamW8bit
    assert optimizer_class("Lion8bit", {}, cuda, graphable=True) is Lion8bit
    with pytest.raises(OptimizerError, match="needs a CUDA GPU"):
        optimizer_class("AdamW8bit", {}, cpu, graphable=True)


def test_trainer_treats_it_as_graphable_with_scheduled_rate_tensors():
    params = _parameters(flat=True)
    optimizer = GraphableAdamW8bit(_groups(params))
    assert is_graphable(optimizer)
    place_learning_rates(optimizer, torch.device("cpu"))
    rate = optimizer.param_groups[0]["lr"]
    scheduler = make_scheduler(optimizer, "linear", 0, 10)
    for step in range(3):
        _set_gradients(params, _gradients(step))
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] is rate
    assert float(rate) == pytest.approx(1e-3 * 7 / 10)
