"""The training config: every accepted form loads; every bad input names its key and section."""

from __future__ import annotations

from pathlib import Path

import pytest

from remote.config import ConfigError, load_config, model_source_kind
from tests.foundation.helpers import TUTORIAL_CONFIG, write_config


def _errors(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(issue) for issue in info.value.issues]


def test_tutorial_file_loads_verbatim_with_paths_resolved_against_its_folder(tmp_path: Path) -> None:
    path = write_config(tmp_path / "job", TUTORIAL_CONFIG)
    loaded = load_config(path)
    train = loaded.train
    assert train.train_data_dir == (tmp_path / "job" / "dataset").resolve()
    assert train.output_dir == (tmp_path / "job" / "output").resolve()
    assert train.resolution == (512, 512)
    assert train.batch_size == 2
    assert train.lr_scheduler == "cosine_with_restarts"
    assert train.optimizer_type == "AdamW8bit"
    assert (train.network_dim, train.network_alpha) == (32, 16.0)
    assert train.effective_unet_lr == pytest.approx(1e-4)
    assert train.effective_text_encoder_lr == pytest.approx(5e-5)
    assert train.caption_extension == ".txt"
    assert model_source_kind(train.pretrained_model_name_or_path) == "hub"
    assert loaded.key_sections["batch_size"] == "dataset"


def test_kohya_flat_form_and_spellings(tmp_path: Path) -> None:
    text = """
pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"
train_data_dir = "data"
resolution = "768,512"
train_batch_size = 3
max_train_steps = 500
learning_rate = 0.0001
network_module = "networks.lora"
network_dim = 16
network_alpha = 8
optimizer_type = "adamw8bit"
lr_scheduler = "COSINE"
xformers = true
cache_latents = true
caption_extension = ".caption"
"""
    loaded = load_config(write_config(tmp_path, text))
    assert loaded.train.resolution == (768, 512)
    assert loaded.train.batch_size == 3
    assert loaded.train.optimizer_type == "AdamW8bit"
    assert loaded.train.lr_scheduler == "cosine"
    assert loaded.key_sections["batch_size"] == "top level"
    assert set(loaded.ignored_keys) == {"xformers", "cache_latents"}
    assert "SDPA" in loaded.ignored_keys["xformers"]


def test_kohya_gui_section_names(tmp_path: Path) -> None:
    text = """
[model_arguments]
pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"
v2 = false
[additional_network_arguments]
network_module = "networks.lora"
network_dim = 16
network_alpha = 8
unet_lr = 1.0
text_encoder_lr = 1.0
network_args = ["conv_dim=8", "conv_alpha=4"]
[optimizer_arguments]
optimizer_type = "Prodigy"
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 3
lr_warmup_steps = 0.05
[training_arguments]
max_train_epochs = 10
train_batch_size = 2
mixed_precision = "fp16"
clip_skip = 2
max_token_length = 225
seed = 42
min_snr_gamma = 5.0
[saving_arguments]
save_precision = "fp16"
save_model_as = "safetensors"
output_name = "colab"
output_dir = "out"
[dreambooth_arguments]
resolution = "512,512"
shuffle_caption = true
keep_tokens = 1
[dataset_arguments]
train_data_dir = "data"
cache_latents = true
"""
    train = load_config(write_config(tmp_path, text)).train
    assert train.optimizer_type == "Prodigy"
    assert (train.conv_dim, train.conv_alpha) == (8, 4.0)
    assert train.warmup_steps_for(1000) == 50
    assert train.lr_scheduler_num_cycles == 3
    assert train.clip_skip == 2 and train.max_token_length == 225


