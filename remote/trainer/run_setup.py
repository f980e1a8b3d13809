"""Building a run: device, seed, base model, dataset, LoRA, memory plan, fast path, optimizer; then the caches
(latents, frozen text-encoder outputs) that every step reads."""

from __future__ import annotations

import os
import random
import secrets
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch.optim.lr_scheduler import LambdaLR

from remote.config import TrainConfig
from remote.events import EventWriter

from . import data as data_mod
from . import memory
from .distributed import Ranks, barrier, broadcast_int, broadcast_parameters, min_across
from .divergence import DivergenceWatch, advice_for, weights_are_finite
from .families.base import ModelError, ModelFamily, Objective
from .float8 import FLOAT8, Float8Linear
from .lora import LoRANetwork
from .loss_scale import DeviceLossScaler
from .models import ModelBundle, encode, import_model_code, load_model, tokenize
from .optim import make_optimizer, make_scheduler
from .speed import FastPath
from .state import Position
from .step import apply_gradients, autocast, backward_pass, compute_description

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TEXT_TOKENS_PER_CHUNK = 2048  # captions x tokens the text encoders read at once when filling the cache


class OutputExistsError(Exception):
    """The final file exists already; rentrain never overwrites a finished LoRA."""


@dataclass
class Run:
    cfg: TrainConfig
    bundle: ModelBundle
    family: ModelFamily  # the base model's family: its text encoding, prediction, naming (families/)
    objective: Objective  # the noise schedule and training target
    dataset: data_mod.Dataset
    network: LoRANetwork
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: DeviceLossScaler | None
    device: torch.device
    dtype: torch.dtype
    seed: int
    name: str
    output_dir: Path
    writer: EventWriter
    position: Position
    speed: FastPath
    divergence: DivergenceWatch  # fed every step's loss: stops a run that diverged
    # caption -> (context, pooled, the family's text_conditions) of frozen text encoders
    text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]] = field(
        default_factory=dict
    )
    losses: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    stop_requested: bool = False
    ranks: Ranks = field(default_factory=Ranks)
    choices: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # set-up phases, seconds
    micro_batch: int | None = None  # images per forward/backward when memory planning splits batches
    setup_peak_gib: float | None = None  # peak allocated GPU memory before training (loading, caches)


def output_names(cfg: TrainConfig) -> str:
    return cfg.output_name or "last"


