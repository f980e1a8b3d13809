"""The base model: load it (built-in, diffusers folder, hub id, single file or URL) through its family
(families/), and turn captions into the denoiser's conditioning as kohya does.

The family is read from the weights (single-file key names, or a diffusers folder's model_index.json and
text-encoder config) before they are loaded, and checked against the config's ``sdxl`` / ``v2`` flags.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from remote.fetch_model import download_request, url_file_name

from .families import get_family
from .families.base import ModelError, ModelFamily, Objective
from .families.detect import builtin_family, check_family, checkpoint_keys, detect_family_from_keys, folder_family
from .tokenizers import cache_root

if TYPE_CHECKING:
    from remote.config import TrainConfig

__all__ = ["ModelBundle", "ModelError", "check_family", "checkpoint_keys", "detect_family_from_keys", "load_model"]


@dataclass
class ModelBundle:
    family: str  # the family's name (families/facts.py)
    # diffusers' UNet2DConditionModel and AutoencoderKL, whose decorated `.to` mypy cannot follow
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    v_prediction: bool
    reference: str
    warnings: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # ss_sd_model_name, hashes
    configured: ModelFamily | None = None  # the family with the run's options (ModelFamily.configure)

    @property
    def spec(self) -> ModelFamily:
        """The family's implementation: everything about the model that differs between families."""
        return self.configured or get_family(self.family)

    @property
    def scaling_factor(self) -> float:
        return self.spec.latent_scale

    def objective(self) -> Objective:
        """The training schedule and target (kohya's DDPM, epsilon or v, for the SD families)."""
        return self.spec.objective(self.v_prediction)


# ---------------------------------------------------------------------------------------------------
# Loading


def import_model_code() -> None:
    """The first import of diffusers' and transformers' model code (with torch._dynamo and peft, which diffusers
    brings): most of a fresh machine's start-up, timed apart from reading the weights."""
    from diffusers import AutoencoderKL  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401


def load_model(cfg: TrainConfig, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> ModelBundle:
    """Load the base model; the UNet and text encoders of folder/hub models are read in ``dtype``, and
    straight onto ``device`` when it is a GPU (no CPU copy, the cast runs on the GPU).

    The family is read first (cheaply: key names, model_index.json, the text encoder's config) and
    checked against the config before the weights are loaded.
    """
    from remote.config import model_source_kind

    reference = cfg.pretrained_model_name_or_path
    kind = model_source_kind(reference)
    if kind == "builtin":
        family = builtin_family(reference)
        info: dict[str, object] = {"sd_model_name": reference}
    elif kind in ("local_dir", "hub"):
        family = _folder_family(reference, kind)
        info = {"sd_model_name": Path(reference).name if kind == "local_dir" else reference}
    else:
        path = Path(reference) if kind == "local_file" else _download(reference)
        family = detect_family_from_keys(checkpoint_keys(path))
        info = {"sd_model_name": path.name, **_model_hashes(path)}
    warnings = check_family(cfg, family)

    spec = get_family(family).configure(cfg)
    if kind == "builtin":
        parts = spec.build_tiny()
    elif kind in ("local_dir", "hub"):
        parts = spec.load_diffusers(reference, dtype, device)
    else:
        parts = spec.load_single_file(path, dtype, device)
    info |= spec.model_info(parts)
    if cfg.vae:
        parts["vae"] = _load_vae(cfg.vae)
    bundle = ModelBundle(
        family=family,
        v_prediction=bool(cfg.v_parameterization),
        reference=reference,
        warnings=warnings,
        info=info,
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoders=parts["text_encoders"],
        tokenizers=parts["tokenizers"],
        configured=spec,
    )
    for module in [bundle.unet, bundle.vae, *bundle.text_encoders]:
        module.requires_grad_(False)
        module.eval()
    return bundle


def _folder_file(reference: str, kind: str, name: str) -> dict:
    if kind == "local_dir":
        path = Path(reference) / name
        if not path.is_file():
            raise ModelError(f"{reference} has no {name}: not a diffusers model folder")
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(reference, name)).read_text())
    except Exception as exc:
        raise ModelError(f"cannot fetch {name} of {reference} from the Hugging Face hub: {exc}") from exc


def _folder_family(reference: str, kind: str) -> str:
    return folder_family(lambda name: _folder_file(reference, kind, name))


def _load_vae(reference: str):
    from diffusers import AutoencoderKL

    path = Path(reference)
    if reference.startswith("https://"):
        path = _download(reference)
    if path.is_file():
        return AutoencoderKL.from_single_file(str(path))
    if path.is_dir() and (path / "vae").is_dir():
        return AutoencoderKL.from_pretrained(str(path), subfolder="vae")
    return AutoencoderKL.from_pretrained(reference)


def _download(url: str) -> Path:
    name = url_file_name(url)
    target = cache_root() / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(name + ".part")
    request = download_request(url)
    try:
        with urllib.request.urlopen(request) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except OSError as exc:
        raise ModelError(f"cannot download {url}: {exc}") from exc
    tmp.replace(target)
    return target


def _model_hashes(path: Path) -> dict:
    """kohya's ss_sd_model_hash (A1111's old 8-hex hash) and ss_new_sd_model_hash (full sha256)."""
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        old = hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
        handle.seek(0)
        digest = hashlib.sha256()
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return {"sd_model_hash": old, "new_sd_model_hash": digest.hexdigest()}


# ---------------------------------------------------------------------------------------------------
# Text conditioning (the family's; kohya's strategy_sd / strategy_sdxl for the SD families)


def tokenize(bundle: ModelBundle, captions: list[str], max_token_length: int | None) -> list[torch.Tensor]:
    """One [B, chunks, tokens] id tensor per tokenizer."""
    return bundle.spec.tokenize(bundle.tokenizers, captions, max_token_length)


def encode(
    bundle: ModelBundle, ids: list[torch.Tensor], clip_skip: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context [B, T, C], pooled [B, P] or None), as kohya computes them."""
    return bundle.spec.encode(bundle.text_encoders, ids, clip_skip)