@pytest.mark.parametrize(
    ("line", "section", "expected"),
    [
        ("learning_rat = 1e-4", "training", "learning_rat: unknown key in [training]; did you mean learning_rate?"),
        ("netwrok_dim = 8", "training", "netwrok_dim: unknown key in [training]; did you mean network_dim?"),
        ("max_cost = 3", "training", "max_cost: unknown key in [training]; it belongs in [rentrain]"),
        ("learning_rate = -1e-4", "training", "learning_rate in [training]: input should be greater than 0"),
        ("learning_rate = 0", "training", "learning_rate in [training]: input should be greater than 0"),
        ("unet_lr = 0", "training", "unet_lr in [training]: input should be greater than 0"),
        ("resolution = 500", "dataset", "resolution in [dataset]: each side must be a multiple of 64"),
        ('resolution = "512,500"', "dataset", "resolution in [dataset]: each side must be a multiple of 64"),
        ('resolution = "big"', "dataset", 'resolution in [dataset]: must be "512" or "512,768"'),
        ('batch_size = "two"', "dataset", "batch_size in [dataset]: input should be a valid integer"),
        ("batch_size = 0", "dataset", "batch_size in [dataset]: input should be greater than or equal to 1"),
        (
            "min_bucket_reso = 2048",
            "dataset",
            "min_bucket_reso in [dataset]: 2048 is greater than max_bucket_reso 1024",
        ),
        ('lr_scheduler = "cosine_restarts"', "training", "did you mean cosine_with_restarts?"),
        ('optimizer_type = "Adam8bit"', "training", "did you mean AdamW8bit?"),
        (
            'mixed_precision = "fp8"',
            "training",
            "mixed_precision in [training]: input should be 'no', 'fp16' or 'bf16'",
        ),
        ('save_model_as = "ckpt"', "training", "rentrain writes .safetensors only"),
        ('network_module = "lycoris.kohya"', "training", "only networks.lora"),
        ('network_args = ["algo=locon"]', "training", "only conv_dim=N and conv_alpha=X"),
        ('caption_extension = "txt"', "dataset", "must start with a dot"),
        ("max_token_length = 100", "model", "must be 75, 150 or 225"),
        ('lr_warmup_steps = "lots"', "training", "lr_warmup_steps in [training]"),
        ("full_fp16 = true", "training", "full_fp16 in [training]: not supported"),
    ],
)
def test_bad_value_names_key_and_section(tmp_path: Path, line: str, section: str, expected: str) -> None:
    base = {
        "model": 'pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"',
        "dataset": 'train_data_dir = "d"',
        "training": "max_train_epochs = 1" + ("" if line.startswith("learning_rate") else "\nlearning_rate = 1e-4"),
    }
    base[section] += "\n" + line
    text = "\n".join(f"[{name}]\n{body}" for name, body in base.items())
    errors = _errors(write_config(tmp_path, text))
    assert any(expected in e for e in errors), errors


def test_epochs_and_steps_both_missing_and_lr_missing(tmp_path: Path) -> None:
    text = '[model]\npretrained_model_name_or_path = "a/b"\n[dataset]\ntrain_data_dir = "d"\n'
    errors = _errors(write_config(tmp_path, text))
    assert any(
        e.startswith("max_train_epochs in [training]: missing: set max_train_epochs or max_train_steps") for e in errors
    )
    assert any(e.startswith("learning_rate in [training]: missing") for e in errors)


def test_missing_required_keys_are_named(tmp_path: Path) -> None:
    errors = _errors(write_config(tmp_path, "[training]\nmax_train_epochs = 1\nlearning_rate = 1e-4\n"))
    assert any(e.startswith("pretrained_model_name_or_path in [model]: missing") for e in errors), errors
    assert any(e.startswith("train_data_dir in [dataset]: missing") for e in errors), errors


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    text = TUTORIAL_CONFIG.replace("learning_rate = 1e-4", "learning_rat = 1e-4").replace(
        "resolution = 512", "resolution = 500"
    )
    errors = _errors(write_config(tmp_path, text))
    assert len(errors) == 2


