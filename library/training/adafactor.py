"""Adafactor with the update of ``transformers.optimization.Adafactor``, computed over many tensors at once.

transformers' Adafactor steps its parameters one by one: about 25 small kernels per tensor, so a
LoRA network of 1,444 tensors (or a U-Net of 1,680) costs tens of thousands of kernel launches per
step and the GPU waits on the host. Here parameters of one shape, dtype and step count are stacked
into one batch (in chunks of at most :data:`CHUNK_ELEMENTS` elements, so memory stays bounded) and
updated with the same arithmetic in the same order: a few dozen launches per shape instead of per
tensor. Large tensors, whose kernels already fill the GPU, are updated in place on their own.

Everything transformers' Adafactor accepts is accepted with the same meaning (``lr``, ``eps``,
``clip_threshold``, ``decay_rate``, ``beta1``, ``weight_decay``, ``scale_parameter``,
``relative_step``, ``warmup_init``), and the per-parameter state has the same keys, shapes and
dtypes (``step``, ``exp_avg_sq_row``/``exp_avg_sq_col`` or ``exp_avg_sq``, ``exp_avg``, ``RMS``), so
a state saved by either optimizer resumes in the other.

Inside a CUDA graph (the optimizer step replayed by ``library.training.cuda_graphs``, with the
backward or inside it) nothing that changes from step to step may be a host number:
:meth:`Adafactor.use_device_factors` gives each group 0-dim device tensors, and
:meth:`Adafactor.fill_device_factors` writes this step's :meth:`Adafactor.step_factors` into them
before every step (the relative step size, ``beta2t`` and ``1 - beta2t``, computed on the host in
fp64 as always). The update reads them where it would read the host numbers, with operators that
round the same way (``addcmul_`` for ``add_(alpha=)``), so a replayed update equals the eager one;
only weight decay differs by a rounding. A replay runs no Python, so :meth:`Adafactor.count_step`
sets the host-side ``state["step"]`` after each.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

CHUNK_ELEMENTS = 1 << 22  # stack at most 4M elements (16 MB in fp32) per batch
_HALF = (torch.float16, torch.bfloat16)


class Adafactor(torch.optim.Optimizer):
    """transformers' Adafactor (same defaults, same arguments, same state), batched over tensors."""

    def __init__(self, params: Iterable[Any], lr: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False):
        if lr is not None and relative_step:
            raise ValueError("Cannot combine manual `lr` and `relative_step=True` options")
        if warmup_init and not relative_step:
            raise ValueError("`warmup_init=True` requires `relative_step=True`")
        defaults = {"lr": lr, "eps": eps, "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                    "beta1": beta1, "weight_decay": weight_decay, "scale_parameter": scale_parameter,
                    "relative_step": relative_step, "warmup_init": warmup_init}
        super().__init__(params, defaults)
        #: per group, this step's :meth:`step_factors` as 0-dim device tensors (CUDA graphs), or None: host numbers
        self.device_factors: list[dict[str, torch.Tensor]] | None = None

    @staticmethod
    def _rel_step(group: dict, step: int) -> float:
        rel = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            rel = min(min_step, 1.0 / math.sqrt(step))
        return rel

    @staticmethod
    def step_factors(group: dict, step: int) -> dict[str, float]:
        """The numbers of step ``step`` that do not depend on the tensors: the relative step size (the lr
        without parameter scaling) and the second-moment decay ``beta2t`` with its complement."""
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        return {"rel": Adafactor._rel_step(group, step), "beta2t": beta2t, "one_minus_beta2t": 1.0 - beta2t}

    def use_device_factors(self, device: torch.device) -> None:
        """Read the step factors from device tensors (one set per group) from now on."""
        self.device_factors = [{name: torch.zeros((), dtype=torch.float32, device=device)
                                for name in ("rel", "beta2t", "one_minus_beta2t")} for _ in self.param_groups]

    def fill_device_factors(self, step: int) -> None:
        """Write step ``step``'s factors of every group into the device tensors (``fill_``: no host sync)."""
        for tensors, group in zip(self.device_factors or (), self.param_groups):
            for name, value in self.step_factors(group, step).items():
                tensors[name].fill_(value)

    def steps_taken(self) -> int:
        """The step count of the parameters' states: the highest (a parameter that never had a gradient has none)."""
        return max((int(state["step"]) for state in self.state.values() if "step" in state), default=0)

    def count_step(self, step: int) -> None:
        """Set every existing state's step count (after a graph replay, which ran no host code)."""
        for state in self.state.values():
            if state:
                state["step"] = step

    def state_probe(self, states: Iterable[dict] | None = None) -> torch.Tensor:
        """A second-moment tensor of the first of ``states`` (default: all) that has one: every step
        changes it (what :class:`library.training.cuda_graphs.GraphedLoss` checks after a new graph's
        first replay); a 0-dim zero before the first step."""
        for state in self.state.values() if states is None else states:
            for key in ("exp_avg_sq_row", "exp_avg_sq"):
                if torch.is_tensor(state.get(key)):
                    return state[key]
        return torch.zeros(())

    @staticmethod
    def _get_lr(param_group: dict, param_state: dict):
        """The lr of one parameter as transformers computes it (read by ``AdafactorSchedule``)."""
        rel = Adafactor._rel_step(param_group, param_state["step"]) if param_group["relative_step"] \
            else param_group["lr"]
        scale = max(param_group["eps"][1], param_state["RMS"]) if param_group["scale_parameter"] else 1.0
        return scale * rel

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if len(state) == 0:
            shape = p.shape
            state["step"] = 0
            if group["beta1"] is not None:
                state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            if len(shape) >= 2:
                state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=torch.float32, device=p.device)
                state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=torch.float32, device=p.device)
            else:
                state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            state["RMS"] = 0
        else:  # a loaded state: on the parameter's device, in fp32 (as transformers' .to(grad))
            for key in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(device=p.device, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One optimisation step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            batches: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients.")
                state = self._init_state(p, group)
                key = (tuple(p.shape), p.dtype, p.grad.dtype, p.device, state["step"])
                batches.setdefault(key, []).append(p)
            factors = self.device_factors[index] if self.device_factors is not None else None
            for params in batches.values():
                per_chunk = max(1, CHUNK_ELEMENTS // max(params[0].numel(), 1))
                for i in range(0, len(params), per_chunk):
                    self._update(group, params[i:i + per_chunk], factors)
        return loss

    def step_param(self, p: torch.Tensor, group: dict) -> None:
        """Update one parameter of ``group`` from its gradient: :meth:`step` for one tensor, without
        ``Optimizer.step``'s wrapper (profiling, hooks). For the fused backward pass, which steps each
        tensor from its gradient hook; call it under ``torch.no_grad()``."""
        if p.grad.is_sparse:
            raise RuntimeError("Adafactor does not support sparse gradients.")
        self._init_state(p, group)
        index = next(i for i, g in enumerate(self.param_groups) if g is group)
        self._update(group, [p], self.device_factors[index] if self.device_factors is not None else None)

    def _stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One batch of same-shape tensors: a view of the tensor itself when there is only one."""
        return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)

    def _update(self, group: dict, params: list[torch.Tensor], device_factors: dict | None = None) -> None:
        """The Adafactor update of ``params`` (same shape, dtype and step), as one batch; the step
        factors from ``device_factors`` when given, else computed here."""
        states = [self.state[p] for p in params]
        n, shape = len(params), params[0].shape
        single = n == 1
        bcast = (n,) + (1,) * len(shape)  # one scalar per tensor, broadcast over its elements
        numel_sqrt = params[0].numel() ** 0.5
        grad = self._stack([p.grad for p in params])
        if grad.dtype in _HALF:
            grad = grad.float()
        half = params[0].dtype in _HALF
        p32 = self._stack(params)
        if half:
            p32 = p32.float()  # a copy; a single fp32 tensor is updated in place, a stack is a copy already
        step = states[0]["step"] + 1
        for state in states:
            state["step"] = step
        factors = device_factors or self.step_factors(group, step)
        rel, beta2t, one_minus = factors["rel"], factors["beta2t"], factors["one_minus_beta2t"]
        lr: float | torch.Tensor = rel
        if group["scale_parameter"]:
            rms = p32.flatten(1).norm(2, dim=1) / numel_sqrt
            _store_rms(states, rms)
            lr = rms.clamp(min=group["eps"][1]).mul_(rel).view(bcast)
        update = (grad ** 2) + group["eps"][0]
        if len(shape) >= 2:
            row = self._stack([s["exp_avg_sq_row"] for s in states])
            col = self._stack([s["exp_avg_sq_col"] for s in states])
            _decay_(row, beta2t, one_minus, update.mean(dim=-1))
            _decay_(col, beta2t, one_minus, update.mean(dim=-2))
            if not single:
                torch._foreach_copy_([s["exp_avg_sq_row"] for s in states], list(row.unbind(0)))
                torch._foreach_copy_([s["exp_avg_sq_col"] for s in states], list(col.unbind(0)))
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = torch.mul(r_factor, col.unsqueeze(-2).rsqrt())
            update.mul_(grad)
        else:
            sq = self._stack([s["exp_avg_sq"] for s in states])
            _decay_(sq, beta2t, one_minus, update)
            if not single:
                torch._foreach_copy_([s["exp_avg_sq"] for s in states], list(sq.unbind(0)))
            update = sq.rsqrt().mul_(grad)
        update_rms = update.flatten(1).norm(2, dim=1) / numel_sqrt
        update.div_((update_rms / group["clip_threshold"]).clamp_(min=1.0).view(bcast))
        update.mul_(lr)
        if group["beta1"] is not None:
            avg = self._stack([s["exp_avg"] for s in states])
            avg.mul_(group["beta1"]).add_(update, alpha=(1 - group["beta1"]))
            if not single:
                torch._foreach_copy_([s["exp_avg"] for s in states], list(avg.unbind(0)))
            update = avg
        if group["weight_decay"] != 0:
            if torch.is_tensor(lr):
                p32.add_(p32 * (-group["weight_decay"] * lr))
            else:
                p32.add_(p32, alpha=(-group["weight_decay"] * lr))
        p32.add_(-update)
        if half or not single:
            torch._foreach_copy_(params, list(p32.unbind(0)))


def _store_rms(states: list[dict], rms: torch.Tensor) -> None:
    """Each state's ``"RMS"``: its own 0-dim tensor, written in place once it exists.

    In place, so that a CUDA graph that replays this update writes the tensor the state holds (a
    tensor assigned while capturing would be graph memory that the next replay of another graph
    reuses); made on the first update, or when a loaded state holds a number or another dtype.
    """
    held = [state.get("RMS") for state in states]
    if all(torch.is_tensor(t) and t.dim() == 0 and t.dtype == rms.dtype and t.device == rms.device for t in held):
        torch._foreach_copy_(held, list(rms.unbind(0)))
    else:
        for state, value in zip(states, rms.unbind(0)):
            state["RMS"] = value.clone()


def _decay_(avg: torch.Tensor, beta: float | torch.Tensor, one_minus_beta: float | torch.Tensor,
            value: torch.Tensor) -> None:
    """``avg = beta * avg + (1 - beta) * value`` in place, as transformers computes it; the factors are
    host numbers or 0-dim device tensors (``addcmul_`` rounds as ``add_(alpha=)`` does)."""
    avg.mul_(beta)
    if torch.is_tensor(one_minus_beta):
        avg.addcmul_(value, one_minus_beta)
    else:
        avg.add_(value, alpha=one_minus_beta)
