"""kohya-compatible LoRA: module selection, injection, naming and the .safetensors writer.

The modules are kohya's own design (networks/lora.py LoRAModule): a ``lora_down`` and a ``lora_up``
layer per target, added to the target's output times ``multiplier * alpha / dim``. They hook the
target's ``forward`` instead of replacing the module, so the base model's module paths and state dict
stay as they were, and the network's own state dict IS the kohya file layout:
``{kohya_name}.lora_down.weight``, ``{kohya_name}.lora_up.weight``, ``{kohya_name}.alpha``.

Selection (TRAINER.md §1.1): in the denoiser, every Linear and 1x1 Conv2d inside the family's LoRA parent
modules (the SD families: ``Transformer2DModel``; plus, with conv_dim, every Conv2d inside the conv parents:
3x3 convs get conv_dim, the block's Linear and 1x1 convs network_dim); in each text encoder, every Linear
inside the family's text parents (CLIPAttention / CLIPMLP).

Naming (§1.2, §1.7): the family maps each module path to kohya's (families/sd.py keeps diffusers block
names; families/sdxl.py uses kohya's SGM names).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from remote.hashing import file_sha256

from .families import get_family
from .families.base import OMIT, LoRATarget, ModelFamily
from .families.clip import CLIP_LORA_PARENTS
from .lora_fused import FlatBuffers, SideStream, flatten_parameters, fused_forward, is_fusable

if TYPE_CHECKING:
    from remote.config import TrainConfig


class LoRAModule(nn.Module):
    """kohya's LoRAModule: out = org(x) + up(down(x)) * multiplier * alpha / dim."""

    def __init__(self, name: str, org_module: nn.Module, dim: int, alpha: float, multiplier: float = 1.0):
        super().__init__()
        self.lora_name = name
        self.lora_dim = dim
        self.lora_down: nn.Conv2d | nn.Linear
        self.lora_up: nn.Conv2d | nn.Linear
        if isinstance(org_module, nn.Conv2d):
            kernel, stride, padding = org_module.kernel_size, org_module.stride, org_module.padding
            self.lora_down = nn.Conv2d(
                org_module.in_channels,
                dim,
                (kernel[0], kernel[1]),
                (stride[0], stride[1]),
                padding if isinstance(padding, str) else (padding[0], padding[1]),
                bias=False,
            )
            self.lora_up = nn.Conv2d(dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
        elif isinstance(org_module, nn.Linear):
            self.lora_down = nn.Linear(org_module.in_features, dim, bias=False)
            self.lora_up = nn.Linear(dim, org_module.out_features, bias=False)
        else:
            raise TypeError(f"{name}: LoRA adapts Linear and Conv2d layers, not {type(org_module).__name__}")
        if alpha is None or alpha == 0:
            alpha = dim
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = float(alpha) / dim
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self._org = [org_module]  # a list, so it is not registered as a submodule
        self.org_forward: Callable[..., Any] | None = None
        # set by LoRANetwork.use_flat_buffers for fusable targets: (weight, gradient) views of down and up
        self.fused_views: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.fused_side: SideStream | None = None

    def apply_to(self) -> None:
        org = self._org[0]
        self.org_forward = org.forward
        org.forward = self.forward  # type: ignore[method-assign,assignment]  # kohya's way: wrap this layer's call

    def restore(self) -> None:
        if self.org_forward is not None:
            self._org[0].forward = self.org_forward  # type: ignore[method-assign]
            self.org_forward = None

    def forward(self, x, *args, **kwargs):
        if self.fused_views is not None and torch.is_grad_enabled() and not args and not kwargs:
            # a Python number: a CUDA graph captures it. Training always runs at multiplier 1 (sampling,
            # which changes it, runs without gradients and so not through here).
            scale = self.multiplier * self.scale
            return fused_forward(
                self._org[0], x, self.lora_down.weight, self.lora_up.weight, self.fused_views, scale, self.fused_side
            )
        out = self.org_forward(x, *args, **kwargs)
        if self.multiplier == 0:
            return out
        # in the input's dtype, as autocast would: fp32 weights are cast to a bf16/fp16 input's dtype
        down, up = self.lora_down.weight.to(x.dtype), self.lora_up.weight.to(x.dtype)
        if isinstance(self.lora_down, nn.Conv2d):
            lora = F.conv2d(F.conv2d(x, down, None, self.lora_down.stride, self.lora_down.padding), up)
        else:
            lora = F.linear(F.linear(x, down), up)
        return torch.add(out, lora.to(out.dtype), alpha=self.multiplier * self.scale)  # one kernel, not two


class SharedDownLoRA(LoRAModule):
    """The LoRA of one fused Linear of kohya's model that diffusers splits into several Linears fed the same
    input (Flux's qkv, and q/k/v/MLP-in of a single block): one down projection shared by the members, the up
    projection their ups stacked (rows of member i: ``rows[i]``). Its tensors are kohya's for the fused layer,
    and member i's output gains ``up[rows[i]] @ down @ x``, the fused layer's rows of that member."""

    def __init__(self, name: str, members: Sequence[nn.Module], dim: int, alpha: float, multiplier: float = 1.0):
        linears = [m for m in members if isinstance(m, nn.Linear)]
        if len(linears) != len(members) or len({m.in_features for m in linears}) != 1:
            raise TypeError(f"{name}: a shared-down LoRA covers Linear layers of one input width")
        fused = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), device="meta")
        super().__init__(name, fused, dim, alpha, multiplier)
        self._org[:] = linears
        bounds = [0]
        for m in linears:
            bounds.append(bounds[-1] + m.out_features)
        self.rows = list(itertools.pairwise(bounds))
        self.org_forwards: list[Callable[..., Any]] = []

    def apply_to(self) -> None:
        self.org_forwards = [member.forward for member in self._org]
        for index, member in enumerate(self._org):
            member.forward = functools.partial(self.member_forward, index)  # type: ignore[method-assign]

    def restore(self) -> None:
        for member, original in zip(self._org, self.org_forwards, strict=True):
            member.forward = original  # type: ignore[method-assign]
        self.org_forwards = []

    def forward(self, x, *args, **kwargs):
        raise RuntimeError(f"{self.lora_name}: a shared-down LoRA runs through its members' forward")

    def member_forward(self, index: int, x, *args, **kwargs):
        start, stop = self.rows[index]
        scale = self.multiplier * self.scale
        if self.fused_views is not None and torch.is_grad_enabled() and not args and not kwargs:
            (down, grad_down), (up, grad_up) = self.fused_views
            views = ((down, grad_down), (up[start:stop], grad_up[start:stop]))
            return fused_forward(
                self._org[index], x, self.lora_down.weight, self.lora_up.weight, views, scale, self.fused_side
            )
        out = self.org_forwards[index](x, *args, **kwargs)
        if self.multiplier == 0:
            return out
        down, up = self.lora_down.weight.to(x.dtype), self.lora_up.weight[start:stop].to(x.dtype)
        return torch.add(out, F.linear(F.linear(x, down), up).to(out.dtype), alpha=scale)


