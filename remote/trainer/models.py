"""The base model: load it (built-in, diffusers folder, hub id, single file or URL), detect its family,
and turn captions into the UNet's conditioning exactly as kohya does.

Families: ``sd15`` (SD 1.x), ``sd2`` (SD 2.x, OpenCLIP-H text encoder), ``sdxl``. The family is read from
the weights (single-file key names, or a diffusers folder's model_index.json and text-encoder config);
the config's ``sdxl`` / ``v2`` flags are checked against it.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from remote.fetch_model import download_request, url_file_name

from .tokenizers import cache_root

FAMILY_NAMES = {"sd15": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


class ModelError(Exception):
    """The base model cannot be used as configured. The message says what was found."""


@dataclass
class ModelBundle:
    family: str
    # diffusers' UNet2DConditionModel and AutoencoderKL, whose decorated `.to` mypy cannot follow
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    v_prediction: bool
    reference: str
    warnings: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # ss_sd_model_name, hashes

    @property
    def scaling_factor(self) -> float:
        """kohya's latent scale, fixed by family: a separate VAE file's own config may carry SD1's value."""
        return 0.13025 if self.family == "sdxl" else 0.18215

    def noise_scheduler(self):
        """kohya's training schedule: SD's DDPM betas (scaled_linear 0.00085..0.012, 1000 steps)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            clip_sample=False,
            prediction_type="v_prediction" if self.v_prediction else "epsilon",
        )


# ---------------------------------------------------------------------------------------------------
# Family detection


def detect_family_from_keys(keys) -> str:
    """SD family of an original-layout (LDM/SGM) checkpoint from its state-dict key names."""
    has_ldm_unet = False
    has_sd1_te = False
    for key in keys:
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
        "not a Stable Diffusion checkpoint: none of the key prefixes of SD 1.x (cond_stage_model.transformer., "
        "model.diffusion_model.), SD 2.x (cond_stage_model.model.) or SDXL (conditioner.embedders.1) were found"
    )


def checkpoint_keys(path: Path) -> list[str]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return list(handle.keys())
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
    if "XL" in class_name or "text_encoder_2" in index:
        return "sdxl"
    return ""  # decided from the text encoder's width


def check_family(cfg, family: str) -> list[str]:
    """Compare the detected family with the config's sdxl / v2 flags. Returns warnings, raises on conflict."""
    found = FAMILY_NAMES[family]
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


# ---------------------------------------------------------------------------------------------------
# Loading


