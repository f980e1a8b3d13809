"""One training step as ordinary PyTorch: a batch's random draws, its loss, backward, the optimizer step.

``batch_inputs`` makes everything random or host-side about a batch (kohya's train_network.process_batch,
first half): latents, noise, timesteps, loss weights and the text conditioning. ``inputs_loss`` is the rest
of process_batch: device work only, no host sync, so that the fast path (speed.py) can replay it as a CUDA
graph. ``train_step`` runs one optimizer step over a group of batches without waiting for the GPU.

All randomness of a step comes from generators seeded with the run's seed and the step's position, so a
resumed run draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import random
import time
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from . import data as data_mod
from .distributed import sum_gradients
from .graphs import StepInputs
from .models import encode, tokenize

if TYPE_CHECKING:
    from .run_setup import Run


def inputs_loss(run: Run, inputs: StepInputs) -> torch.Tensor:
    """The mean loss of one (micro-)batch: noise the latents, predict, compare with the family's target."""
    cfg, family, objective = run.cfg, run.family, run.objective
    context, pooled = text_conditioning(run, inputs)
    latents, noise, timesteps = inputs.latents, inputs.noise, inputs.timesteps
    noisy = objective.add_noise(latents, noise, timesteps)
    with autocast(run):
        prediction = family.predict(
            run.bundle.unet, noisy.to(run.dtype), timesteps, context.to(run.dtype), pooled, inputs.conditions
        )
    prediction = objective.loss_prediction(prediction, noisy, timesteps)
    target = objective.target(latents, noise, timesteps)
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    loss = loss * inputs.weights
    if cfg.min_snr_gamma:
        loss = loss * objective.min_snr_weight(timesteps, cfg.min_snr_gamma)
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


def apply_gradients(run: Run) -> None:
    """Unscale, clip, step, and zero the gradients (in place: graphs and the flat buffers add into them)."""
    flat, scaler = run.network.flat_buffers, run.scaler
    if scaler is not None:
        scaler.unscale_([flat.master_grad])  # the optimizer's gradients are views of it
    if run.cfg.max_grad_norm:
        flat.clip_grad_norm_(run.cfg.max_grad_norm)
    if scaler is not None:
        scaler.step(run.optimizer)
        scaler.update()
    else:
        run.optimizer.step()
    flat.zero_grad()


def train_step(run: Run, group: list[list[int]], epoch: int, first_batch: int) -> LaunchedStep:
    """Queue one optimizer step over ``group``: gradient_accumulation_steps batches per process. Nothing here
    waits for the GPU, so the next step can be prepared while this one runs (the loop's ``finish_step``
    reads it).

    As accelerate does for kohya, each batch's loss is divided by gradient_accumulation_steps (and by the
    number of processes, whose gradients are summed), also in an epoch's last, shorter group. Batch i of
    the group runs on process i % processes, with the random draws of its position in the epoch.
    """
    t0 = time.perf_counter()
    timer = StepTimer.start(run.device)
    losses = []
    for offset in range(run.ranks.rank, len(group), run.ranks.world):
        inputs = batch_inputs(run, group[offset], epoch, first_batch + offset)
        parts = [run.speed.backward(part) for part in inputs.split(run.micro_batch)]  # memory planning's split
        losses.append(parts[0] if len(parts) == 1 else torch.stack(parts).sum())
    optimizer_step(run)
    loss = torch.stack(losses).sum().float() if losses else torch.zeros((), device=run.device)
    loss, ready = timer.stop(loss)
    return LaunchedStep(
        step=run.position.step + 1,
        epoch=epoch,
        images=sum(len(batch) for batch in group),
        batches=len(losses),
        loss=loss,
        lrs=host_learning_rates(run),
        began=timer.began,
        ready=ready,
        seconds=time.perf_counter() - t0,
    )


def optimizer_step(run: Run) -> None:
    sum_gradients(run.network.flat_buffers.master_grad, run.ranks)
    run.speed.optimizer_step()
    run.scheduler.step()


# ---------------------------------------------------------------------------------------------------
# The batch's inputs


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
    timesteps = run.objective.sample_timesteps(latents.shape, gen, device)
    weights = to_device(torch.tensor([cfg.prior_loss_weight if r.is_reg else 1.0 for r in records]), device)
    family_conditions = run.family.step_conditions(records, flips)  # e.g. SDXL's size and crop ids
    text = conditioning(run, records, epoch, batch_index)
    conditions = {name: to_device(value, device) for name, value in family_conditions.items()}
    conditions |= text.pop("conditions")
    return StepInputs(latents=latents, noise=noise, timesteps=timesteps, weights=weights, conditions=conditions, **text)


