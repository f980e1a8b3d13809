"""Several GPUs per job, on the client's side: the count's bounds, the steps with N data-parallel ranks,
the trainer's command line (one process, or N under `accelerate launch`), and what this machine offers
for `--provider local --gpus N`.

With N GPUs the trainer runs N processes (DDP). Each rank trains its own batch, so one optimizer step
trains N x batch_size samples (the effective batch) and an epoch has N times fewer steps. Only rank 0
writes events and checkpoints, so following a job is the same for any N. The learning rate is never
rescaled (kohya does not either): README.md, "Several GPUs".
"""

from __future__ import annotations

import importlib.util

from remote.buckets import StepPlan
from remote.config import TrainConfig
from rentrain.job_profile import steps_per_epoch

MIN_GPUS = 1
MAX_GPUS = 8  # one machine; remote.config's [rentrain] gpu_count has the same bounds
ACCELERATE_LAUNCH = "accelerate.commands.launch"
TRAINER_MODULE = "remote.trainer"


class GpuCountError(ValueError):
    pass


def check_gpu_count(value: int) -> int:
    if not MIN_GPUS <= value <= MAX_GPUS:
        raise GpuCountError(
            f"{value} GPUs: rentrain trains on one machine with {MIN_GPUS} to {MAX_GPUS} GPUs (data parallel)"
        )
    return value


def launch_arguments(gpus: int) -> list[str]:
    """What runs the trainer module: nothing extra for one GPU, `accelerate launch` (DDP) for several.
    Mixed precision and compilation are the trainer's own settings, so accelerate is told to add neither."""
    check_gpu_count(gpus)
    if gpus == 1:
        return []
    return [
        "-m",
        ACCELERATE_LAUNCH,
        "--multi_gpu",
        "--num_processes",
        str(gpus),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]


def trainer_argv(python: str, config: str, resume: str | None, gpus: int) -> list[str]:
    """The trainer's command line: `python -m remote.trainer CONFIG [--resume STATE]`, or that module under
    `python -m accelerate.commands.launch --multi_gpu --num_processes N ...` for N > 1."""
    trainer = ["-m", TRAINER_MODULE, config] + (["--resume", resume] if resume else [])
    return [python, *launch_arguments(gpus), *trainer]


def plan_with_gpus(plan: StepPlan, train: TrainConfig, gpus: int) -> StepPlan:
    """The step plan with `gpus` ranks: ceil(batches / (ranks x accumulation)) steps per epoch; the epochs
    stay when max_train_epochs is set, the steps stay when max_train_steps fixes them."""
    if gpus == 1:
        return plan
    per_epoch = steps_per_epoch(plan.batches_per_epoch, gpus, train.gradient_accumulation_steps)
    if train.max_train_epochs is not None:
        return plan.model_copy(update={"steps_per_epoch": per_epoch, "total_steps": plan.epochs * per_epoch})
    epochs = -(-plan.total_steps // per_epoch) if per_epoch else 0
    return plan.model_copy(update={"steps_per_epoch": per_epoch, "epochs": epochs})


def describe_data_parallel(gpus: int, batch_size: int) -> str:
    """One line for the user: what N GPUs change about the training."""
    return (
        f"{gpus} GPUs, data parallel: each step trains {gpus} x batch {batch_size} = {gpus * batch_size} images "
        "(effective batch); the learning rate is not rescaled"
    )


def local_cuda_devices() -> int:
    """CUDA devices on this machine (0 without CUDA). Imports torch, so only --provider local calls it."""
    if importlib.util.find_spec("torch") is None:
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_gpus_note(gpus: int, cuda_devices: int) -> str | None:
    """Whether `--provider local --gpus N` can run here. More GPUs than CUDA devices is an error; without
    CUDA, N CPU processes run (gloo): slower than one, but how the multi-process path is tested."""
    check_gpu_count(gpus)
    if cuda_devices and gpus > cuda_devices:
        raise GpuCountError(
            f"--gpus {gpus}: this machine has {cuda_devices} CUDA device{'s' if cuda_devices > 1 else ''}; "
            f"use --gpus {cuda_devices} or fewer"
        )
    if not cuda_devices and gpus > 1:
        return (
            f"no CUDA device here: --gpus {gpus} runs {gpus} CPU processes (gloo), which tests the multi-process "
            "path but is slower than one process"
        )
    return None