# ---------------------------------------------------------------------------------------------------
# Selection and naming (which modules, and their kohya names, are the family's: families/)


def select_unet_targets(unet: nn.Module, family: str | ModelFamily, conv_dim: int | None) -> list[LoRATarget]:
    """kohya's LoRA modules of the denoiser of ``family`` (a name, or a configured family), in kohya's order."""
    return as_family(family).lora_targets(unet, conv_dim)


def as_family(family: str | ModelFamily) -> ModelFamily:
    return get_family(family) if isinstance(family, str) else family


def select_te_targets(text_encoders: list[nn.Module], parents: tuple[str, ...] = CLIP_LORA_PARENTS) -> list[LoRATarget]:
    """kohya's LoRA modules of the text encoders: every Linear inside a ``parents`` module."""
    found: list[LoRATarget] = []
    for index, encoder in enumerate(text_encoders):
        prefix = "lora_te" if len(text_encoders) == 1 else f"lora_te{index + 1}"
        root = getattr(encoder, "text_model", encoder)  # transformers 5's CLIPTextModel has no text_model
        for parent_name, parent in root.named_modules():
            if parent.__class__.__name__ not in parents:
                continue
            for child_name, child in parent.named_modules():
                if isinstance(child, nn.Linear):
                    path = f"text_model.{parent_name}.{child_name}"
                    found.append(LoRATarget(f"{prefix}_{path.replace('.', '_')}", (child,), False))
    return found


# ---------------------------------------------------------------------------------------------------
# The network