def conditioning(run: Run, records: list[data_mod.ImageRecord], epoch: int, batch_index: int) -> dict[str, Any]:
    """The batch's text conditioning: cached (context, pooled) tensors, or token ids to encode in the step;
    and under "conditions" the family's text_conditions (Flux's T5 attention mask)."""
    cfg = run.cfg
    if run.text_cache:
        entries = [run.text_cache[data_mod.base_caption(cfg, r.caption)] for r in records]
        context = torch.stack([e[0] for e in entries]).to(run.dtype)
        pooled_rows = [e[1] for e in entries if e[1] is not None]  # all or none: the family gives pooled or not
        pooled = torch.stack(pooled_rows).to(run.dtype) if pooled_rows else None
        extras = {name: torch.stack([e[2][name] for e in entries]) for name in entries[0][2]}
        return {"context": context, "pooled": pooled, "conditions": extras}
    captions = [
        data_mod.process_caption(cfg, r.caption, data_mod.caption_rng(run.seed, epoch, batch_index, slot), epoch + 1)
        for slot, r in enumerate(records)
    ]
    ids = tokenize(run.bundle, captions, cfg.max_token_length)
    extras = {name: to_device(value, run.device) for name, value in run.family.text_conditions(ids).items()}
    return {"token_ids": [to_device(i, run.device) for i in ids], "conditions": extras}


def text_conditioning(run: Run, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context, pooled): cached, or encoded here (with gradients when the text encoders train)."""
    context, pooled = inputs.context, inputs.pooled
    if inputs.token_ids is not None:
        grad = torch.enable_grad() if run.cfg.trains_text_encoder else torch.no_grad()
        with grad, autocast(run):
            context, pooled = encode(run.bundle, inputs.token_ids, run.cfg.clip_skip)
    assert context is not None, "a step has either the cached text-encoder outputs or the token ids"
    return context, pooled


def cached_latent(record: data_mod.ImageRecord, flipped: bool) -> torch.Tensor:
    latent = record.latent_flipped if flipped else record.latent
    if latent is None:
        raise RuntimeError(f"{record.path}: no cached latent (prepare_caches encodes every image first)")
    return latent


def step_generator(device: torch.device, seed: int, *position: int) -> torch.Generator:
    value = seed
    for part in position:
        value = (value * 1_000_003 + part + 1) % (2**62)
    return torch.Generator(device=device).manual_seed(value)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the GPU: a plain copy from pageable memory waits for
    everything queued on the stream (the step before), a copy from pinned memory is queued behind it."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------------
# Precision


def uses_autocast(run: Run) -> bool:
    """bf16 has float32's range: the frozen model and its activations stay bf16 without autocast's float32
    round trips (norms accumulate in float32 inside their kernels), and the LoRA casts its weights to bf16
    where autocast would have. fp16 does the same where the family's activations fit fp16's range
    (``ModelFamily.fp16_throughout``), and runs under autocast (float32 where fp16 could overflow) where
    they do not."""
    return run.dtype == torch.float16 and not run.family.fp16_throughout


def compute_description(run: Run) -> str:
    if uses_autocast(run):
        return "fp16 under autocast, LoRA weights fp32"
    if run.dtype == torch.float32:
        return "float32"
    name = "bf16" if run.dtype == torch.bfloat16 else "fp16"
    lora = "bf16 (full_bf16)" if run.cfg.full_bf16 else "fp32"
    return f"{name} throughout (frozen model and activations), LoRA weights {lora}"


def autocast(run: Run) -> AbstractContextManager[Any]:
    if not uses_autocast(run):
        return nullcontext()
    # no weight-cast cache: it is not valid across CUDA-graph replays, and each weight is used once a step
    return torch.autocast(run.device.type, dtype=run.dtype, cache_enabled=False)


# ---------------------------------------------------------------------------------------------------
# A launched step


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

    def wait(self) -> tuple[float, float]:
        """(the summed loss, the step's seconds: GPU time between its events on CUDA), once it is done."""
        seconds = self.seconds
        if self.ready is not None and self.began is not None:
            self.ready.synchronize()
            seconds = self.began.elapsed_time(self.ready) / 1000
        return float(self.loss), seconds


@dataclass
class StepTimer:
    """A step's GPU time on CUDA: on the stream, "began" passes when the step before is done or when this
    step is queued, whichever is later; "began" to "ready" is then the step's own time, overlapped or not."""

    stream: torch.cuda.Stream | None
    began: torch.cuda.Event | None

    @classmethod
    def start(cls, device: torch.device) -> StepTimer:
        if device.type != "cuda":
            return cls(None, None)
        stream = torch.cuda.current_stream(device)
        began = torch.cuda.Event(enable_timing=True)
        began.record(stream)
        return cls(stream, began)

    def stop(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """(the loss, copied to pinned host memory behind the step's work on CUDA, and the "ready" event)."""
        if self.stream is None:
            return loss, None
        loss = torch.empty((), dtype=torch.float32, pin_memory=True).copy_(loss, non_blocking=True)
        ready = torch.cuda.Event(enable_timing=True)
        ready.record(self.stream)
        return loss, ready


def host_learning_rates(run: Run) -> dict[str | None, float]:
    """Each group's current learning rate, computed on the host (the groups' own may be device tensors
    that only a wait for the GPU could read)."""
    scheduler = run.scheduler
    schedules = zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    rates = [float(base * schedule(scheduler.last_epoch)) for base, schedule in schedules]
    return {group.get("name"): rate for group, rate in zip(run.optimizer.param_groups, rates, strict=True)}