def final_path(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / f"{output_names(cfg)}.safetensors"


def pick_device(ranks: Ranks | None = None) -> torch.device:
    wanted = os.environ.get("RENTRAIN_DEVICE")
    if wanted:
        device = torch.device(wanted)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # streams, events and graphs are made on the current device
        return device
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if ranks is not None and ranks.distributed:
        torch.cuda.set_device(ranks.local_rank)
        return torch.device("cuda", ranks.local_rank)
    return torch.device("cuda")


def choose_attention_kernels(family: ModelFamily) -> None:
    """cuDNN's fused attention (PyTorch 2.11's default on H100/H200) only for the families it runs right for.
    Its backward fails on Flux.1: the first step on an H100 stopped with an illegal memory access in it
    (mha_graph.execute, the case of pytorch/pytorch#190321; NaN gradients in #196678), and PyTorch's own
    mitigation is this switch. For SD 1.5 and SDXL it is the fastest kernel and runs clean (bench/RESULTS.md:
    without it an H100 step takes 12% longer for SD 1.5, 6% for SDXL)."""
    torch.backends.cuda.enable_cudnn_sdp(family.cudnn_attention)


def setup(cfg: TrainConfig, writer: EventWriter, resume: Path | None, ranks: Ranks | None = None) -> Run:
    ranks = ranks or Ranks()
    device = pick_device(ranks)
    dtype = DTYPES[cfg.mixed_precision]
    final = final_path(cfg)
    if final.exists() and resume is None:
        raise OutputExistsError(
            f"{final} already exists: rentrain does not overwrite a finished LoRA. Set another output_name, "
            "move the file away, or resume an unfinished run with --resume"
        )
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    seed, cfg, optimizer_choice = _seed_and_optimizer(cfg, resume, ranks)
    torch.manual_seed(seed)
    random.seed(seed)
    importing = time.perf_counter()
    import_model_code()
    loading = time.perf_counter()
    bundle = load_model(cfg, dtype, device)
    load_seconds = time.perf_counter() - loading
    choose_attention_kernels(bundle.spec)
    dataset = data_mod.build_dataset(cfg, processes=ranks.world)
    # LoRA only where a learning rate is set (kohya: text_encoder_lr = 0 -> no text-encoder LoRA).
    unet_lr, te_lr = cfg.effective_unet_lr, cfg.effective_text_encoder_lr
    if te_lr > 0 and not bundle.spec.text_encoder_lora:
        raise ModelError(
            f"{bundle.spec.facts.label}: the trainer adapts the transformer only (its text encoders' outputs are "
            "cached); set network_train_unet_only = true"
        )
    network = LoRANetwork(
        bundle.unet if unet_lr > 0 else None,
        bundle.text_encoders if te_lr > 0 else [],
        bundle.spec,
        cfg.network_dim,
        cfg.scale_alpha,
        cfg.conv_dim,
        cfg.conv_alpha,
    )
    network.apply_to()
    memory_choice, micro_batch, plain_blocks = None, None, 0
    if device.type == "cuda" and cfg.fit_memory:
        fit = fit_memory(cfg, bundle, dataset, network, device, dtype, resume, ranks)
        cfg, micro_batch, plain_blocks, memory_choice = fit
    speed = FastPath.for_run(device, cfg.cuda_graphs)
    _place_models(cfg, bundle, network, speed, device, dtype, ranks, plain_blocks)

    use_scaler = dtype == torch.float16 and not cfg.full_fp16
    optimizer, optimizer_label = make_optimizer(
        cfg.optimizer_type,
        network.param_groups(unet_lr, te_lr),
        unet_lr or te_lr,
        cfg.optimizer_args,
        device,
        graphable=speed.graphable_optimizer(),
    )
    plan = dataset.plan
    warmup = cfg.warmup_steps_for(plan.total_steps)
    scheduler = make_scheduler(
        optimizer, cfg.lr_scheduler, warmup, plan.total_steps, cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power
    )
    position = Position(
        step=0,
        epoch=0,
        batch=0,
        seed=seed,
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        batches_per_epoch=plan.batches_per_epoch,
        batch_size=cfg.batch_size,
        model=cfg.pretrained_model_name_or_path,
        family=bundle.family,
        processes=ranks.world,
        optimizer_type=cfg.optimizer_type,
    )
    run = Run(
        cfg=cfg,
        bundle=bundle,
        family=bundle.spec,
        objective=bundle.objective(),
        dataset=dataset,
        network=network,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=DeviceLossScaler(device) if use_scaler else None,
        device=device,
        dtype=dtype,
        seed=seed,
        name=output_names(cfg),
        output_dir=Path(cfg.output_dir),
        writer=writer,
        position=position,
        speed=speed,
        ranks=ranks,
        timings={"imports": loading - importing, "load_weights": load_seconds},
        micro_batch=micro_batch,
        divergence=DivergenceWatch(
            lambda: weights_are_finite(network.parameters()), advice_for(cfg.optimizer_type, dtype == torch.float16)
        ),
    )
    speed.start(partial(backward_pass, run), partial(apply_gradients, run), optimizer, optimizer_label, use_scaler)
    if ranks.distributed:
        run.choices.append(
            f"data parallel: {ranks.world} processes, {ranks.world} x batch_size = {ranks.world * cfg.batch_size} "
            "images per step (x gradient_accumulation_steps)"
        )
    run.choices.append(f"compute: {compute_description(run)}")
    if quantized := sum(isinstance(m, Float8Linear) for m in bundle.unet.modules()):
        run.choices.append(f"frozen base: {quantized} Linear layers in float8, weight-only (upcast per layer)")
    run.choices += [c for c in (memory_choice, optimizer_choice) if c] + speed.choices
    run.info = _run_info(run, optimizer_label, warmup)
    return run


def _seed_and_optimizer(cfg: TrainConfig, resume: Path | None, ranks: Ranks) -> tuple[int, TrainConfig, str | None]:
    """The run's seed (the resumed state's), and its config with the optimizer a resumed state needs."""
    seed = broadcast_int(cfg.seed if cfg.seed is not None else secrets.randbelow(2**31), ranks)
    if resume is None:
        return seed, cfg, None
    from .state import read_position

    saved = read_position(resume)
    if saved.optimizer_type.lower() == "adamw8bit" and cfg.optimizer_type.lower() == "adamw":
        cfg = cfg.model_copy(update={"optimizer_type": "AdamW8bit"})
        return saved.seed, cfg, "optimizer: AdamW8bit, as the resumed state was trained (memory planning chose it)"
    return saved.seed, cfg, None


def _place_models(
    cfg: TrainConfig,
    bundle: ModelBundle,
    network: LoRANetwork,
    speed: FastPath,
    device: torch.device,
    dtype: torch.dtype,
    ranks: Ranks,
    plain_blocks: int = 0,
) -> None:
    """The frozen base in the mixed-precision dtype on the device; the LoRA fp32 unless full_fp16/bf16, on
    its flat buffers (the same on every rank); gradient checkpointing where configured or planned, but for the
    denoiser's last ``plain_blocks`` blocks (the memory plan's). Text
    encoders whose outputs are cached stay where they are: they visit the GPU only to fill the cache
    (prepare_caches), so Flux.1's T5-XXL (9 GB) is never resident beside the transformer while it trains."""
    bundle.unet.to(device, dtype)
    speed.prepare_denoiser(bundle.unet, dtype)
    for encoder in bundle.text_encoders:
        if cfg.text_encoders_on_gpu:
            encoder.to(device, dtype)
        else:
            encoder.to(dtype=dtype)
    network.to(device, dtype if (cfg.full_fp16 or cfg.full_bf16) else torch.float32)
    flat = speed.flat_buffers(network, dtype)
    broadcast_parameters(flat.master, ranks)
    if cfg.gradient_checkpointing:
        checkpoint_denoiser(bundle, plain_blocks)
        if cfg.effective_text_encoder_lr > 0:
            for encoder in bundle.text_encoders:
                # non-reentrant, said explicitly: with frozen embeddings as its input, reentrant checkpointing
                # (transformers 4's default) cuts the graph and the text-encoder LoRA gets no gradient
                encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_options(encoder))
                encoder.train()


