"""Data-parallel training across the processes `accelerate launch` starts, one per GPU (gloo on CPU).

Every rank holds the whole model and trains on its share of each optimizer step's batches; the LoRA
gradients are summed across ranks with one collective per step before the optimizer steps, so every rank
applies the same update. (DistributedDataParallel does the same reduction during backward, but its hooks
cannot live inside the CUDA graphs the step replays; one coalesced all-reduce of the ~20-80 MB of LoRA
gradients between the backward and the optimizer graphs keeps both.) Rank 0 alone writes events,
checkpoints, samples and the final file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_ranks() -> Ranks:
    """The ranks of a launch (torchrun / accelerate launch set WORLD_SIZE); a plain process is rank 0 of 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    from accelerate import PartialState

    # accelerate treats a CPU-only launch as single-process unless told it is a CPU run (then gloo)
    state = PartialState(cpu=not torch.cuda.is_available())
    return Ranks(state.process_index, state.num_processes, state.local_process_index)


def _group_device(ranks: Ranks) -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", ranks.local_rank) if backend == "nccl" else torch.device("cpu")


def broadcast_int(value: int, ranks: Ranks) -> int:
    if not ranks.distributed:
        return value
    holder = torch.tensor([value], dtype=torch.int64, device=_group_device(ranks))
    torch.distributed.broadcast(holder, src=0)
    return int(holder.item())


def broadcast_parameters(flat: torch.Tensor, ranks: Ranks) -> None:
    """Start every rank from rank 0's LoRA initialisation (``flat``: the buffer all parameters view)."""
    if ranks.distributed:
        torch.distributed.broadcast(flat, src=0)


def sum_gradients(flat_grad: torch.Tensor, ranks: Ranks) -> None:
    """Sum every rank's gradients, in place, in one all-reduce over the flat gradient buffer (the loss is
    already divided by the number of ranks)."""
    if ranks.distributed:
        torch.distributed.all_reduce(flat_grad)


def sum_across(values: list[float], ranks: Ranks) -> list[float]:
    if not ranks.distributed:
        return values
    holder = torch.tensor(values, dtype=torch.float64, device=_group_device(ranks))
    torch.distributed.all_reduce(holder)
    return holder.tolist()


def min_across(value: float, ranks: Ranks) -> float:
    if not ranks.distributed:
        return value
    holder = torch.tensor([value], dtype=torch.float64, device=_group_device(ranks))
    torch.distributed.all_reduce(holder, op=torch.distributed.ReduceOp.MIN)
    return float(holder.item())


def any_rank(flag: bool, ranks: Ranks) -> bool:
    """True on every rank when any rank has the flag set (a stop signal reaches ranks at different steps)."""
    if not ranks.distributed:
        return flag
    holder = torch.tensor([int(flag)], device=_group_device(ranks))
    torch.distributed.all_reduce(holder, op=torch.distributed.ReduceOp.MAX)
    return bool(holder.item())


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        torch.distributed.barrier()


def leave() -> None:
    """Tear the process group down before the process exits (__main__.exit_process then skips the
    interpreter's teardown, where gloo's threads can still abort a rank)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
