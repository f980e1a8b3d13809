"""Flux.1's rotary embedding kernels (remote/trainer/rotary.py) against diffusers' apply_rotary_emb. The kernels
run here in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import importlib

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

import remote.trainer.rotary as rotary
from remote.trainer.families import get_family


def _case(dtype=torch.float64, tokens=7, heads=4, dim=128, repeated=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, heads, dim, generator=g, dtype=torch.float64).to(dtype)
    if repeated:  # Flux.1's: each pair shares its angle
        angles = torch.randn(tokens, dim // 2, generator=g, dtype=torch.float64).repeat_interleave(2, dim=1)
        cos, sin = angles.cos(), angles.sin()
    else:  # any cos and sin: checks the backward's transpose in general
        cos, sin = torch.randn(2, tokens, dim, generator=g, dtype=torch.float64).unbind(0)
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, cos, sin, grad


@pytest.mark.parametrize("repeated", [True, False])
def test_forward_and_backward_are_diffusers_function_and_its_gradient(repeated):
    x, cos, sin, grad = _case(repeated=repeated)
    theirs_x = x.clone().requires_grad_(True)
    theirs = apply_rotary_emb(theirs_x, (cos, sin), True, -1, 1)
    theirs.backward(grad)
    ours_x = x.float().requires_grad_(True)
    ours = rotary.RotaryEmbedding.apply(ours_x, cos.float(), sin.float())
    ours.backward(grad.float())
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), theirs.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_x.grad.double(), theirs_x.grad, rtol=1e-6, atol=1e-6)


def test_bf16_is_rounded_once_from_float32():
    x, cos, sin, _ = _case(dtype=torch.bfloat16, heads=24)
    ours = rotary.RotaryEmbedding.apply(x, cos.float(), sin.float())
    exact = apply_rotary_emb(x.double(), (cos, sin), True, -1, 1)
    assert ours.dtype == torch.bfloat16
    assert ((ours.double() - exact).abs() <= torch.finfo(torch.bfloat16).eps * exact.abs() + 1e-30).all()


def test_the_wrapper_keeps_diffusers_function_for_every_other_form():
    calls = []

    def original(*args):
        calls.append(args[2:])
        return apply_rotary_emb(*args)

    wrapped = rotary.fused_apply_rotary_emb(original)
    x, cos, sin, _ = _case(dtype=torch.float32)
    wrapped(x, (cos.float(), sin.float()), sequence_dim=1)
    assert calls == []  # Flux.1's form: the kernel
    heads_first = x.transpose(1, 2)
    wrapped(heads_first, (cos.float(), sin.float()), sequence_dim=2)
    wrapped(x, (cos.float(), sin.float()), True, -2, 1)
    assert calls == [(True, -1, 2), (True, -2, 1)]
    assert wrapped.original is original


def _tiny_flux():
    parts = get_family("flux").build_tiny()
    transformer = parts["unet"].float()
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 8, transformer.config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, transformer.config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.randn(16, 3, generator=g),
        txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([3.5]) if transformer.config.guidance_embeds else None,
        return_dict=False,
    )
    return transformer, inputs


def test_a_flux_transformer_is_routed_and_computes_the_same(monkeypatch):
    module = importlib.import_module(rotary.FLUX_MODULE)
    monkeypatch.setattr(module, "apply_rotary_emb", module.apply_rotary_emb)  # put back after the test
    transformer, inputs = _tiny_flux()
    hidden = inputs["hidden_states"].clone().requires_grad_(True)
    before = transformer(**{**inputs, "hidden_states": hidden})[0]
    before.square().sum().backward()
    assert rotary.use_fused_rotary(transformer, torch.device("cpu"), torch.float32) == (True, None)
    assert module.apply_rotary_emb.original is apply_rotary_emb
    routed = inputs["hidden_states"].clone().requires_grad_(True)
    after = transformer(**{**inputs, "hidden_states": routed})[0]
    after.square().sum().backward()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed.grad, hidden.grad, rtol=1e-4, atol=1e-5)
    # routing again wraps diffusers' function, not the wrapper
    assert rotary.use_fused_rotary(transformer, torch.device("cpu"), torch.float32) == (True, None)
    assert module.apply_rotary_emb.original is apply_rotary_emb


def test_other_models_are_left_alone_and_a_failing_trial_is_said(monkeypatch):
    module = importlib.import_module(rotary.FLUX_MODULE)
    monkeypatch.setattr(module, "apply_rotary_emb", apply_rotary_emb)
    assert rotary.use_fused_rotary(torch.nn.Linear(2, 2), torch.device("cpu"), torch.float32) == (False, None)

    def broken(*args, **kwargs):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(rotary, "_rotate", broken)
    transformer, _ = _tiny_flux()
    routed, note = rotary.use_fused_rotary(transformer, torch.device("cpu"), torch.bfloat16)
    assert not routed and note == "the Triton kernels did not run here (RuntimeError: no C compiler)"
    assert module.apply_rotary_emb is apply_rotary_emb