def load_model(cfg, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> ModelBundle:
    """Load the base model; the UNet and text encoders of folder/hub models are read in ``dtype``, and
    straight onto ``device`` when it is a GPU (no CPU copy, the cast runs on the GPU).

    The family is read first (cheaply: key names, model_index.json, the text encoder's config) and
    checked against the config before the weights are loaded.
    """
    from remote.config import model_source_kind

    reference = cfg.pretrained_model_name_or_path
    kind = model_source_kind(reference)
    if kind == "builtin":
        family = "sdxl" if reference.endswith("sdxl") else "sd15"
        info = {"sd_model_name": reference}
    elif kind in ("local_dir", "hub"):
        family = _folder_family(reference, kind)
        info = {"sd_model_name": Path(reference).name if kind == "local_dir" else reference}
    else:
        path = Path(reference) if kind == "local_file" else _download(reference)
        family = detect_family_from_keys(checkpoint_keys(path))
        info = {"sd_model_name": path.name, **_model_hashes(path)}
    warnings = check_family(cfg, family)

    if kind == "builtin":
        from .tiny import build_tiny

        parts = build_tiny(family)
    elif kind in ("local_dir", "hub"):
        parts = _load_diffusers(reference, family, dtype, device)
    else:
        parts = _load_single_file(path, family)
    if cfg.vae:
        parts["vae"] = _load_vae(cfg.vae)
    bundle = ModelBundle(
        family=family,
        v_prediction=bool(cfg.v_parameterization),
        reference=reference,
        warnings=warnings,
        info=info,
        **parts,
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
    """SDXL from model_index.json; otherwise SD 2.x when the text encoder is 1024 wide (OpenCLIP-H)."""
    if detect_family_of_folder(_folder_file(reference, kind, "model_index.json")) == "sdxl":
        return "sdxl"
    text_config = _folder_file(reference, kind, "text_encoder/config.json")
    return "sd2" if text_config.get("hidden_size") == 1024 else "sd15"


def _load_diffusers(
    reference: str, family: str, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    place: dict[str, Any] = {"device_map": str(device)} if device is not None and device.type == "cuda" else {}
    unet = UNet2DConditionModel.from_pretrained(reference, subfolder="unet", torch_dtype=dtype, **place)
    vae = AutoencoderKL.from_pretrained(reference, subfolder="vae", torch_dtype=torch.float32, **place)
    encoders: list[torch.nn.Module] = [
        CLIPTextModel.from_pretrained(reference, subfolder="text_encoder", torch_dtype=dtype, **place)
    ]
    tokenizers = [CLIPTokenizer.from_pretrained(reference, subfolder="tokenizer")]
    if family == "sdxl":
        encoders.append(
            CLIPTextModelWithProjection.from_pretrained(
                reference, subfolder="text_encoder_2", torch_dtype=dtype, **place
            )
        )
        tokenizers.append(CLIPTokenizer.from_pretrained(reference, subfolder="tokenizer_2"))
    return {"unet": unet, "vae": vae, "text_encoders": encoders, "tokenizers": tokenizers}


def _load_single_file(path: Path, family: str) -> dict:
    """diffusers' from_single_file; it reads the architecture config from the hub (reachable on the
    rented machine). The prediction type is not taken from it: the training schedule follows the config."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_single_file(str(path))
    else:
        pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None, requires_safety_checker=False)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoders": encoders, "tokenizers": tokenizers}


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
# Text conditioning (kohya's strategy_sd / strategy_sdxl)


def tokenize(bundle: ModelBundle, captions: list[str], max_token_length: int | None) -> list[torch.Tensor]:
    """One [B, chunks, 77] id tensor per tokenizer; captions longer than 75 tokens use 75-token chunks."""
    length = (max_token_length or 75) + 2
    out = []
    for tokenizer in bundle.tokenizers:
        ids = tokenizer(
            captions, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        ).input_ids
        if length == 77:
            out.append(ids[:, None, :])
            continue
        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        chunks = []
        for start in range(1, length - 2, 75):
            chunk = torch.cat([ids[:, :1], ids[:, start : start + 75], ids[:, -1:]], dim=1)
            if pad != eos:  # kohya: close every chunk with EOS, and mark an empty chunk as <BOS><EOS><PAD>...
                for row in chunk:
                    if row[-2] not in (eos, pad):
                        row[-1] = eos
                    if row[1] == pad:
                        row[1] = eos
            chunk[:, 0] = bos
            chunks.append(chunk)
        out.append(torch.stack(chunks, dim=1))
    return out


def _hidden(encoder, ids: torch.Tensor, layer_from_end: int | None, final_norm: bool):
    output = encoder(ids, output_hidden_states=True)
    if layer_from_end is None:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    else:
        hidden = output.hidden_states[-layer_from_end]
        if final_norm:
            hidden = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
    return hidden, output


def _merge_chunks(states: torch.Tensor, chunks: int) -> torch.Tensor:
    """[B*chunks, 77, C] -> [B, 2 + 75*chunks, C]: first BOS, each chunk's 75 inner tokens, last EOS."""
    if chunks == 1:
        return states
    batch = states.shape[0] // chunks
    states = states.view(batch, chunks, states.shape[1], states.shape[2])
    parts = [states[:, 0, :1]] + [states[:, i, 1:-1] for i in range(chunks)] + [states[:, -1, -1:]]
    return torch.cat(parts, dim=1)


def encode(
    bundle: ModelBundle, ids: list[torch.Tensor], clip_skip: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context [B, T, C], pooled [B, P] for SDXL else None), as kohya computes them.

    SD 1.x/2.x: last_hidden_state, or with clip_skip = k the k-th hidden state from the end passed
    through the final layer norm. SDXL: the penultimate hidden state of both encoders without the norm,
    concatenated; pooled = text encoder 2's projected EOS state. clip_skip is ignored for SDXL.
    """
    device = next(bundle.text_encoders[0].parameters()).device
    batch, chunks = ids[0].shape[:2]
    if bundle.family != "sdxl":
        flat = ids[0].reshape(batch * chunks, -1).to(device)
        skip = clip_skip if clip_skip and clip_skip > 1 else None
        hidden, _ = _hidden(bundle.text_encoders[0], flat, skip, final_norm=True)
        return _merge_chunks(hidden, chunks), None
    flat1 = ids[0].reshape(batch * chunks, -1).to(device)
    flat2 = ids[1].reshape(batch * chunks, -1).to(device)
    h1, _ = _hidden(bundle.text_encoders[0], flat1, 2, final_norm=False)
    h2, out2 = _hidden(bundle.text_encoders[1], flat2, 2, final_norm=False)
    pooled = out2.text_embeds.view(batch, chunks, -1)[:, 0]
    context = torch.cat([_merge_chunks(h1, chunks), _merge_chunks(h2.to(h1.dtype), chunks)], dim=-1)
    return context, pooled


def sdxl_time_ids(original_hw, crop_top_left, target_hw) -> torch.Tensor:
    """[B, 6] = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample, as diffusers wants."""
    rows = [list(o) + list(c) + list(t) for o, c, t in zip(original_hw, crop_top_left, target_hw, strict=True)]
    return torch.tensor(rows, dtype=torch.float32)
