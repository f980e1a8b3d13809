"""The model-family registry: every family has its facts (no torch) and its implementation, and what the
trainer asks of a family gives what kohya's files and diffusers' pipelines expect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from remote.trainer.families import FAMILIES, family_facts, get_family

REPO = Path(__file__).resolve().parents[2]


def test_the_facts_and_the_memory_planner_import_without_torch():
    code = (
        "import sys\n"
        "from remote.trainer.families import FAMILIES, family_facts\n"
        "from remote.trainer.memory import PROFILES, Setting, budget_from_device, footprint_for, plan_memory\n"
        "print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_family_has_an_implementation_under_its_name():
    assert set(FAMILIES) == {"sd15", "sd2", "sdxl", "flux"}
    for name, facts in FAMILIES.items():
        assert facts.name == name
        assert get_family(name).name == name and get_family(name).facts is facts
    with pytest.raises(KeyError, match="unknown model family 'chroma'; known: sd15, sd2, sdxl, flux"):
        family_facts("chroma")


def test_the_planners_profiles_and_architectures_are_the_families_facts():
    from remote.trainer.memory import ARCHITECTURES, PROFILES, footprint_for

    assert PROFILES["sd15"] is FAMILIES["sd15"].memory and PROFILES["sd2"] is PROFILES["sd15"]
    assert PROFILES["sdxl"].checkpointing_factor == FAMILIES["sdxl"].checkpointing_factor == 1.37
    assert set(ARCHITECTURES) == {"sd15", "sdxl", "flux"}  # SD 2.x is not counted: planned from the loaded model
    sdxl = FAMILIES["sdxl"].architecture
    assert sdxl is not None
    assert footprint_for("sdxl", 1024 * 1024, 8, False).lora_params == 8 * sdxl.lora_unet_per_dim


@pytest.mark.parametrize(
    ("family", "v_pred", "version", "architecture", "v2"),
    [
        ("sd15", False, "sd_v1", "stable-diffusion-v1/lora", "False"),
        ("sd15", True, "sd_v1_v", "stable-diffusion-v1/lora", "False"),
        ("sd2", False, "sd_v2", "stable-diffusion-v2-512/lora", "True"),
        ("sd2", True, "sd_v2_v", "stable-diffusion-v2-768-v/lora", "True"),
        ("sdxl", False, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "False"),
        ("sdxl", True, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "False"),
    ],
)
def test_the_lora_file_names_its_base_model_as_kohya_does(make_config, family, v_pred, version, architecture, v2):
    from remote.trainer.lora import build_metadata

    _, cfg = make_config(v_parameterization=v_pred)
    meta = build_metadata(cfg, family, {})
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["ss_v2"]) == (version, architecture, v2)
    implementation = "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers"
    assert meta["modelspec.implementation"] == implementation
    assert meta["modelspec.prediction_type"] == ("v" if v_pred else "epsilon")


def test_text_encoding_sd_gives_context_only_sdxl_adds_the_pooled_embedding():
    from remote.trainer.tiny import build_tiny

    for name, width, pooled_width in (("sd15", 32, None), ("sdxl", 64, 32)):
        family, parts = get_family(name), build_tiny(name)
        ids = family.tokenize(parts["tokenizers"], ["rtoy, a red circle", "a blue one"], 150)
        assert [i.shape for i in ids] == [torch.Size([2, 2, 77])] * len(parts["tokenizers"])
        with torch.no_grad():
            context, pooled = family.encode(parts["text_encoders"], ids, None)
        assert context.shape == (2, 2 + 2 * 75, width)  # two chunks merged: BOS, 2 x 75 tokens, EOS
        assert (pooled is None) if pooled_width is None else (pooled.shape == (2, pooled_width))


def test_sdxl_time_ids_mirror_the_crop_of_a_flipped_image():
    record = SimpleNamespace(original_size=(120, 90), crop_ltrb=(4, 2, 68, 66), bucket=(64, 64))
    sdxl, sd15 = get_family("sdxl"), get_family("sd15")
    ids = sdxl.step_conditions([record, record], [False, True])["time_ids"]
    # (orig_h, orig_w, crop_top, crop_left, target_h, target_w); flipped: the crop's left is measured from the right
    assert ids.tolist() == [[90, 120, 2, 4, 64, 64], [90, 120, 2, 64 - 68, 64, 64]]
    assert sd15.step_conditions([record], [False]) == {}


@pytest.mark.parametrize("v_prediction", [False, True])
def test_the_training_target_is_the_noise_or_the_velocity(v_prediction):
    objective = get_family("sd15").objective(v_prediction)
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 900])
    alpha = objective.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    torch.testing.assert_close(objective.add_noise(latents, noise, t), noisy)
    velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    torch.testing.assert_close(objective.target(latents, noise, t), velocity if v_prediction else noise)
    snr = alpha.flatten() / (1 - alpha.flatten())
    expected = torch.clamp(snr, max=5.0) / (snr + 1 if v_prediction else snr)
    torch.testing.assert_close(objective.min_snr_weight(t, 5.0), expected)


def test_only_the_families_ask_which_family_a_model_is():
    """`family ==` branches belong in remote/trainer/families/ (docs/trainer.md, "Adding a model family")."""
    remote = REPO / "remote"
    outside = [
        f"{path.relative_to(REPO)}:{number}"
        for path in remote.rglob("*.py")
        if "families" not in path.relative_to(remote).parts
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "family ==" in line or "family !=" in line
    ]
    assert outside == []