def checkpoint_denoiser(bundle: ModelBundle, plain_blocks: int = 0) -> None:
    """Gradient checkpointing on the denoiser, but for its last ``plain_blocks`` blocks (the memory plan's)."""
    preserve = checkpoint_options(bundle.unet)["preserve_rng_state"]
    blocks = bundle.spec.checkpoint_blocks(bundle.unet)
    unchecked = frozenset(blocks[len(blocks) - plain_blocks :] if plain_blocks else [])
    bundle.unet.enable_gradient_checkpointing(partial(_checkpoint, preserve_rng_state=preserve, unchecked=unchecked))
    bundle.unet.train()


def checkpoint_options(model: torch.nn.Module) -> dict[str, bool]:
    """torch.utils.checkpoint's options for ``model``: non-reentrant, and the RNG state saved for the recompute
    only when the model draws random numbers (a dropout with p > 0, as a module or in its config). Saving it
    reads the CUDA generator's state, which does not mix with CUDA graph capture (pytorch/pytorch#162504), and
    nothing needs it when the model draws no random numbers."""
    modules = any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
    # transformers' attention applies its dropout as a function, from the config
    config = getattr(model, "config", None)
    functional = any(float(getattr(config, key, 0) or 0) > 0 for key in ("attention_dropout", "dropout"))
    return {"use_reentrant": False, "preserve_rng_state": modules or functional}


def _checkpoint(
    module: torch.nn.Module, *args: Any, preserve_rng_state: bool, unchecked: frozenset[torch.nn.Module] = frozenset()
) -> Any:
    """diffusers' gradient_checkpointing_func: ``module`` recomputed in the backward pass, unless it is one of the
    ``unchecked`` blocks, whose activations the card holds."""
    if module in unchecked:
        return module(*args)
    return torch.utils.checkpoint.checkpoint(
        module.__call__, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state
    )


def _run_info(run: Run, optimizer_label: str, warmup: int) -> dict[str, Any]:
    """What the LoRA file's metadata says about the run (lora.build_metadata)."""
    dataset = run.dataset
    return {
        "session_id": uuid.uuid4().int % (2**31),
        "started_at": time.time(),
        "seed": run.seed,
        "optimizer": optimizer_label,
        "warmup_steps": warmup,
        "total_steps": dataset.plan.total_steps,
        "epochs": dataset.plan.epochs,
        "batches_per_epoch": dataset.plan.batches_per_epoch,
        "num_train_images": sum(r.repeats for r in dataset.records if not r.is_reg),
        "num_reg_images": sum(r.repeats for r in dataset.records if r.is_reg),
        "tag_frequency": data_mod.tag_frequency(dataset.records),
        "dataset_dirs": {
            r.subset: {"n_repeats": r.repeats, "img_count": sum(1 for x in dataset.records if x.subset == r.subset)}
            for r in dataset.records
            if not r.is_reg
        },
        "bucket_info": {"buckets": dataset.plan.bucket_samples},
        "warnings": dataset.warnings,
        **run.bundle.info,
    }