def test_same_key_twice_under_two_spellings(tmp_path: Path) -> None:
    text = TUTORIAL_CONFIG + "train_batch_size = 4\n"
    errors = _errors(write_config(tmp_path, text))
    assert errors == ["train_batch_size in [training]: given twice: also as batch_size in [dataset]"]


def test_warmup_with_constant_scheduler_is_contradictory(tmp_path: Path) -> None:
    text = TUTORIAL_CONFIG.replace('"cosine_with_restarts"', '"constant"')
    assert any("lr_warmup_steps in [training]: warm-up needs" in e for e in _errors(write_config(tmp_path, text)))


def test_warmup_percent_and_fraction(tmp_path: Path) -> None:
    text = TUTORIAL_CONFIG.replace("lr_warmup_steps = 100", 'lr_warmup_steps = "10%"')
    assert load_config(write_config(tmp_path, text)).train.warmup_steps_for(300) == 30
    text = TUTORIAL_CONFIG.replace("lr_warmup_steps = 100", "lr_warmup_steps = 0.07")
    assert load_config(write_config(tmp_path, text)).train.warmup_steps_for(100) == 7  # kohya's int(), not ceil


def test_missing_local_model_names_the_alternatives(tmp_path: Path) -> None:
    text = TUTORIAL_CONFIG.replace('"runwayml/stable-diffusion-v1-5"', '"models/mymodel.safetensors"')
    errors = _errors(write_config(tmp_path, text))
    assert len(errors) == 1
    message = errors[0]
    assert message.startswith("pretrained_model_name_or_path in [model]:")
    assert str(tmp_path / "models" / "mymodel.safetensors") in message
    assert "hub id" in message and "https://" in message


def test_model_reference_kinds(tmp_path: Path) -> None:
    (tmp_path / "base.safetensors").write_bytes(b"x")
    (tmp_path / "diffusers_model").mkdir()
    for reference, kind in [
        ("base.safetensors", "local_file"),
        ("diffusers_model", "local_dir"),
        ("https://example.invalid/model.safetensors", "url"),
        ("builtin:tiny-sd15", "builtin"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "hub"),
    ]:
        text = TUTORIAL_CONFIG.replace('"runwayml/stable-diffusion-v1-5"', f'"{reference}"')
        loaded = load_config(write_config(tmp_path, text))
        assert model_source_kind(loaded.train.pretrained_model_name_or_path) == kind, reference
    text = TUTORIAL_CONFIG.replace('"runwayml/stable-diffusion-v1-5"', '"builtin:huge"')
    assert "unknown built-in model" in _errors(write_config(tmp_path, text))[0]


def test_rentrain_section_is_validated(tmp_path: Path) -> None:
    text = TUTORIAL_CONFIG + '\n[rentrain]\nprovider = "vastai"\nmax_cost = -2\nlearning_rate = 1\n'
    errors = _errors(write_config(tmp_path, text))
    assert any("provider in [rentrain]: 'vastai' is not one of" in e and "did you mean vast?" in e for e in errors)
    assert any(e.startswith("max_cost in [rentrain]: input should be greater than 0") for e in errors)
    assert any(
        "learning_rate: unknown key in [rentrain]; it is a training setting: move it to [training]" in e for e in errors
    )
    good = load_config(
        write_config(tmp_path, TUTORIAL_CONFIG + '\n[rentrain]\nprovider = "RunPod"\ngpu = "RTX 4090"\n')
    )
    assert good.job.provider == "runpod" and good.job.gpu == ["RTX 4090"]


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    assert "not valid TOML" in _errors(write_config(tmp_path, "[model\n"))[0]
    assert "no such file" in _errors(tmp_path / "nope.toml")[0]


def test_dataset_config_tables_are_refused_with_advice(tmp_path: Path) -> None:
    text = TUTORIAL_CONFIG + "\n[[datasets]]\nresolution = 512\n"
    assert any("dataset_config tables" in e for e in _errors(write_config(tmp_path, text)))
