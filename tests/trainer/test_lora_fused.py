"""The LoRA's flat buffers and fused layer compute what the plain LoRA computes, with fewer operations."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from remote.trainer.lora import LoRAModule, LoRANetwork, save_kohya
from remote.trainer.lora_fused import FusedLoRALinear, SideStream


class _Block(nn.Module):
    """A stand-in network: two Linears and a 1x1 conv (fused), a 3x3 conv (not fused)."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(12, 12)
        self.out = nn.Linear(12, 12, bias=False)
        self.proj = nn.Conv2d(12, 12, 1)
        self.conv = nn.Conv2d(12, 12, 3, padding=1)

    def forward(self, x):  # x: (N, 12, H, W)
        n, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(n, h * w, c)
        tokens = self.out(torch.tanh(self.q(tokens)))
        x = x + tokens.reshape(n, h, w, c).permute(0, 3, 1, 2)
        return self.conv(self.proj(x))


def _network(block: _Block) -> LoRANetwork:
    network = LoRANetwork(None, [], "sd15", dim=4, alpha=2)
    targets = {"q": block.q, "out": block.out, "proj": block.proj, "conv": block.conv}
    for name, module in targets.items():
        lora = LoRAModule(f"lora_unet_{name}", module, dim=4, alpha=2)
        nn.init.normal_(lora.lora_up.weight, std=0.5)  # non-zero, so every gradient path carries signal
        network.add_module(lora.lora_name, lora)
        network.unet_names.append(lora.lora_name)
    return network


def _plain_and_fused(dtype=torch.float32):
    torch.manual_seed(0)
    block = _Block().to(dtype)
    plain_network = _network(block)
    fused_block = copy.deepcopy(block)
    fused_network = copy.deepcopy(plain_network)
    for lora, target in zip(
        fused_network.loras(), (fused_block.q, fused_block.out, fused_block.proj, fused_block.conv), strict=True
    ):
        lora._org = [target]
    plain_network.apply_to()
    fused_network.apply_to()
    fused_network.use_flat_buffers(dtype)
    for part in (block, fused_block):
        part.requires_grad_(False)
    return block, plain_network, fused_block, fused_network


def test_fused_layers_match_the_plain_lora_in_output_and_every_gradient():
    block, plain, fused_block, fused = _plain_and_fused()
    assert [lora.fused_views is not None for lora in fused.loras()] == [True, True, True, False]
    x = torch.randn(2, 12, 5, 5, requires_grad=True)
    x_fused = x.detach().clone().requires_grad_(True)

    out = block(x)
    fused.flat.begin_micro_batch()
    out_fused = fused_block(x_fused)
    torch.testing.assert_close(out_fused, out)

    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (out_fused * weight).sum().backward()
    fused.flat.end_micro_batch()
    torch.testing.assert_close(x_fused.grad, x.grad)
    for name, param in plain.named_parameters():
        torch.testing.assert_close(dict(fused.named_parameters())[name].grad, param.grad, msg=name)


def test_bf16_compute_copy_accumulates_into_fp32_master_gradients_and_follows_the_master():
    _, _, fused_block, fused = _plain_and_fused(torch.bfloat16)
    flat = fused.flat
    assert flat.master.dtype == torch.float32 and flat.compute.dtype == torch.bfloat16
    lora_q = next(iter(fused.loras()))
    assert lora_q.lora_down.weight.dtype == torch.float32

    x = torch.randn(2, 12, 4, 4, dtype=torch.bfloat16)  # no gradient: the LoRA's must still flow
    for _ in range(2):  # two micro-batches add up
        flat.begin_micro_batch()
        fused_block(x).float().sum().backward()
        flat.end_micro_batch()
    once = lora_q.lora_up.weight.grad.clone()
    assert once.abs().sum() > 0

    flat.zero_grad()
    assert float(flat.master_grad.abs().sum()) == 0.0
    with torch.no_grad():
        lora_q.lora_down.weight.add_(1.0)  # an optimizer step on the master weights
    flat.begin_micro_batch()
    torch.testing.assert_close(
        fused.loras().__next__().fused_views[0][0].float(), lora_q.lora_down.weight.detach(), atol=1e-2, rtol=1e-2
    )


def test_parameters_are_views_of_the_flat_buffer_and_the_saved_file_is_independent(tmp_path):
    _, _, _, fused = _plain_and_fused()
    flat = fused.flat
    for param in fused.parameters():
        assert param.untyped_storage().data_ptr() == flat.master.untyped_storage().data_ptr()
        assert param.grad.untyped_storage().data_ptr() == flat.master_grad.untyped_storage().data_ptr()
    assert sum(p.numel() for p in fused.parameters()) == flat.master.numel()

    digest = save_kohya(fused, tmp_path / "lora.safetensors", {}, None)  # shared storage would refuse to save
    assert len(digest) == 64
    saved = fused.kohya_state_dict()
    flat.master.zero_()
    assert any(float(t.abs().sum()) > 0 for key, t in saved.items() if key.endswith("weight"))