def fit_memory(
    cfg: TrainConfig,
    bundle: ModelBundle,
    dataset: data_mod.Dataset,
    network: LoRANetwork,
    device: torch.device,
    dtype: torch.dtype,
    resume: Path | None,
    ranks: Ranks,
) -> memory.MemoryFit:
    """The fastest setting that fits this GPU (memory.py).
    Every rank plans for the smallest budget among them, so that all make the same choice."""
    text_on_gpu = cfg.text_encoders_on_gpu
    resident = [bundle.unet, *(bundle.text_encoders if text_on_gpu else [])]
    bytes_per_value = torch.finfo(dtype).bits // 8
    eight_bit = sum(b.numel() for m in resident for b in m.buffers() if b.dtype == FLOAT8)  # float8.py's weights
    footprint = memory.Footprint(
        family=bundle.family,
        weights_gib=(sum(p.numel() for m in resident for p in m.parameters()) * bytes_per_value + eight_bit)
        / memory.GIB,
        lora_params=sum(p.numel() for p in network.parameters()),
        pixels=max(r.bucket[0] * r.bucket[1] for r in dataset.records),
        activation_scale=bytes_per_value / 2,
        blocks=len(bundle.spec.checkpoint_blocks(bundle.unet)),
    )
    index = device.index if device.index is not None else torch.cuda.current_device()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 1.0)(index)
    budget = min_across(
        memory.budget_from_device(torch.cuda.get_device_properties(index).total_memory, fraction), ranks
    )
    return memory.fit_config(cfg, footprint, budget, resuming=resume is not None)


def captions_per_chunk(bundle: ModelBundle) -> int:
    """How many captions the text encoders read at once: TEXT_TOKENS_PER_CHUNK tokens' worth (T5-XXL's
    512-token attention is the large one: 4 captions, about 0.5 GB of activations; CLIP's 77: 26)."""
    longest = max(getattr(t, "model_max_length", 77) for t in bundle.tokenizers)
    return max(1, TEXT_TOKENS_PER_CHUNK // min(longest, TEXT_TOKENS_PER_CHUNK))


def prepare_caches(run: Run) -> dict[str, float]:
    """Latents (disk-cached) and, when the text encoders are frozen, their outputs. Returns timings."""
    cfg, bundle = run.cfg, run.bundle
    started = time.perf_counter()
    if not run.ranks.main:  # rank 0 fills the shared disk cache; the others then read it
        barrier(run.ranks)
    encoded, _ = data_mod.cache_latents(
        run.dataset, bundle.vae, run.family.latent_scale, run.device, cfg.flip_aug, shift_factor=run.family.latent_shift
    )
    if run.ranks.main:
        barrier(run.ranks)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    timings = {"cache_latents": time.perf_counter() - started, "latents_encoded": float(encoded)}
    started = time.perf_counter()
    if not cfg.text_encoders_on_gpu:
        captions = sorted({data_mod.base_caption(cfg, r.caption) for r in run.dataset.records})
        for encoder in bundle.text_encoders:
            encoder.to(run.device)
        size = captions_per_chunk(bundle)
        with torch.no_grad(), autocast(run):
            for start in range(0, len(captions), size):
                chunk = captions[start : start + size]
                ids = tokenize(bundle, chunk, cfg.max_token_length)
                context, pooled = encode(bundle, ids, cfg.clip_skip)
                extras = {name: v.to(run.device) for name, v in run.family.text_conditions(ids).items()}
                for i, caption in enumerate(chunk):
                    row = {name: value[i] for name, value in extras.items()}
                    run.text_cache[caption] = (context[i], None if pooled is None else pooled[i], row)
        for encoder in bundle.text_encoders:  # not needed again until samples are drawn
            encoder.to("cpu")
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
        run.setup_peak_gib = torch.cuda.max_memory_allocated(run.device) / 2**30
        torch.cuda.reset_peak_memory_stats(run.device)  # step events report training memory, not the VAE's
    timings["cache_text"] = time.perf_counter() - started
    return timings
