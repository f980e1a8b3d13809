from __future__ import annotations

import pytest

from remote.trainer.models import ModelError, check_family, detect_family_from_keys
from remote.trainer.tokenizers import clip_tokenizer
from tests.tiny_models import save_tiny_sd15_folder


def test_tokenizer_matches_openai_clip_ids():
    tok = clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert padded[-1] == 49407
    tok2 = clip_tokenizer(pad_token="!")
    assert tok2("a cat", padding="max_length", max_length=77).input_ids[-1] == 0


def test_family_from_single_file_keys():
    sd1 = ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.embeddings.x"]
    sd2 = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
    ]
    sdxl = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "conditioner.embedders.0.transformer.text_model.x",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
    ]
    assert detect_family_from_keys(sd1) == "sd15"
    assert detect_family_from_keys(sd2) == "sd2"
    assert detect_family_from_keys(sdxl) == "sdxl"
    with pytest.raises(ModelError, match="not a Stable Diffusion checkpoint"):
        detect_family_from_keys(["unet.down_blocks.0.weight"])


def test_single_file_family_read_from_safetensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    from remote.trainer.models import checkpoint_keys

    path = tmp_path / "m.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, str(path))
    assert detect_family_from_keys(checkpoint_keys(path)) == "sdxl"
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"cond_stage_model.model.ln_final.weight": torch.zeros(2)}}, ckpt)
    assert detect_family_from_keys(checkpoint_keys(ckpt)) == "sd2"


class _Cfg:
    def __init__(self, **kw):
        self.sdxl = kw.get("sdxl")
        self.v2 = kw.get("v2", False)
        self.v_parameterization = kw.get("v_parameterization", False)
        self.pretrained_model_name_or_path = "/models/x.safetensors"


def test_family_mismatch_messages_say_what_was_found():
    with pytest.raises(ModelError, match=r"sdxl = true, but .* is an SD 1\.x model"):
        check_family(_Cfg(sdxl=True), "sd15")
    with pytest.raises(ModelError, match="is an SDXL model"):
        check_family(_Cfg(sdxl=False), "sdxl")
    with pytest.raises(ModelError, match=r"v2 = true, but .* is an SDXL model"):
        check_family(_Cfg(v2=True), "sdxl")
    assert "SD 2.x" in check_family(_Cfg(), "sd2")[0]
    assert check_family(_Cfg(), "sd15") == []


def test_builtin_sdxl_with_sdxl_false_is_an_error(make_config):
    from remote.trainer.models import load_model

    _, cfg = make_config(pretrained_model_name_or_path="builtin:tiny-sdxl", sdxl=False)
    with pytest.raises(ModelError, match="SDXL"):
        load_model(cfg)


def test_diffusers_folder_loads_and_is_detected(tmp_path, make_config):
    from remote.trainer.models import load_model

    folder = save_tiny_sd15_folder(tmp_path / "model")
    _, cfg = make_config(pretrained_model_name_or_path=str(folder))
    bundle = load_model(cfg)
    assert bundle.family == "sd15" and bundle.info["sd_model_name"] == "model"
    assert bundle.tokenizers[0]("a cat").input_ids == [49406, 320, 2368, 49407]


def test_folder_without_model_index_is_a_model_error(tmp_path, make_config):
    from remote.trainer.models import load_model

    folder = tmp_path / "not_a_model"
    folder.mkdir()
    _, cfg = make_config(pretrained_model_name_or_path=str(folder))
    with pytest.raises(ModelError, match=r"model_index\.json"):
        load_model(cfg)


def test_single_file_family_is_checked_before_loading_and_hashes_recorded(tmp_path, make_config, monkeypatch):
    """The plumbing around diffusers' from_single_file (which needs the hub for configs, so is faked here)."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from remote.trainer import models
    from remote.trainer.tiny import build_tiny

    path = tmp_path / "my_sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(4)}, str(path))
    calls = []

    def fake_from_single_file(cls, source, **kwargs):
        calls.append(source)
        parts = build_tiny("sdxl")

        class Pipe:
            unet, vae = parts["unet"], parts["vae"]
            text_encoder, text_encoder_2 = parts["text_encoders"]
            tokenizer, tokenizer_2 = parts["tokenizers"]

        return Pipe

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", classmethod(fake_from_single_file))
    _, wrong = make_config(pretrained_model_name_or_path=str(path), sdxl=False)
    with pytest.raises(ModelError, match="is an SDXL model"):
        models.load_model(wrong)
    assert calls == []  # refused before any weights were loaded
    _, cfg = make_config(pretrained_model_name_or_path=str(path))
    bundle = models.load_model(cfg)
    assert bundle.family == "sdxl" and calls == [str(path)]
    assert bundle.info["sd_model_name"] == "my_sdxl.safetensors"
    assert len(bundle.info["sd_model_hash"]) == 8 and len(bundle.info["new_sd_model_hash"]) == 64


def test_folder_family_from_model_index_and_text_encoder_width(tmp_path):
    import json

    from remote.trainer.models import _folder_family

    def folder(name, class_name, hidden):
        path = tmp_path / name
        (path / "text_encoder").mkdir(parents=True)
        (path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
        (path / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": hidden}))
        return str(path)

    assert _folder_family(folder("a", "StableDiffusionPipeline", 768), "local_dir") == "sd15"
    assert _folder_family(folder("b", "StableDiffusionPipeline", 1024), "local_dir") == "sd2"
    assert _folder_family(folder("c", "StableDiffusionXLPipeline", 768), "local_dir") == "sdxl"