class LoRANetwork(nn.Module):
    """All LoRA modules of one run. Its state_dict() keys are exactly the kohya file's keys."""

    def __init__(
        self,
        unet: nn.Module | None,
        text_encoders: list[nn.Module],
        family: str | ModelFamily,
        dim: int,
        alpha: float,
        conv_dim: int | None = None,
        conv_alpha: float | None = None,
    ):
        super().__init__()
        spec = as_family(family)
        self.family = spec.name
        self.dim = dim
        self.alpha = alpha
        self.conv_dim = conv_dim
        self.conv_alpha = conv_alpha
        self.unet_names: list[str] = []
        self.te_names: list[str] = []
        self.flat: FlatBuffers | None = None
        targets_unet = spec.lora_targets(unet, conv_dim) if unet is not None else []
        targets_te = select_te_targets(text_encoders, spec.text_lora_parents) if text_encoders else []
        for names, targets in ((self.te_names, targets_te), (self.unet_names, targets_unet)):
            for name, modules, is_conv3 in targets:
                lora: LoRAModule
                if len(modules) > 1:
                    lora = SharedDownLoRA(name, modules, dim, alpha)
                elif is_conv3 and conv_dim is not None:  # 3x3 targets are selected only with a conv_dim
                    lora = LoRAModule(name, modules[0], conv_dim, conv_alpha if conv_alpha is not None else 1.0)
                else:
                    lora = LoRAModule(name, modules[0], dim, alpha)
                self.add_module(name, lora)
                names.append(name)

    def loras(self) -> Iterable[LoRAModule]:
        for name in self.te_names + self.unet_names:
            yield getattr(self, name)

    def apply_to(self) -> None:
        for lora in self.loras():
            lora.apply_to()

    def restore(self) -> None:
        for lora in self.loras():
            lora.restore()

    @property
    def flat_buffers(self) -> FlatBuffers:
        """The flat buffers that ``use_flat_buffers`` made (the trainer makes them at set-up)."""
        if self.flat is None:
            raise RuntimeError("use_flat_buffers() has not been called")
        return self.flat

    def use_flat_buffers(self, compute_dtype: torch.dtype, side_stream: bool = False, fuse: bool = True) -> FlatBuffers:
        """Training's layout (lora_fused.py): the parameters become views of one flat buffer, and (with
        ``fuse``) each Linear / 1x1-conv target runs fused with its LoRA in ``compute_dtype`` (on CUDA with
        ``side_stream``, its off-chain products on a second stream). Call it after the last ``.to()``:
        moving the network afterwards would detach the parameters from the buffer."""
        self.flat, views = flatten_parameters(list(self.parameters()), compute_dtype, side_stream)
        for lora in self.loras():
            if fuse and all(is_fusable(layer) for layer in lora._org):
                lora.fused_views = (views[id(lora.lora_down.weight)], views[id(lora.lora_up.weight)])
                lora.fused_side = self.flat.side_stream
        return self.flat

    def set_multiplier(self, multiplier: float) -> None:
        for lora in self.loras():
            lora.multiplier = multiplier

    def param_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict]:
        """kohya's prepare_optimizer_params: one group per part; a part with lr 0 is left out."""
        groups = []
        te = [p for name in self.te_names for p in getattr(self, name).parameters()]
        un = [p for name in self.unet_names for p in getattr(self, name).parameters()]
        if te and text_encoder_lr:
            groups.append({"params": te, "lr": text_encoder_lr, "name": "text_encoder"})
        if un and unet_lr:
            groups.append({"params": un, "lr": unet_lr, "name": "unet"})
        return groups

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in self.state_dict().items():
            value = value.detach().to("cpu", copy=True)  # a copy: flat-buffer views share one storage
            if dtype is not None:
                value = value.to(dtype)
            out[key] = value
        return out


