"""The training run, top to bottom: set up, cache, loop over epochs and batches, save, sample.

All randomness of a step (noise, timesteps, caption shuffles, flips) comes from generators seeded
with the run's seed and the step's position, and each epoch's batch order from seed + epoch (as
kohya). A resumed run therefore draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import math
import os
import random
import secrets
import signal
import sys
import time
import uuid
import warnings
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from remote.config import TrainConfig
from remote.events import (
    CheckpointEvent,
    DoneEvent,
    EpochEvent,
    EventWriter,
    SampleEvent,
    StartEvent,
    StepEvent,
)

from . import data as data_mod
from . import memory
from .distributed import (
    Ranks,
    any_rank,
    barrier,
    broadcast_int,
    broadcast_parameters,
    init_ranks,
    min_across,
    sum_across,
    sum_gradients,
)
from .graphs import OptimizerGraph, StepGraphs, StepInputs
from .group_norm import use_channels_last_group_norm
from .lora import LoRANetwork, build_metadata, save_kohya
from .models import ModelBundle, encode, load_model, sdxl_time_ids, tokenize
from .optim import is_graphable, make_optimizer, make_scheduler, place_learning_rates
from .samples import sample_grid
from .state import Position, ResumeError, find_latest_state, load_state, save_state, state_dir_name

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class OutputExistsError(Exception):
    """The final file exists already; rentrain never overwrites a finished LoRA."""


class Stopped(Exception):
    """The run was asked to stop (SIGTERM/SIGINT); a resumable state was saved in ``state_dir``."""

    def __init__(self, message: str, state_dir: Path | None = None):
        super().__init__(message)
        self.state_dir = state_dir


@dataclass
class Run:
    cfg: TrainConfig
    bundle: ModelBundle
    dataset: data_mod.Dataset
    network: LoRANetwork
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler | None
    device: torch.device
    dtype: torch.dtype
    seed: int
    name: str
    output_dir: Path
    writer: EventWriter
    position: Position
    noise_scheduler: Any  # diffusers' DDPMScheduler, whose annotations want IntTensor timesteps
    text_cache: dict = field(default_factory=dict)
    losses: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    stop_requested: bool = False
    ranks: Ranks = field(default_factory=Ranks)
    graphs: StepGraphs | None = None
    optimizer_graph: OptimizerGraph | None = None
    choices: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # set-up phases, seconds
    micro_batch: int | None = None  # images per forward/backward when memory planning splits batches


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


def step_generator(device: torch.device, seed: int, *position: int) -> torch.Generator:
    value = seed
    for part in position:
        value = (value * 1_000_003 + part + 1) % (2**62)
    return torch.Generator(device=device).manual_seed(value)


# ---------------------------------------------------------------------------------------------------
# Set-up


def output_names(cfg) -> str:
    return cfg.output_name or "last"


def final_path(cfg) -> Path:
    return Path(cfg.output_dir) / f"{output_names(cfg)}.safetensors"


def setup(cfg, writer: EventWriter, resume: Path | None, ranks: Ranks | None = None) -> Run:
    ranks = ranks or Ranks()
    device = pick_device(ranks)
    dtype = DTYPES[cfg.mixed_precision]
    output_dir = Path(cfg.output_dir)
    final = final_path(cfg)
    if final.exists() and resume is None:
        raise OutputExistsError(
            f"{final} already exists: rentrain does not overwrite a finished LoRA. Set another output_name, "
            "move the file away, or resume an unfinished run with --resume"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    seed = broadcast_int(cfg.seed if cfg.seed is not None else secrets.randbelow(2**31), ranks)
    optimizer_choice = None
    if resume is not None:  # the seed is part of the state, and its optimizer state needs its optimizer
        from .state import read_position

        saved = read_position(resume)
        seed = saved.seed
        if saved.optimizer_type.lower() == "adamw8bit" and cfg.optimizer_type.lower() == "adamw":
            cfg = cfg.model_copy(update={"optimizer_type": "AdamW8bit"})
            optimizer_choice = "optimizer: AdamW8bit, as the resumed state was trained (memory planning chose it)"

    torch.manual_seed(seed)
    random.seed(seed)
    loading = time.perf_counter()
    bundle = load_model(cfg, dtype, device)
    load_seconds = time.perf_counter() - loading
    dataset = data_mod.build_dataset(cfg, processes=ranks.world)

    # LoRA only where a learning rate is set (kohya: text_encoder_lr = 0 -> no text-encoder LoRA).
    unet_lr, te_lr = cfg.effective_unet_lr, cfg.effective_text_encoder_lr
    network = LoRANetwork(
        bundle.unet if unet_lr > 0 else None,
        bundle.text_encoders if te_lr > 0 else [],
        bundle.family,
        cfg.network_dim,
        cfg.scale_alpha,
        cfg.conv_dim,
        cfg.conv_alpha,
    )
    network.apply_to()
    memory_choice, micro_batch = None, None
    if device.type == "cuda" and cfg.fit_memory:
        cfg, micro_batch, memory_choice = fit_memory(cfg, bundle, dataset, network, device, dtype, resume, ranks)

    # The frozen base runs in the mixed-precision dtype; the LoRA stays fp32 unless full_fp16/bf16.
    bundle.unet.to(device, dtype)
    group_norms, group_norm_note = 0, None
    if device.type == "cuda":  # cuDNN's convolutions run NHWC; an NCHW model pays a layout copy per call
        bundle.unet.to(memory_format=torch.channels_last)
        # PyTorch's GroupNorm would copy each channels_last activation to NCHW and back
        group_norms, group_norm_note = use_channels_last_group_norm(bundle.unet, device, dtype)
    for encoder in bundle.text_encoders:
        encoder.to(device, dtype)
    lora_dtype = dtype if (cfg.full_fp16 or cfg.full_bf16) else torch.float32
    network.to(device, lora_dtype)
    flat = network.use_flat_buffers(dtype, side_stream=device.type == "cuda")
    broadcast_parameters(flat.master, ranks)
    if cfg.gradient_checkpointing:
        bundle.unet.enable_gradient_checkpointing()
        bundle.unet.train()
        if te_lr > 0:
            for encoder in bundle.text_encoders:
                # non-reentrant, said explicitly: with frozen embeddings as its input, reentrant checkpointing
                # (transformers 4's default) cuts the graph and the text-encoder LoRA gets no gradient
                encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                encoder.train()

    use_graphs = device.type == "cuda" and cfg.cuda_graphs
    use_scaler = dtype == torch.float16 and not cfg.full_fp16
    groups = network.param_groups(unet_lr, te_lr)
    optimizer, optimizer_label = make_optimizer(
        cfg.optimizer_type,
        groups,
        unet_lr or te_lr,
        cfg.optimizer_args,
        device,
        graphable=use_graphs and not use_scaler,
    )
    total = dataset.plan.total_steps
    warmup = cfg.warmup_steps_for(total)
    scheduler = make_scheduler(
        optimizer, cfg.lr_scheduler, warmup, total, cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power
    )
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler) if use_scaler else None

    position = Position(
        step=0,
        epoch=0,
        batch=0,
        seed=seed,
        total_steps=total,
        steps_per_epoch=dataset.plan.steps_per_epoch,
        batches_per_epoch=dataset.plan.batches_per_epoch,
        batch_size=cfg.batch_size,
        model=cfg.pretrained_model_name_or_path,
        family=bundle.family,
        processes=ranks.world,
        optimizer_type=cfg.optimizer_type,
    )
    run = Run(
        cfg=cfg,
        bundle=bundle,
        dataset=dataset,
        network=network,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        device=device,
        dtype=dtype,
        seed=seed,
        name=output_names(cfg),
        output_dir=output_dir,
        writer=writer,
        position=position,
        noise_scheduler=bundle.noise_scheduler(),
        ranks=ranks,
        timings={"load_weights": load_seconds},
        micro_batch=micro_batch,
    )
    if ranks.distributed:
        run.choices.append(
            f"data parallel: {ranks.world} processes, {ranks.world} x batch_size = {ranks.world * cfg.batch_size} "
            "images per step (x gradient_accumulation_steps)"
        )
    run.choices.append(f"compute: {compute_description(run)}")
    run.choices += [c for c in (memory_choice, optimizer_choice) if c]
    if group_norms:
        run.choices.append(f"GroupNorm: the UNet's {group_norms} layers run channels_last (Triton kernels)")
    elif group_norm_note:
        run.choices.append(f"GroupNorm: PyTorch's, with a layout copy before and after each; {group_norm_note}")
    if use_graphs:
        run.graphs = StepGraphs(partial(backward_pass, run), on_disable=_warn)
        run.choices.append("CUDA graphs: on (one per batch shape, captured the second time a shape is seen)")
        if is_graphable(optimizer):
            run.optimizer_graph = OptimizerGraph(partial(apply_gradients, run), on_disable=_warn)
            run.choices.append("optimizer step: in a CUDA graph (fused, capturable AdamW)")
        else:
            run.choices.append(
                f"optimizer step: eager ({optimizer_label}{' with loss scaling' if use_scaler else ''} is not graphed)"
            )
    elif device.type == "cuda":
        run.choices.append("CUDA graphs: off (cuda_graphs = false)")
    run.info = {
        "session_id": uuid.uuid4().int % (2**31),
        "started_at": time.time(),
        "seed": seed,
        "optimizer": optimizer_label,
        "warmup_steps": warmup,
        "total_steps": total,
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
        **bundle.info,
    }
    return run


def fit_memory(
    cfg, bundle: ModelBundle, dataset, network: LoRANetwork, device, dtype, resume: Path | None, ranks: Ranks
):
    """The fastest setting that fits this GPU (memory.py): (config, micro-batch or None, what was chosen).
    Every rank plans for the smallest budget among them, so that all make the same choice."""
    text_on_gpu = cfg.trains_text_encoder or not data_mod.captions_are_static(cfg)
    resident = [bundle.unet, *(bundle.text_encoders if text_on_gpu else [])]
    bytes_per_value = torch.finfo(dtype).bits // 8
    footprint = memory.Footprint(
        family=bundle.family,
        weights_gib=sum(p.numel() for m in resident for p in m.parameters()) * bytes_per_value / memory.GIB,
        lora_params=sum(p.numel() for p in network.parameters()),
        pixels=max(r.bucket[0] * r.bucket[1] for r in dataset.records),
        activation_scale=bytes_per_value / 2,
    )
    index = device.index if device.index is not None else torch.cuda.current_device()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 1.0)(index)
    budget = min_across(
        memory.budget_from_device(torch.cuda.get_device_properties(index).total_memory, fraction), ranks
    )
    return memory.fit_config(cfg, footprint, budget, resuming=resume is not None)


def prepare_caches(run: Run) -> dict[str, float]:
    """Latents (disk-cached) and, when the text encoders are frozen, their outputs. Returns timings."""
    cfg, bundle = run.cfg, run.bundle
    started = time.perf_counter()
    if not run.ranks.main:  # rank 0 fills the shared disk cache; the others then read it
        barrier(run.ranks)
    encoded, _ = data_mod.cache_latents(run.dataset, bundle.vae, bundle.scaling_factor, run.device, cfg.flip_aug)
    if run.ranks.main:
        barrier(run.ranks)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    timings = {"cache_latents": time.perf_counter() - started, "latents_encoded": float(encoded)}
    started = time.perf_counter()
    if not cfg.trains_text_encoder and data_mod.captions_are_static(cfg):
        captions = sorted({data_mod.base_caption(cfg, r.caption) for r in run.dataset.records})
        with torch.no_grad(), autocast(run):
            for start in range(0, len(captions), 32):
                chunk = captions[start : start + 32]
                context, pooled = encode(bundle, tokenize(bundle, chunk, cfg.max_token_length), cfg.clip_skip)
                for i, caption in enumerate(chunk):
                    run.text_cache[caption] = (context[i], None if pooled is None else pooled[i])
        for encoder in bundle.text_encoders:  # not needed again until samples are drawn
            encoder.to("cpu")
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(run.device)  # step events report training memory, not the VAE's
    timings["cache_text"] = time.perf_counter() - started
    return timings


def uses_autocast(run: Run) -> bool:
    """fp16 runs under autocast (float32 where fp16 could overflow). bf16 has float32's range: the frozen
    model and its activations stay bf16 without autocast's float32 round trips (norms accumulate in
    float32 inside their kernels), and the LoRA casts its weights to bf16 where autocast would have."""
    return run.dtype == torch.float16


def compute_description(run: Run) -> str:
    if uses_autocast(run):
        return "fp16 under autocast, LoRA weights fp32"
    if run.dtype == torch.bfloat16:
        lora = "bf16 (full_bf16)" if run.cfg.full_bf16 else "fp32"
        return f"bf16 throughout (frozen model and activations), LoRA weights {lora}"
    return "float32"


def autocast(run: Run):
    if not uses_autocast(run):
        return nullcontext()
    # no weight-cast cache: it is not valid across CUDA-graph replays, and each weight is used once a step
    return torch.autocast(run.device.type, dtype=run.dtype, cache_enabled=False)


# ---------------------------------------------------------------------------------------------------
# One step


def conditioning(run: Run, records, epoch: int, batch_index: int) -> dict:
    """The batch's text conditioning: cached (context, pooled) tensors, or token ids to encode in the step."""
    cfg = run.cfg
    if run.text_cache:
        pairs = [run.text_cache[data_mod.base_caption(cfg, r.caption)] for r in records]
        context = torch.stack([p[0] for p in pairs]).to(run.dtype)
        pooled = torch.stack([p[1] for p in pairs]).to(run.dtype) if pairs[0][1] is not None else None
        return {"context": context, "pooled": pooled}
    captions = [
        data_mod.process_caption(cfg, r.caption, data_mod.caption_rng(run.seed, epoch, batch_index, slot), epoch + 1)
        for slot, r in enumerate(records)
    ]
    ids = tokenize(run.bundle, captions, cfg.max_token_length)
    return {"token_ids": [to_device(i, run.device) for i in ids]}


