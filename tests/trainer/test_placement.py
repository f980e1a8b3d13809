"""Where the frozen text encoders live (on the GPU only while they encode), and which attention kernels run.

On the CPU every device is the same one, so these tests follow the encoders' ``.to`` calls and forwards: a
regression that keeps Flux.1's T5-XXL beside the transformer shows up as a device move at the wrong time.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from remote.events import EventWriter


def _spy_moves(module: torch.nn.Module, moves: list[tuple[str, object]], tag: str) -> None:
    original = module.to

    def to(*args, **kwargs):
        device = kwargs.get("device", args[0] if args and not isinstance(args[0], torch.dtype) else None)
        moves.append((tag, None if device is None else str(device)))
        return original(*args, **kwargs)

    module.to = to  # type: ignore[method-assign]


def _spy_loaded_encoders(monkeypatch) -> list[tuple[str, object]]:
    """The device moves of every text encoder the set-up loads, as (te<index>, device or None)."""
    from remote.trainer import run_setup

    moves: list[tuple[str, object]] = []
    load_model = run_setup.load_model

    def load_and_spy(*args, **kwargs):
        bundle = load_model(*args, **kwargs)
        for index, encoder in enumerate(bundle.text_encoders):
            _spy_moves(encoder, moves, f"te{index}")
        return bundle

    monkeypatch.setattr(run_setup, "load_model", load_and_spy)
    return moves


def _setup(cfg, tmp_path):
    from remote.trainer.run_setup import setup

    return setup(cfg, EventWriter(tmp_path / "events.jsonl", stream=io.StringIO()), None)


def test_cached_text_encoders_reach_the_device_only_to_fill_the_cache(make_config, tmp_path, monkeypatch):
    from remote.trainer import run_setup

    _, cfg = make_config(text_encoder_lr=0)
    assert not cfg.text_encoders_on_gpu
    moves = _spy_loaded_encoders(monkeypatch)
    run = _setup(cfg, tmp_path)
    assert moves == [("te0", None)]  # the dtype only: set-up leaves the encoder where it was loaded
    moves.clear()
    run_setup.prepare_caches(run)
    assert moves == [("te0", str(run.device)), ("te0", "cpu")]
    assert len(run.text_cache) == 2


def test_trained_text_encoders_are_placed_on_the_device_at_set_up(make_config, tmp_path, monkeypatch):
    from remote.trainer import run_setup

    _, cfg = make_config(text_encoder_lr=1e-4)
    assert cfg.text_encoders_on_gpu
    moves = _spy_loaded_encoders(monkeypatch)
    run = _setup(cfg, tmp_path)
    assert moves == [("te0", str(run.device))]
    moves.clear()
    run_setup.prepare_caches(run)
    assert moves == [] and run.text_cache == {}


def test_caption_chunks_hold_a_fixed_number_of_tokens():
    from remote.trainer.run_setup import TEXT_TOKENS_PER_CHUNK, captions_per_chunk

    def bundle(*lengths: int):
        return SimpleNamespace(tokenizers=[SimpleNamespace(model_max_length=n) for n in lengths])

    assert captions_per_chunk(bundle(77, 512)) == TEXT_TOKENS_PER_CHUNK // 512  # Flux.1: CLIP-L and T5-XXL
    assert captions_per_chunk(bundle(77)) == TEXT_TOKENS_PER_CHUNK // 77
    assert captions_per_chunk(bundle(int(1e30))) == 1  # a tokenizer without a length reads one at a time


@pytest.mark.parametrize(("text_encoder_lr", "encodings"), [(0, 2), (1e-4, 4)], ids=["unet-lora", "te-lora"])
def test_sample_prompts_are_encoded_before_denoising(make_config, tmp_path, text_encoder_lr, encodings):
    """Once per prompt, or per prompt and LoRA weight when a text-encoder LoRA makes the weight matter;
    the seeds share them."""
    from remote.trainer.samples import SamplePrompt, render_images

    _, cfg = make_config(pretrained_model_name_or_path="builtin:tiny-sdxl", text_encoder_lr=text_encoder_lr)
    run = _setup(cfg, tmp_path)
    calls: list[str] = []
    for index, encoder in enumerate(run.bundle.text_encoders):
        encoder.register_forward_hook(lambda *_, i=index: calls.append(f"te{i}"))
    run.bundle.unet.register_forward_hook(lambda *_: calls.append("unet"))
    rows = render_images(
        run.bundle,
        run.network,
        [SamplePrompt("rtoy, a red circle"), SamplePrompt("rtoy, a blue circle", "blurry")],
        weights=[0.5, 1.0],
        seeds=[1, 2, 3],
        steps=2,
        guidance=5.0,
        size=(64, 64),
        device=run.device,
        dtype=run.dtype,
    )
    assert [len(row) for row in rows] == [2] * 6  # (prompt, seed) rows of one image per weight
    first_unet = calls.index("unet")
    assert sorted(calls[:first_unet]) == ["te0"] * encodings + ["te1"] * encodings
    assert set(calls[first_unet:]) == {"unet"}


@pytest.mark.parametrize(("model", "cudnn"), [("builtin:tiny-sd15", True), ("builtin:tiny-flux", False)])
def test_set_up_allows_cudnn_attention_only_where_it_runs_right(make_config, tmp_path, model, cudnn):
    keys = {"network_train_unet_only": True} if "flux" in model else {}
    _, cfg = make_config(pretrained_model_name_or_path=model, **keys)
    torch.backends.cuda.enable_cudnn_sdp(not cudnn)
    try:
        _setup(cfg, tmp_path)
        assert torch.backends.cuda.cudnn_sdp_enabled() is cudnn
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