# ---------------------------------------------------------------------------------------------------
# Writing the file


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's precalculate_safetensors_hashes: (sshs_model_hash, sshs_legacy_hash).

    The model hash is the sha256 of the tensor data (everything after the JSON header), which does not
    depend on the metadata, so it equals what A1111 computes from the final file.
    """
    from safetensors.torch import save

    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy


SAVE_DTYPES = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_kohya(network: LoRANetwork, path: Path, metadata: dict[str, str], save_precision: str | None) -> str:
    """Write the kohya .safetensors (atomically) and return its sha256."""
    from safetensors.torch import save_file

    tensors = network.kohya_state_dict(SAVE_DTYPES[save_precision])
    metadata = {k: str(v) for k, v in metadata.items()}
    model_hash, legacy_hash = safetensors_hashes(tensors, metadata)
    metadata["sshs_model_hash"] = model_hash
    metadata["sshs_legacy_hash"] = legacy_hash
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return file_sha256(path)


def load_kohya_into(network: LoRANetwork, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = network.state_dict()
    missing = set(own) - set(state)
    if missing:
        raise ValueError(f"{path}: {len(missing)} LoRA tensors missing, e.g. {sorted(missing)[0]}")
    network.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items() if k in own})


def build_metadata(cfg: TrainConfig, family: str | ModelFamily, info: dict) -> dict[str, str]:
    """kohya's ss_* metadata (train_network.py) for what this run did, plus SAI modelspec keys."""
    v_pred = bool(cfg.v_parameterization)
    name = cfg.output_name or "last"
    resolution = f"({cfg.resolution[0]}, {cfg.resolution[1]})"
    meta: dict[str, object] = {
        "ss_session_id": info.get("session_id", 0),
        "ss_training_started_at": info.get("started_at", 0),
        "ss_training_finished_at": info.get("finished_at", ""),
        "ss_output_name": name,
        "ss_learning_rate": cfg.learning_rate,
        "ss_text_encoder_lr": cfg.effective_text_encoder_lr,
        "ss_unet_lr": cfg.effective_unet_lr,
        "ss_num_train_images": info.get("num_train_images", 0),
        "ss_num_reg_images": info.get("num_reg_images", 0),
        "ss_num_batches_per_epoch": info.get("batches_per_epoch", 0),
        "ss_num_epochs": info.get("epochs", 0),
        "ss_epoch": info.get("epoch", 0),
        "ss_steps": info.get("step", 0),
        "ss_max_train_steps": info.get("total_steps", 0),
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_lr_warmup_steps": info.get("warmup_steps", 0),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_network_module": "networks.lora",
        "ss_network_dim": cfg.network_dim,
        "ss_network_alpha": cfg.scale_alpha,
        "ss_network_dropout": None,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": cfg.full_fp16,
        "ss_clip_skip": cfg.clip_skip,
        "ss_max_token_length": cfg.max_token_length,
        "ss_cache_latents": True,
        "ss_seed": info.get("seed"),
        "ss_lowram": False,
        "ss_noise_offset": cfg.noise_offset,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_optimizer": info.get("optimizer", ""),
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": cfg.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": cfg.caption_tag_dropout_rate,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_batch_size_per_device": cfg.batch_size,
        "ss_total_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps,
        "ss_resolution": resolution,
        "ss_color_aug": False,
        "ss_flip_aug": cfg.flip_aug,
        "ss_random_crop": False,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_enable_bucket": cfg.enable_bucket,
        "ss_bucket_no_upscale": cfg.bucket_no_upscale,
        "ss_min_bucket_reso": cfg.min_bucket_reso,
        "ss_max_bucket_reso": cfg.max_bucket_reso,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_dataset_dirs": json.dumps(info.get("dataset_dirs", {})),
        "ss_reg_dataset_dirs": json.dumps(info.get("reg_dataset_dirs", {})),
        "ss_tag_frequency": json.dumps(info.get("tag_frequency", {})),
        "ss_bucket_info": json.dumps(info.get("bucket_info", {})),
        "ss_sd_model_name": info.get("sd_model_name", ""),
        "ss_training_comment": "trained with rentrain",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.title": name,
        "modelspec.resolution": f"{cfg.resolution[0]}x{cfg.resolution[1]}",
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        # last: a family may replace keys above (Flux: ss_network_module, no prediction type)
        **as_family(family).configure(cfg).base_model_metadata(v_pred, info),
    }
    meta = {key: value for key, value in meta.items() if value is not OMIT}
    if cfg.network_args:
        meta["ss_network_args"] = json.dumps(
            {k.strip(): v.strip() for k, _, v in (a.partition("=") for a in cfg.network_args)}
        )
    if cfg.clip_skip is not None:
        meta["modelspec.encoder_layer"] = cfg.clip_skip
    for key in ("sd_model_hash", "new_sd_model_hash"):
        if info.get(key):
            meta[f"ss_{key}"] = info[key]
    return {k: str(v) for k, v in meta.items()}


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata() or {})