def batch_inputs(run: Run, batch: list[int], epoch: int, batch_index: int) -> StepInputs:
    """Everything random or host-side about one batch (kohya's train_network.process_batch, first half)."""
    cfg, device = run.cfg, run.device
    records = [run.dataset.records[i] for i in batch]
    gen = step_generator(device, run.seed, epoch, batch_index)
    flips = [False] * len(records)
    if cfg.flip_aug:
        flip_gen = random.Random(f"flip:{run.seed}:{epoch}:{batch_index}")
        flips = [flip_gen.random() < 0.5 for _ in records]
    chosen = [cached_latent(r, f) for r, f in zip(records, flips, strict=True)]
    latents = to_device(torch.stack(chosen), device)

    noise = torch.randn(latents.shape, generator=gen, device=device)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=gen, device=device
        )
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=gen, device=device)
    weights = to_device(torch.tensor([cfg.prior_loss_weight if r.is_reg else 1.0 for r in records]), device)
    time_ids = None
    if run.bundle.family == "sdxl":
        original = [(r.original_size[1], r.original_size[0]) for r in records]
        crops = []
        for r, f in zip(records, flips, strict=True):
            left, top, right, _ = r.crop_ltrb
            crops.append((int(top), int(r.bucket[0] - right if f else left)))
        target = [(r.bucket[1], r.bucket[0]) for r in records]
        time_ids = to_device(sdxl_time_ids(original, crops, target), device)
    return StepInputs(
        latents=latents,
        noise=noise,
        timesteps=timesteps,
        weights=weights,
        time_ids=time_ids,
        **conditioning(run, records, epoch, batch_index),
    )