def test_no_grad_forward_takes_the_plain_path_from_the_master_weights():
    block, plain, fused_block, fused = _plain_and_fused()
    x = torch.randn(1, 12, 3, 3)
    with torch.no_grad():
        for network in (plain, fused):
            for param in network.parameters():
                param.mul_(2.0)  # an optimizer step: the fused compute copy is now stale
            network.set_multiplier(0.5)
        expected, sampled = block(x), fused_block(x)
    torch.testing.assert_close(sampled, expected)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def _ops_for_one_linear(fused: bool) -> list[str]:
    torch.manual_seed(0)
    base = nn.Linear(16, 16).to(torch.bfloat16).requires_grad_(False)
    network = LoRANetwork(None, [], "sd15", dim=4, alpha=2)
    lora = LoRAModule("lora_unet_x", base, dim=4, alpha=2)
    network.add_module(lora.lora_name, lora)
    network.unet_names.append(lora.lora_name)
    lora.apply_to()
    if fused:
        network.use_flat_buffers(torch.bfloat16)
    else:
        for param in network.parameters():
            param.grad = torch.zeros_like(param)  # accumulate in place, as the graphs did
    x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    with _CountOps() as counter:
        base(x).sum().backward()
    return [op for op in counter.ops if op not in {"sum", "ones_like", "expand", "detach", "view", "t", "reshape"}]


def test_the_fused_layer_runs_fewer_operations_than_base_plus_plain_lora():
    plain = _ops_for_one_linear(fused=False)
    fused = _ops_for_one_linear(fused=True)
    assert fused.count("_to_copy") == 0  # no weight or gradient casts
    # the base's bias add is the only out-of-place addmm: on CUDA an out-of-place addmm onto a full-size
    # matrix first copies it into its result, so the LoRA's up product adds in place
    assert fused.count("addmm") == 1
    assert plain.count("_to_copy") >= 4
    assert len(fused) <= 8, fused
    assert len(plain) >= len(fused) + 6, (plain, fused)


def test_fused_function_without_bias_and_3d_input_matches_linear_algebra():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, requires_grad=True)
    weight = torch.randn(5, 6)
    down, up = torch.randn(2, 6), torch.randn(5, 2)
    grad_down, grad_up = torch.zeros_like(down), torch.zeros_like(up)
    master = torch.zeros(1, requires_grad=True)
    out = FusedLoRALinear.apply(x, master, master, weight, None, down, up, grad_down, grad_up, 0.5, None)
    expected_fn = lambda x_, d, u: x_ @ weight.T + 0.5 * (x_ @ d.T) @ u.T  # noqa: E731
    d_ref, u_ref = down.clone().requires_grad_(True), up.clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = expected_fn(x_ref, d_ref, u_ref)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(grad_down, d_ref.grad)
    torch.testing.assert_close(grad_up, u_ref.grad)
    assert master.grad is None


@pytest.mark.parametrize("channels_last", [False, True])
def test_one_by_one_convolution_in_either_memory_format(channels_last):
    block, _, fused_block, fused = _plain_and_fused()
    x = torch.randn(2, 12, 4, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fused.flat.begin_micro_batch()
    torch.testing.assert_close(fused_block.proj(x.requires_grad_(True)), block.proj(x))


class _InlineSide(SideStream):
    """The side-stream bookkeeping without CUDA: blocks run inline, the order of forks and waits is logged."""

    def __init__(self):
        self.held = []
        self.calls: list[str] = []

    def side(self, after_current: bool = True):
        self.calls.append("fork" if after_current else "side")
        return nullcontext()

    def wait(self) -> None:
        self.calls.append("wait")


def test_side_stream_path_computes_the_same_and_holds_its_inputs_until_the_micro_batch_ends():
    _, _, fused_block, fused_network = _plain_and_fused()
    _, _, serial_block, serial_network = _plain_and_fused()  # the same seed: the same weights
    side = _InlineSide()
    fused_network.flat.side_stream = side
    for lora in fused_network.loras():
        if lora.fused_views is not None:
            lora.fused_side = side

    torch.manual_seed(3)
    x = torch.randn(2, 12, 3, 3)
    outputs = []
    for network, part in ((fused_network, fused_block), (serial_network, serial_block)):
        network.flat.begin_micro_batch()
        out = part(x)
        out.square().mean().backward()
        outputs.append(out.detach())
        if network is fused_network:
            assert len(side.held) == 4  # the last fused layer's gradient products are not yet joined
        network.flat.end_micro_batch()
    assert side.held == []
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    torch.testing.assert_close(fused_network.flat.master_grad, serial_network.flat.master_grad, rtol=0, atol=0)
    # forward: fork, wait per fused layer; backward: join the layer before, fork, wait, side products
    assert side.calls[:6] == ["fork", "wait"] * 3
    assert side.calls[6:10] == ["wait", "fork", "wait", "side"]
    assert side.calls[-1] == "wait"  # end_micro_batch's join


class _LoggedStream:
    def __init__(self, name: str, log: list[str]):
        self.name, self.log, self.device = name, log, torch.device("cpu")

    def wait_stream(self, other: _LoggedStream) -> None:
        self.log.append(f"{self.name} waits for {other.name}")


def test_side_stream_waits_only_for_work_queued_on_it(monkeypatch):
    # a capture fails on a wait for a stream that took no part in it: a step with no fused layer (all
    # LoRA targets unfused, as over an 8-bit base) must join without touching the side stream
    log: list[str] = []
    main = _LoggedStream("main", log)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: nullcontext())
    side = SideStream.__new__(SideStream)
    side.stream, side.held, side.forked = _LoggedStream("side", log), [torch.zeros(1)], False

    side.join()
    assert log == [] and side.held == []

    with side.side():
        pass
    side.wait()
    side.wait()  # nothing queued since the last wait
    assert log == ["side waits for main", "main waits for side"]

    with side.side(after_current=False):
        pass
    side.join()
    assert log[2:] == ["main waits for side"]
