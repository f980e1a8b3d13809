"""bitsandbytes' 8-bit AdamW as tensor operations only, so that a CUDA graph can hold its step.

bitsandbytes' ``AdamW8bit`` keeps each step count as a host int, hands the learning rate and the bias
corrections to its kernel as floats, and creates its state at the first step: a captured graph would replay
them frozen, so the trainer runs it eagerly, one kernel launch per LoRA tensor. ``GraphableAdamW8bit`` keeps
the same state and does the same arithmetic:

- State, per parameter and under bitsandbytes' names: ``state1``/``state2`` in uint8 with the signed and unsigned
  dynamic maps ``qmap1``/``qmap2`` and float32 ``absmax1``/``absmax2`` per block of 256 elements, the blocks
  starting at the tensor's first element; float32 ``state1``/``state2`` for tensors under ``min_8bit_size``;
  ``step``. All of it is made at construction, as views of a few buffers that the step updates in place.
- Arithmetic: bitsandbytes' PyTorch implementation (bitsandbytes/backends/cpu/ops.py, optimizer_update_8bit_blockwise
  and optimizer_update_32bit, with backends/default/ops.py's quantize_blockwise: the nearest code, ties to the
  lower one), operation for operation, so the states agree byte for byte with it
  (tests/trainer/test_adamw8bit.py). bitsandbytes' CUDA kernel (csrc/kernels.cu) is the same algorithm with other
  roundings: weight decay after the update, fast-math powers and divisions, its own code search, and a nudge that
  keeps each first-moment code's sign; so on CUDA the two agree in what they compute, not bit for bit.
- All tensors at once: each tensor's blocks are rows of 256 (its last block padded by repeating its last
  element, which changes no block's absmax), gathered and scattered with one index. A step is about 20 small
  kernels plus about 45 per pass of up to ROWS_PER_PASS rows (8-bit tensors; about 20 for the others), the
  same for 8 tensors or 800. A pass needs temporaries of about 36 bytes per value (counted, not measured),
  which a CUDA graph's memory pool keeps: passes of bounded size keep that near 150 MB, whatever the LoRA's size.
- Learning rates come from each group's ``lr`` at every step: a device tensor that the scheduler fills in place
  (remote/trainer/optim.py, place_learning_rates) keeps a captured step correct. betas, eps and weight_decay are
  device tensors, read from the groups at construction and at load_state_dict; step counts are device tensors.
- ``found_inf`` and ``grad_scale`` attributes (torch's convention for fused Adam, set by GradScaler and
  loss_scale.py): gradients divided by ``grad_scale``; where ``found_inf`` is nonzero the step changes nothing,
  step counts included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch

from .lora_fused import flat_view

BLOCK = 256  # bitsandbytes' block size for 8-bit optimizer states (Optimizer2State.init_state)
MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep float32 states
QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"  # where bitsandbytes' state_dict puts the tensors below
QUANT_STATE_NAMES = ("state1", "qmap1", "state2", "qmap2", "absmax1", "absmax2")
LR_DTYPE = torch.float64  # bitsandbytes computes with the learning rate as a Python float
ROWS_PER_PASS = 2**14  # blocks updated together: 4M values, about 150 MB of temporaries by count (module doc)


def dynamic_map(signed: bool) -> torch.Tensor:
    """bitsandbytes.functional.create_dynamic_map(signed) with its defaults (7 exponent bits, 8 bits): the 256
    sorted codes of the 8-bit states, computed with the same operations, so the same float32 values."""
    values: list[float] = [0.0, 1.0]
    for exponent in range(7):
        items = 2 ** (exponent if signed else exponent + 1) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (exponent - 6)
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def _flat_view(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, list[int]]:
    """(one flat view of the tensors, where each starts in it), lora_fused.flat_view's; else (None, where each
    starts in their concatenation)."""
    found = flat_view(tensors)
    if found is not None:
        return found
    bases = [0]
    for t in tensors[:-1]:
        bases.append(bases[-1] + t.numel())
    return None, bases


def _concatenated(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@dataclass(frozen=True)
class _Rows:
    """The blocks of every tensor as rows of ``BLOCK`` slots: the 8-bit tensors' rows first, then the others'.
    A row holds one block; slots past a tensor's end repeat its last element."""

    tensor: torch.Tensor  # [rows] the tensor (parameter index) each row belongs to
    first: torch.Tensor  # [rows] the row's first element, counted within its tensor
    last: torch.Tensor  # [rows] the row's last element, counted within its tensor

    @staticmethod
    def of(sizes: Sequence[int], order: Sequence[int]) -> _Rows:
        tensor, first, last = [], [], []
        for index in order:
            for start in range(0, sizes[index], BLOCK):
                tensor.append(index)
                first.append(start)
                last.append(min(start + BLOCK, sizes[index]) - 1)
        return _Rows(*(torch.tensor(values, dtype=torch.int64) for values in (tensor, first, last)))

    def ends(self, bases: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's first and last element in a flat tensor where tensor i starts at ``bases[i]``."""
        base = torch.tensor(bases, dtype=torch.int64)[self.tensor]
        return (base + self.first).to(device), (base + self.last).to(device)


def _slots(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[rows, BLOCK] flat positions: row r reads first[r], first[r] + 1, ..., last[r], then last[r] again."""
    return torch.minimum(first[:, None] + torch.arange(BLOCK, device=first.device), last[:, None])


@dataclass(frozen=True)
class _Layout:
    """Where the parameters and gradients lie, as the last step found them."""

    key: tuple[int, ...]  # their data pointers
    params: torch.Tensor | None  # a flat view of the parameters, or None: concatenated at each step
    grads: torch.Tensor | None
    param_rows: tuple[torch.Tensor, torch.Tensor]  # each row's first and last element in the flat parameters
    grad_rows: tuple[torch.Tensor, torch.Tensor]


class GraphableAdamW8bit(torch.optim.Optimizer):
    """bitsandbytes.optim.AdamW8bit's state and arithmetic, with a step that a CUDA graph can hold (module doc).

    Every parameter must have a gradient at each step: all of them are stepped at once."""

    _step_supports_amp_scaling = True  # GradScaler and loss_scale.py hand it found_inf / grad_scale
    lr_dtype = LR_DTYPE  # place_learning_rates makes learning-rate tensors of this dtype

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = MIN_8BIT_SIZE,
        is_paged: bool = False,
        *,
        rows_per_pass: int = ROWS_PER_PASS,
    ) -> None:
        # bitsandbytes' AdamW8bit signature and checks; paging and its args object have no equivalent here
        if amsgrad:
            raise ValueError("AdamW8bit does not support amsgrad=True")
        if optim_bits != 32:
            raise ValueError("AdamW8bit only supports optim_bits=32 (default value for compatibility)")
        if is_paged or args is not None:
            raise ValueError("GraphableAdamW8bit has no paged states and takes no args object (bitsandbytes' do)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._params = [p for group in self.param_groups for p in group["params"]]
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            raise ValueError(f"GraphableAdamW8bit needs all parameters on one device, not {sorted(map(str, devices))}")
        self.device = devices.pop()
        self._build_state(min_8bit_size, rows_per_pass)
        self._read_hyperparameters()
        self._built = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_built", False):
            raise RuntimeError("GraphableAdamW8bit's state is laid out at construction: it takes no new groups")
        super().add_param_group(param_group)

    # ----------------------------------------------------------------------------------------------------
    # Layout and state

    def _build_state(self, min_8bit_size: int, rows_per_pass: int) -> None:
        sizes = [p.numel() for p in self._params]
        eight_bit = [i for i, n in enumerate(sizes) if n >= min_8bit_size]
        float_states = [i for i, n in enumerate(sizes) if n < min_8bit_size]
        self._rows = _Rows.of(sizes, eight_bit + float_states)
        self._eight_bit_rows = sum(math.ceil(sizes[i] / BLOCK) for i in eight_bit)
        rows8, rows32 = self._eight_bit_rows, len(self._rows.tensor) - self._eight_bit_rows
        on = {"device": self.device}
        self._qmap1, self._qmap2 = dynamic_map(signed=True).to(**on), dynamic_map(signed=False).to(**on)
        self._bounds1 = (self._qmap1[:-1] + self._qmap1[1:]) / 2
        self._bounds2 = (self._qmap2[:-1] + self._qmap2[1:]) / 2
        self._codes1 = torch.zeros(rows8, BLOCK, dtype=torch.uint8, **on)
        self._codes2 = torch.zeros(rows8, BLOCK, dtype=torch.uint8, **on)
        self._absmax1 = torch.zeros(rows8, **on)
        self._absmax2 = torch.zeros(rows8, **on)
        self._exp_avg = torch.zeros(rows32, BLOCK, **on)
        self._exp_avg_sq = torch.zeros(rows32, BLOCK, **on)
        self._steps = torch.zeros(len(self._params), **on)
        tensors = len(self._params)
        self._betas = torch.zeros(tensors, 2, dtype=torch.float64, **on)  # filled by _read_hyperparameters
        self._eps = torch.zeros(tensors, dtype=torch.float64, **on)
        self._weight_decay = torch.zeros(tensors, dtype=torch.float64, **on)
        self._row_constants = torch.zeros(len(self._rows.tensor), 5, **on)  # beta1, beta2, 1 - beta1, 1 - beta2, eps
        # bitsandbytes' pure-PyTorch quantizer divides the last, partial block by its absmax clamped to 1e-38 and
        # stores that clamped absmax; full blocks are multiplied by the reciprocal and store it unclamped
        self._partial = (self._rows.last - self._rows.first + 1 < BLOCK)[:rows8].to(self.device)
        self._row_tensor = self._rows.tensor.to(self.device)
        group_of = [g for g, group in enumerate(self.param_groups) for _ in group["params"]]
        self._tensor_group = torch.tensor(group_of, dtype=torch.int64, device=self.device)
        self._layout: _Layout | None = None
        self._passes = [
            slice(start, min(start + rows_per_pass, stop))
            for first, stop in ((0, rows8), (rows8, rows8 + rows32))
            for start in range(first, stop, rows_per_pass)
        ]

        row, quantized = 0, set(eight_bit)
        for index in eight_bit + float_states:
            p, blocks = self._params[index], math.ceil(sizes[index] / BLOCK)
            state = self.state[p]
            state["step"] = self._steps[index]
            if index in quantized:
                start = row * BLOCK
                state["state1"] = self._codes1.view(-1)[start : start + sizes[index]].view(p.shape)
                state["qmap1"] = self._qmap1
                state["state2"] = self._codes2.view(-1)[start : start + sizes[index]].view(p.shape)
                state["qmap2"] = self._qmap2
                state["absmax1"] = self._absmax1[row : row + blocks]
                state["absmax2"] = self._absmax2[row : row + blocks]
            else:
                start = (row - rows8) * BLOCK
                state["state1"] = self._exp_avg.view(-1)[start : start + sizes[index]].view(p.shape)
                state["state2"] = self._exp_avg_sq.view(-1)[start : start + sizes[index]].view(p.shape)
            row += blocks

    def _read_hyperparameters(self) -> None:
        """betas, eps and weight_decay from the groups into device tensors (in place once made: a captured step
        reads these tensors)."""
        columns = []
        for group in self.param_groups:
            beta1, beta2 = (float(b) for b in group["betas"])
            eps, decay = float(group["eps"]), float(group["weight_decay"])
            if eps < 0.0:
                raise ValueError(f"Invalid epsilon value: {eps}")
            for i, beta in enumerate((beta1, beta2)):
                if not 0.0 <= beta < 1.0:
                    raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
            if decay < 0.0:
                raise ValueError(f"Invalid weight_decay value: {decay}")
            if isinstance(group["lr"], float | int) and group["lr"] < 0.0:
                raise ValueError(f"Invalid learning rate: {group['lr']}")
            # bitsandbytes passes these as Python floats: 1 - beta in double, each rounded to float32 in the kernel
            columns.append([beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, decay])
        per_tensor = torch.tensor(columns, dtype=torch.float64)[self._tensor_group.cpu()]
        self._betas.copy_(per_tensor[:, :2])
        self._eps.copy_(per_tensor[:, 4])
        self._weight_decay.copy_(per_tensor[:, 5])
        self._row_constants.copy_(per_tensor[self._rows.tensor][:, :5])

    def _gradients(self) -> list[torch.Tensor]:
        grads = []
        for p in self._params:
            if p.grad is None:
                raise ValueError(
                    "GraphableAdamW8bit steps every parameter at once, and a parameter of shape "
                    f"{tuple(p.shape)} has no gradient"
                )
            grads.append(p.grad)
        return grads

    def _current_layout(self, grads: list[torch.Tensor]) -> _Layout:
        """Where the parameters and gradients lie now; worked out again only when one of them moved (so never
        inside a captured step, whose eager warm-up found the same tensors)."""
        key = tuple(t.data_ptr() for t in chain(self._params, grads))
        if self._layout is None or self._layout.key != key:
            params, param_bases = _flat_view(self._params)
            grads_view, grad_bases = _flat_view(grads)
            param_rows = self._rows.ends(param_bases, self.device)
            grad_rows = param_rows if grad_bases == param_bases else self._rows.ends(grad_bases, self.device)
            self._layout = _Layout(key, params, grads_view, param_rows, grad_rows)
        return self._layout

    # ----------------------------------------------------------------------------------------------------
    # The step

    def _learning_rates(self) -> torch.Tensor:
        """[tensors] float64: each tensor's group's lr, read from the group now (a device tensor, or a float)."""
        rates = [
            lr.to(LR_DTYPE) if isinstance(lr, torch.Tensor) else torch.full((), lr, dtype=LR_DTYPE, device=self.device)
            for lr in (group["lr"] for group in self.param_groups)
        ]
        return torch.stack(rates).to(self.device)[self._tensor_group]

    def _row_coefficients(self, keep: torch.Tensor | None) -> torch.Tensor:
        """Advance the step counts (where ``keep``) and return [rows, 5] float32 per row: correction2,
        -lr / correction1, 1 - lr * weight_decay (8-bit rows); eps * correction2, -lr * correction2 / correction1
        (32-bit rows). In float64 then rounded, as bitsandbytes computes them in Python and passes floats."""
        self._steps.add_(1 if keep is None else keep)
        lr = self._learning_rates()
        corrections = 1 - self._betas ** self._steps[:, None]
        correction1, correction2 = corrections[:, 0], corrections[:, 1].sqrt()
        per_tensor = torch.stack(
            [
                correction2,
                -lr / correction1,
                1 - lr * self._weight_decay,
                self._eps * correction2,
                -lr * correction2 / correction1,
            ],
            dim=1,
        )
        return per_tensor.float()[self._row_tensor]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gradients = self._gradients()
        layout = self._current_layout(gradients)
        params = _concatenated(self._params) if layout.params is None else layout.params
        grads = _concatenated(gradients) if layout.grads is None else layout.grads
        found_inf: torch.Tensor | None = getattr(self, "found_inf", None)
        grad_scale: torch.Tensor | None = getattr(self, "grad_scale", None)
        keep = None if found_inf is None else found_inf.reshape(()) == 0
        coefficients = self._row_coefficients(keep)
        for rows in self._passes:
            slots = _slots(layout.param_rows[0][rows], layout.param_rows[1][rows])
            same = layout.grad_rows is layout.param_rows
            grad_slots = slots if same else _slots(layout.grad_rows[0][rows], layout.grad_rows[1][rows])
            p = params.take(slots).float()
            g = grads.take(grad_slots).float()
            if grad_scale is not None:
                g = g / grad_scale
            update = self._update_8bit if rows.start < self._eight_bit_rows else self._update_32bit
            updated = update(rows, p, g, coefficients[rows], keep)
            params.put_(slots, updated.to(params.dtype))
        if layout.params is None:
            pieces = params.split([t.numel() for t in self._params])
            shaped = [piece.view(t.shape) for piece, t in zip(pieces, self._params, strict=True)]
            torch._foreach_copy_([t.detach() for t in self._params], shaped)
        return loss

    def _update_8bit(
        self, rows: slice, p: torch.Tensor, g: torch.Tensor, coefficients: torch.Tensor, keep: torch.Tensor | None
    ) -> torch.Tensor:
        """optimizer_update_8bit_blockwise of bitsandbytes' CPU backend ("adam"), for these rows: the updated
        parameters (in place of ``p`` unless a skipped step needs it)."""
        beta1, beta2, one_minus_beta1, one_minus_beta2, eps = self._row_constants[rows].split(1, dim=1)
        correction2, neg_lr_over_correction1, decay = coefficients[:, :3].split(1, dim=1)
        codes1, codes2 = self._codes1[rows], self._codes2[rows]
        absmax1, absmax2 = self._absmax1[rows], self._absmax2[rows]
        exp_avg = self._qmap1[codes1.int()].mul_(absmax1[:, None])
        exp_avg_sq = self._qmap2[codes2.int()].mul_(absmax2[:, None])
        exp_avg.mul_(beta1).addcmul_(g, one_minus_beta1)  # = .add_(g, alpha=1 - beta1): one fused multiply-add
        exp_avg_sq.mul_(beta2).addcmul_(g * one_minus_beta2, g)  # = .addcmul_(g, g, value=1 - beta2)
        denom = exp_avg_sq.sqrt().div_(correction2).add_(eps)
        updated = torch.mul(p, decay, out=p if keep is None else torch.empty_like(p))
        updated.addcdiv_(exp_avg * neg_lr_over_correction1, denom)  # = .addcdiv_(exp_avg, denom, value=-lr / c1)
        del denom
        partial = self._partial[rows]
        _quantize(exp_avg, self._bounds1, partial, codes1, absmax1, keep)
        _quantize(exp_avg_sq, self._bounds2, partial, codes2, absmax2, keep)
        return updated if keep is None else torch.where(keep, updated, p)

    def _update_32bit(
        self, rows: slice, p: torch.Tensor, g: torch.Tensor, coefficients: torch.Tensor, keep: torch.Tensor | None
    ) -> torch.Tensor:
        """optimizer_update_32bit of bitsandbytes' CPU backend ("adam"), for these rows of the tensors under
        min_8bit_size: the updated parameters (in place of ``p`` unless a skipped step needs it)."""
        beta1, beta2, one_minus_beta1, one_minus_beta2, _ = self._row_constants[rows].split(1, dim=1)
        decay, eps_correction2, step_size = coefficients[:, 2:].split(1, dim=1)
        own = slice(rows.start - self._eight_bit_rows, rows.stop - self._eight_bit_rows)
        state1, state2 = self._exp_avg[own], self._exp_avg_sq[own]
        # in place, unless a skipped step must leave them as they were
        exp_avg = (state1.mul_(beta1) if keep is None else state1 * beta1).addcmul_(g, one_minus_beta1)
        exp_avg_sq = (state2.mul_(beta2) if keep is None else state2 * beta2).addcmul_(g * one_minus_beta2, g)
        update = exp_avg / exp_avg_sq.sqrt().add_(eps_correction2)
        updated = torch.mul(p, decay, out=p if keep is None else torch.empty_like(p))
        updated.addcmul_(update, step_size)  # = .add_(update, alpha=step_size): one fused multiply-add
        if keep is None:
            return updated
        _commit(state1, exp_avg, keep)
        _commit(state2, exp_avg_sq, keep)
        return torch.where(keep, updated, p)

    # ----------------------------------------------------------------------------------------------------
    # Saving and loading, in bitsandbytes' format

    def state_dict(self) -> dict[str, Any]:
        """bitsandbytes' layout: per parameter ``step`` (an int: one read of the device for all of them) and the
        quantization tensors under QUANT_STATE_KEY, so bitsandbytes' AdamW8bit loads it and the other way round."""
        saved = super().state_dict()
        steps = self._steps.tolist()
        state = {}
        for index, entry in saved["state"].items():
            wrapped = {name: entry[name] for name in QUANT_STATE_NAMES if name in entry}
            state[index] = {"step": int(steps[index]), QUANT_STATE_KEY: wrapped}
        saved["state"] = state
        return saved

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Copy a state (this class's or bitsandbytes' AdamW8bit's) into the buffers, in place: a captured step
        keeps reading them. Learning-rate tensors are filled in place too."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups, strict=True)):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
            )
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            for key, value in saved.items():
                if key == "params":
                    continue
                if key == "lr" and isinstance(group["lr"], torch.Tensor):
                    group["lr"].copy_(torch.as_tensor(value, dtype=group["lr"].dtype))
                else:
                    group[key] = value
        self._read_hyperparameters()
        saved_ids = [i for s in saved_groups for i in s["params"]]
        for index, (p, saved_id) in enumerate(zip(self._params, saved_ids, strict=True)):
            entry = dict(state_dict["state"].get(saved_id, {}))
            entry.update(entry.pop(QUANT_STATE_KEY, {}))
            self._load_tensor_state(p, index, entry)
        self._repeat_padding()

    def _load_tensor_state(self, p: torch.Tensor, index: int, entry: dict[str, Any]) -> None:
        state = self.state[p]
        if not entry:  # saved before its first step
            for name in ("state1", "state2", "absmax1", "absmax2"):
                if name in state:
                    state[name].zero_()
            self._steps[index] = 0
            return
        for name in ("state1", "state2", "absmax1", "absmax2"):
            if name not in state:
                continue
            value = entry.get(name)
            if (
                not isinstance(value, torch.Tensor)
                or value.dtype != state[name].dtype
                or value.numel() != state[name].numel()
            ):
                raise ValueError(
                    f"the saved optimizer state of a parameter of shape {tuple(p.shape)} has no {state[name].dtype} "
                    f"{name} of {state[name].numel()} values (saved with another min_8bit_size?)"
                )
            state[name].copy_(value.reshape(state[name].shape))
        step = entry.get("step", 0)
        self._steps[index] = float(step) if not isinstance(step, torch.Tensor) else step.to(self._steps)

    def _repeat_padding(self) -> None:
        """Fill each row's slots past its tensor's end with its last element, as a step leaves them: the padding
        takes part in its block's absmax and is written back, to the same place as that element."""
        rows = torch.arange(len(self._rows.tensor)) * BLOCK
        slots = _slots(rows, rows + self._rows.last - self._rows.first).to(self.device)
        rows8 = self._eight_bit_rows
        for buffer, buffer_slots in (
            (self._codes1, slots[:rows8]),
            (self._codes2, slots[:rows8]),
            (self._exp_avg, slots[rows8:] - rows8 * BLOCK),
            (self._exp_avg_sq, slots[rows8:] - rows8 * BLOCK),
        ):
            buffer.copy_(buffer.view(-1).take(buffer_slots))


def _quantize(
    values: torch.Tensor,
    bounds: torch.Tensor,
    partial: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    keep: torch.Tensor | None,
) -> None:
    """quantize_blockwise of bitsandbytes' default backend, one block a row, into ``codes`` and ``absmax``: the
    nearest code of value / absmax. ``partial``: the rows that hold a tensor's last, partial block, which that
    quantizer divides by their absmax clamped to 1e-38 and stores clamped (full blocks: multiplied by the
    reciprocal, stored unclamped)."""
    block_max = values.abs().amax(dim=1)
    clamped = block_max.clamp(min=1e-38)
    scaled = torch.where(partial[:, None], values / clamped[:, None], values * clamped.reciprocal()[:, None])
    _commit(codes, torch.bucketize(scaled.clamp_(-1, 1), bounds, out_int32=True), keep)
    _commit(absmax, torch.where(partial, clamped, block_max), keep)


def _commit(target: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None) -> None:
    target.copy_(value if keep is None else torch.where(keep, value, target))