def cached_latent(record: data_mod.ImageRecord, flipped: bool) -> torch.Tensor:
    latent = record.latent_flipped if flipped else record.latent
    if latent is None:
        raise RuntimeError(f"{record.path}: no cached latent (prepare_caches encodes every image first)")
    return latent


def inputs_loss(run: Run, inputs: StepInputs) -> torch.Tensor:
    """The loss of one batch from its inputs (process_batch, second half): device work only, no host sync,
    so that it can be captured in a CUDA graph."""
    cfg, bundle = run.cfg, run.bundle
    context, pooled = inputs.context, inputs.pooled
    if inputs.token_ids is not None:
        grad = torch.enable_grad() if cfg.trains_text_encoder else torch.no_grad()
        with grad, autocast(run):
            context, pooled = encode(bundle, inputs.token_ids, cfg.clip_skip)
    assert context is not None, "a step has either the cached text-encoder outputs or the token ids"
    sched = run.noise_scheduler
    latents, noise, timesteps = inputs.latents, inputs.noise, inputs.timesteps
    noisy = sched.add_noise(latents, noise, timesteps)
    kwargs = {}
    if bundle.family == "sdxl":
        assert pooled is not None, "SDXL's second text encoder gives the pooled embedding"
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(run.dtype), "time_ids": inputs.time_ids}
    with autocast(run):
        prediction = bundle.unet(
            noisy.to(run.dtype), timesteps, encoder_hidden_states=context.to(run.dtype), **kwargs
        ).sample

    target = sched.get_velocity(latents, noise, timesteps) if bundle.v_prediction else noise
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    loss = loss * inputs.weights
    if cfg.min_snr_gamma:
        alphas = sched.alphas_cumprod.to(run.device)[timesteps]
        snr = alphas / (1 - alphas)
        clipped = torch.clamp(snr, max=cfg.min_snr_gamma)
        loss = loss * (clipped / (snr + 1) if bundle.v_prediction else clipped / snr)
    return loss.mean()


