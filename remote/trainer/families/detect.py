"""Which family a base model is, read cheaply before its weights are loaded (single-file key names, a
diffusers folder's model_index.json and text-encoder config, a builtin's name), and checked against the
config's ``sdxl`` / ``v2`` flags."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import ModelError
from .facts import family_facts

if TYPE_CHECKING:
    from remote.config import TrainConfig


def detect_family_from_keys(keys: Iterable[str]) -> str:
    """The family of a single-file checkpoint from its state-dict key names: Flux.1 by its transformer's blocks
    (BFL's ``double_blocks.``, optionally under ComfyUI's ``model.diffusion_model.``, or diffusers'
    ``single_transformer_blocks.``), else the SD family of an original-layout (LDM/SGM) checkpoint."""
    has_ldm_unet = False
    has_sd1_te = False
    for key in keys:
        if key.startswith(FLUX_KEY_PREFIXES):
            return "flux"
        if key.startswith("conditioner.embedders.1"):
            return "sdxl"
        if key.startswith("cond_stage_model.model."):
            return "sd2"
        if key.startswith("cond_stage_model.transformer."):
            has_sd1_te = True
        if key.startswith("model.diffusion_model."):
            has_ldm_unet = True
    if has_sd1_te or has_ldm_unet:
        return "sd15"
    raise ModelError(
        "not a Stable Diffusion checkpoint, nor a Flux.1 one: none of the key prefixes of SD 1.x "
        "(cond_stage_model.transformer., model.diffusion_model.), SD 2.x (cond_stage_model.model.), SDXL "
        "(conditioner.embedders.1) or Flux.1 (double_blocks.) were found"
    )


FLUX_KEY_PREFIXES = ("double_blocks.", "model.diffusion_model.double_blocks.", "single_transformer_blocks.")


def checkpoint_keys(path: Path) -> list[str]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return list(handle.keys())
    import torch

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) pickles cannot be mmapped
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelError(f"{path}: not a checkpoint state dict")
    return list(data)


def detect_family_of_folder(folder_or_index: dict) -> str:
    index = folder_or_index
    class_name = str(index.get("_class_name", ""))
    if class_name.startswith("Flux"):
        return "flux"
    if "XL" in class_name or "text_encoder_2" in index:
        return "sdxl"
    return ""  # decided from the text encoder's width


def folder_family(read_json: Callable[[str], dict[str, Any]]) -> str:
    """A diffusers folder's family, ``read_json(name)`` reading its files: Flux.1 (FluxPipeline) and SDXL from
    model_index.json; otherwise SD 2.x when the text encoder is 1024 wide (OpenCLIP-H)."""
    family = detect_family_of_folder(read_json("model_index.json"))
    if family:
        return family
    text_config = read_json("text_encoder/config.json")
    return "sd2" if text_config.get("hidden_size") == 1024 else "sd15"


def builtin_family(reference: str) -> str:
    """``builtin:tiny-sd15`` / ``builtin:tiny-sdxl`` / ``builtin:tiny-flux``."""
    return reference.removeprefix("builtin:tiny-")


def check_family(cfg: TrainConfig, family: str) -> list[str]:
    """Compare the detected family with the config's sdxl / v2 flags. Returns warnings, raises on conflict."""
    found = family_facts(family).label
    if cfg.sdxl is True and family != "sdxl":
        raise ModelError(f"sdxl = true, but {cfg.pretrained_model_name_or_path} is an {found} model")
    if cfg.sdxl is False and family == "sdxl":
        raise ModelError(f"sdxl = false, but {cfg.pretrained_model_name_or_path} is an SDXL model; remove sdxl")
    if cfg.v2 and family != "sd2":
        raise ModelError(f"v2 = true, but {cfg.pretrained_model_name_or_path} is an {found} model; remove v2")
    warnings = []
    if family == "sd2" and not cfg.v2:
        warnings.append(
            f"{cfg.pretrained_model_name_or_path} is an SD 2.x model; training it as SD 2.x (set v2 = true)"
        )
    if family == "sd15" and cfg.v_parameterization:
        warnings.append("v_parameterization with an SD 1.x model: only right for v-prediction fine-tunes")
    return warnings