def backward_pass(run: Run, inputs: StepInputs) -> torch.Tensor:
    """Loss and backward of one micro-batch; gradients add up in place. Returns the loss, detached."""
    flat = run.network.flat_buffers
    flat.begin_micro_batch()
    try:
        loss = inputs_loss(run, inputs)
        scaled = loss / (run.cfg.gradient_accumulation_steps * run.ranks.world)
        (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
    except BaseException:
        if flat.side_stream is not None:  # a graph capture must not end with the side stream forked
            with suppress(Exception):
                flat.side_stream.join()
        raise
    flat.end_micro_batch()
    return loss.detach()


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def optimizer_step(run: Run) -> None:
    sum_gradients(run.network.flat_buffers.master_grad, run.ranks)
    if run.optimizer_graph is not None:
        run.optimizer_graph.step()
    else:
        apply_gradients(run)
    run.scheduler.step()


def apply_gradients(run: Run) -> None:
    """Unscale, clip, step, and zero the gradients (in place: graphs and the flat buffers add into them)."""
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    if run.cfg.max_grad_norm:
        run.network.flat_buffers.clip_grad_norm_(run.cfg.max_grad_norm)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.network.flat_buffers.zero_grad()


# ---------------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(run: Run, epoch: int, step: int, by_epoch: bool, epoch_order) -> None:
    if not run.ranks.main:
        return
    name = run.cfg.output_name or "epoch"  # kohya: epoch-000001.safetensors ... last.safetensors
    stem = f"{name}-{epoch:06d}" if by_epoch else f"{name}-step{step:08d}"
    path = run.output_dir / f"{stem}.safetensors"
    metadata = build_metadata(run.cfg, run.bundle.family, {**run.info, "epoch": epoch, "step": step})
    digest = save_kohya(run.network, path, metadata, run.cfg.save_precision)
    folder = run.output_dir / state_dir_name(name, step=step, epoch=epoch if by_epoch else None)
    save_state(folder, run.position, run.network, run.optimizer, run.scheduler, run.scaler, epoch_order, run.losses)
    run.writer.emit(CheckpointEvent(path=str(path), sha256=digest, epoch=epoch, step=step, state_dir=str(folder)))
    if by_epoch and run.cfg.save_last_n_epochs and run.cfg.save_every_n_epochs:
        old = epoch - run.cfg.save_every_n_epochs * run.cfg.save_last_n_epochs
        if old > 0:
            (run.output_dir / f"{name}-{old:06d}.safetensors").unlink(missing_ok=True)
            import shutil

            shutil.rmtree(run.output_dir / state_dir_name(name, epoch=old), ignore_errors=True)


def save_samples(run: Run, label: str, epoch: int, step: int, final: bool = False) -> None:
    if not run.cfg.sample_prompts or not run.ranks.main:
        return
    path = run.output_dir / "samples" / f"{label}.png"
    written = sample_grid(run, path, f"{label}  epoch {epoch}  step {step}")
    if written is not None:
        run.writer.emit(SampleEvent(path=str(written), epoch=epoch, step=step, final=final))


def _every(n: int | None, value: int) -> bool:
    return n is not None and n != 0 and value % n == 0


@dataclass
class LaunchedStep:
    """An optimizer step whose GPU work is queued: its loss arrives in ``loss`` (pinned host memory on CUDA)
    once ``ready`` has passed. ``seconds``: on the CPU, where the work is done when it is queued, its time."""

    step: int
    epoch: int
    images: int
    batches: int
    loss: torch.Tensor
    lrs: dict[str | None, float]
    began: torch.cuda.Event | None = None
    ready: torch.cuda.Event | None = None
    seconds: float = 0.0


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the GPU: a plain copy from pageable memory waits for
    everything queued on the stream (the step before), a copy from pinned memory is queued behind it."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def host_learning_rates(run: Run) -> dict[str | None, float]:
    """Each group's current learning rate, computed on the host (the groups' own may be device tensors
    that only a wait for the GPU could read)."""
    scheduler = run.scheduler
    schedules = zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    rates = [float(base * schedule(scheduler.last_epoch)) for base, schedule in schedules]
    return {group.get("name"): rate for group, rate in zip(run.optimizer.param_groups, rates, strict=True)}


def train_step(run: Run, group: list[list[int]], epoch: int, first_batch: int) -> LaunchedStep:
    """Queue one optimizer step over ``group``: gradient_accumulation_steps batches per process. Nothing here
    waits for the GPU, so the next step can be prepared while this one runs (``finish_step`` reads it).

    As accelerate does for kohya, each batch's loss is divided by gradient_accumulation_steps (and by the
    number of processes, whose gradients are summed), also in an epoch's last, shorter group. Batch i of
    the group runs on process i % processes, with the random draws of its position in the epoch.
    """
    t0 = time.perf_counter()
    on_gpu = run.device.type == "cuda"
    stream = torch.cuda.current_stream(run.device) if on_gpu else None
    # on the stream, "began" passes when the step before is done or when this step is queued, whichever is
    # later; "began" to "ready" is then the step's own time, overlapped or not
    began = torch.cuda.Event(enable_timing=True) if on_gpu else None
    if began is not None:
        began.record(stream)
    losses = []
    for offset in range(run.ranks.rank, len(group), run.ranks.world):
        inputs = batch_inputs(run, group[offset], epoch, first_batch + offset)
        step = run.graphs.backward if run.graphs is not None else partial(backward_pass, run)
        parts = [step(part) for part in inputs.split(run.micro_batch)]  # memory planning's micro-batches
        losses.append(parts[0] if len(parts) == 1 else torch.stack(parts).sum())
    optimizer_step(run)
    loss = torch.stack(losses).sum().float() if losses else torch.zeros((), device=run.device)
    ready = None
    if on_gpu:
        loss = torch.empty((), dtype=torch.float32, pin_memory=True).copy_(loss, non_blocking=True)
        ready = torch.cuda.Event(enable_timing=True)
        ready.record(stream)
    return LaunchedStep(
        step=run.position.step + 1,
        epoch=epoch,
        images=sum(len(batch) for batch in group),
        batches=len(losses),
        loss=loss,
        lrs=host_learning_rates(run),
        began=began,
        ready=ready,
        seconds=time.perf_counter() - t0,
    )


def finish_step(run: Run, launched: LaunchedStep, losses: list[float]) -> None:
    """Wait for a launched step, record its mean loss (over the group's batches, all processes) in the run's
    and the epoch's ``losses``, and emit its step event."""
    seconds = launched.seconds
    if launched.ready is not None and launched.began is not None:
        launched.ready.synchronize()
        seconds = launched.began.elapsed_time(launched.ready) / 1000
    total, count = sum_across([float(launched.loss), float(launched.batches)], run.ranks)
    loss = total / max(1.0, count)
    run.losses.append(loss)
    losses.append(loss)
    emit_step(run, launched, loss, seconds)


def emit_step(run: Run, launched: LaunchedStep, loss: float, seconds: float) -> None:
    memory = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None
    lrs = launched.lrs
    run.writer.emit(
        StepEvent(
            step=launched.step,
            total_steps=run.position.total_steps,
            epoch=launched.epoch + 1,
            loss=loss,
            lr=lrs.get("unet", lrs.get("text_encoder", 0.0)),
            lr_text_encoder=lrs.get("text_encoder"),
            seconds_per_step=seconds,
            samples_per_second=launched.images / seconds if seconds > 0 else 0.0,
            gpu_memory_gb=memory,
        )
    )


def host_work_due(run: Run, epoch: int, stop: bool, stop_after_step: int | None) -> bool:
    """Whether the step just launched must finish before the next one starts: its event is followed by work
    that reads the weights as they are after it (a checkpoint, samples, an epoch's end, a stop, the final
    file), or it is a multi-process step (their collectives keep the ranks in step)."""
    pos, cfg = run.position, run.cfg
    return (
        run.ranks.distributed
        or stop
        or (stop_after_step is not None and pos.step >= stop_after_step)
        or pos.step >= pos.total_steps
        or pos.epoch != epoch
        or _every(cfg.save_every_n_steps, pos.step)
        or _every(cfg.sample_every_n_steps, pos.step)
    )


def after_step(run: Run, epoch: int, order_in_progress) -> None:
    """Step checkpoints and samples (never after the last step: the final file and grid follow)."""
    step, cfg = run.position.step, run.cfg
    if step >= run.position.total_steps:
        return
    if _every(cfg.save_every_n_steps, step):
        save_checkpoint(run, epoch + 1, step, by_epoch=False, epoch_order=order_in_progress)
    if _every(cfg.sample_every_n_steps, step):
        save_samples(run, f"{run.name}-step{step:08d}", epoch + 1, step)


def end_of_epoch(run: Run, done_epochs: int, losses: list[float]) -> None:
    """The epoch event, then epoch checkpoints and samples (kohya: not after the last epoch)."""
    step, cfg = run.position.step, run.cfg
    run.writer.emit(EpochEvent(epoch=done_epochs, step=step, mean_loss=sum(losses) / max(1, len(losses))))
    if done_epochs >= run.dataset.plan.epochs or step >= run.position.total_steps:
        return
    if _every(cfg.save_every_n_epochs, done_epochs):
        save_checkpoint(run, done_epochs, step, by_epoch=True, epoch_order=None)
    if _every(cfg.sample_every_n_epochs, done_epochs):
        save_samples(run, f"{run.name}-{done_epochs:06d}", done_epochs, step)


# ---------------------------------------------------------------------------------------------------
# The loop


def train(cfg, writer: EventWriter, resume: Path | str | None = None, stop_after_step: int | None = None) -> Path:
    """Run the whole training; returns the final LoRA path. ``stop_after_step`` is for tests."""
    wall_start = time.time()
    if resume == "last":
        resume = find_latest_state(Path(cfg.output_dir))
        if resume is None:
            raise ResumeError(f"--resume last: no *-state folder in {cfg.output_dir}")
    resume = Path(resume) if resume is not None else None
    started = time.perf_counter()
    ranks = init_ranks()
    if not ranks.main:  # one writer: the other ranks' events would repeat rank 0's
        writer = EventWriter(None, stream=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    run = setup(cfg, writer, resume, ranks)
    cfg = run.cfg  # memory planning may have turned on checkpointing or chosen 8-bit AdamW
    timings = {"setup": time.perf_counter() - started, **run.timings, **prepare_caches(run)}
    timings = {key: round(value, 3) for key, value in timings.items()}

    epoch_order = None
    if resume is not None:
        saved = load_state(resume, run.position, run.network, run.optimizer, run.scheduler, run.scaler)
        run.position = Position(**saved["position"])
        run.position.optimizer_type = run.position.optimizer_type or cfg.optimizer_type  # states before it was kept
        run.losses = list(saved.get("losses", []))
        epoch_order = saved["epoch_order"]
        place_learning_rates(run.optimizer, run.device)
        longer = run.position.total_steps != run.dataset.plan.total_steps  # a finished run's state (load_state)
        if saved["position"].get("processes", 1) != ranks.world or longer:
            replan_after_resume(run)

    plan = run.dataset.plan
    pos = run.position
    previous_handlers = _install_stop_handlers(run)  # before the start event: a client may stop us on it
    device_name = str(run.device)
    if run.device.type == "cuda":
        device_name += f" ({torch.cuda.get_device_name(run.device)})"
    writer.emit(
        StartEvent(
            total_steps=plan.total_steps,
            epochs=plan.epochs,
            steps_per_epoch=plan.steps_per_epoch,
            samples_per_epoch=plan.samples_per_epoch,
            batch_size=cfg.batch_size,
            model_family=run.bundle.family,
            model=cfg.pretrained_model_name_or_path,
            device=device_name,
            dtype=str(run.dtype).removeprefix("torch."),
            resumed_from_step=pos.step,
            trainable_parameters=sum(p.numel() for p in run.network.parameters()),
            output_dir=str(run.output_dir),
            warnings=run.bundle.warnings + run.info.get("warnings", []),
            choices=run.choices,
            setup_seconds=timings,
        )
    )

    try:
        while pos.step < plan.total_steps and pos.epoch < plan.epochs:
            epoch = pos.epoch
            order = epoch_order or data_mod.epoch_batches(run.dataset, cfg.batch_size, run.seed, epoch)
            epoch_order = None
            epoch_losses: list[float] = []
            deferred: LaunchedStep | None = None  # launched, its event not yet emitted
            while pos.epoch == epoch and pos.step < plan.total_steps:
                group = order[pos.batch : pos.batch + cfg.gradient_accumulation_steps * run.ranks.world]
                try:
                    launched = train_step(run, group, epoch, pos.batch)
                except BaseException:
                    if deferred is not None:  # its work is done: report it before the error
                        with suppress(Exception):
                            finish_step(run, deferred, epoch_losses)
                    raise
                pos.batch += len(group)
                pos.step += 1
                if pos.batch >= len(order):  # the epoch's last step: the position moves to the next epoch
                    pos.epoch, pos.batch = epoch + 1, 0
                if deferred is not None:  # the step before, finished while this one runs
                    finish_step(run, deferred, epoch_losses)
                    deferred = None
                stop = any_rank(run.stop_requested, run.ranks)
                if not host_work_due(run, epoch, stop, stop_after_step):
                    deferred = launched
                    continue
                finish_step(run, launched, epoch_losses)
                order_in_progress = order if pos.epoch == epoch else None
                after_step(run, epoch, order_in_progress)
                if pos.epoch != epoch:
                    end_of_epoch(run, epoch + 1, epoch_losses)
                stop = any_rank(run.stop_requested, run.ranks)  # also a signal during the checkpoint or samples
                if stop or (stop_after_step is not None and pos.step >= stop_after_step):
                    folder = run.output_dir / state_dir_name(run.name, step=pos.step)
                    if run.ranks.main:
                        save_state(
                            folder,
                            pos,
                            run.network,
                            run.optimizer,
                            run.scheduler,
                            run.scaler,
                            order_in_progress,
                            run.losses,
                        )
                    barrier(run.ranks)  # no rank leaves (and gets the others killed) before the state is written
                    raise Stopped(f"stopped after step {pos.step}; resume with --resume {folder}", folder)
    finally:
        _restore_handlers(previous_handlers)

    final = final_path(cfg)
    last_epoch = min(plan.epochs, max(1, math.ceil(pos.step / max(1, plan.steps_per_epoch))))
    run.info["finished_at"] = time.time()
    if not run.ranks.main:
        barrier(run.ranks)  # no rank leaves before rank 0 has written the final file (see distributed.leave)
        return final
    metadata = build_metadata(cfg, run.bundle.family, {**run.info, "epoch": last_epoch, "step": pos.step})
    digest = save_kohya(run.network, final, metadata, cfg.save_precision)
    # the state of the final weights: a run with more epochs (`rentrain continue`) goes on from it
    folder = run.output_dir / state_dir_name(run.name, step=pos.step)
    state = save_state(folder, pos, run.network, run.optimizer, run.scheduler, run.scaler, None, run.losses)
    save_samples(run, run.name, last_epoch, pos.step, final=True)
    writer.emit(
        DoneEvent(
            path=str(final),
            sha256=digest,
            step=pos.step,
            epoch=last_epoch,
            wall_seconds=time.time() - wall_start,
            final_loss=run.losses[-1] if run.losses else None,
            state_dir=str(state),
        )
    )
    barrier(run.ranks)
    return final


def replan_after_resume(run: Run) -> None:
    """A state saved with another number of processes, or a finished run's state that a longer run continues:
    the batches left run at this run's rate. A run measured in steps gets this config's step count; a run
    measured in epochs gets the steps that finish them. The learning-rate schedule is laid over the new total
    from the step reached."""
    pos, plan, cfg = run.position, run.dataset.plan, run.cfg
    per_step = cfg.gradient_accumulation_steps * run.ranks.world
    if cfg.max_train_epochs is not None or cfg.max_train_steps is None:
        left_this_epoch = math.ceil((plan.batches_per_epoch - pos.batch) / per_step)
        plan.total_steps = pos.step + left_this_epoch + (plan.epochs - pos.epoch - 1) * plan.steps_per_epoch
    pos.total_steps = plan.total_steps
    state = run.scheduler.state_dict()
    run.scheduler = make_scheduler(
        run.optimizer,
        cfg.lr_scheduler,
        cfg.warmup_steps_for(pos.total_steps),
        pos.total_steps,
        cfg.lr_scheduler_num_cycles,
        cfg.lr_scheduler_power,
    )
    run.scheduler.last_epoch = state["last_epoch"] - 1
    with warnings.catch_warnings():  # "step before the optimizer's": this step only sets the step reached's rate
        warnings.simplefilter("ignore", UserWarning)
        run.scheduler.step()
    pos.processes = run.ranks.world
    pos.steps_per_epoch = plan.steps_per_epoch


def _install_stop_handlers(run: Run):
    """SIGTERM/SIGINT finish the current step, save a state and stop (a spot instance being reclaimed)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def request_stop(signum, frame):
        if run.stop_requested:
            raise KeyboardInterrupt
        run.stop_requested = True

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, request_stop)
    return previous


def _restore_handlers(previous) -> None:
    if previous:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
