"""``--fused_optimizer_groups N``: the trained parameters in N groups, each stepped during backward.

As in sd-scripts' sdxl_train.py, the parameters (in optimizer order) are cut into N consecutive
groups of about equal count; each group gets its own optimizer of the same class and
hyperparameters, and a post-accumulate-grad hook on each of its parameters counts the gradients
that are ready. When a group has all of them, its gradients are clipped together
(``--max_grad_norm`` over the group, not the whole model), the group is stepped and its
gradients are freed, so at most about one group's gradients are alive at a time. Any group whose
parameters did not all get a gradient in a backward pass is stepped right after it
(:meth:`FusedOptimizerGroups.finish`), so no update is lost.

The group optimizers share the master optimizer's ``state`` (saved states hold everything) and
take their learning rates from the master's param groups, which the LR scheduler drives. Like
``--fused_backward_pass``: one process, no gradient accumulation, no fp16 gradient scaling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from library.errors import UserError
from library.training.fused_backward import _default_factory
from library.training.optim import inner_optimizer


class _Group:
    """One optimizer over a consecutive slice of the parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], master_index: list[int]):
        self.optimizer = optimizer
        self.params = params
        self.master_index = master_index  # master param-group index of each of this optimizer's groups
        self.ready = 0


class FusedOptimizerGroups:
    """Install the group hooks on the trainable parameters of ``optimizer`` (see the module doc)."""

    def __init__(self, optimizer: torch.optim.Optimizer, num_groups: int, max_grad_norm: float | None = None,
                 optimizer_factory: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None) -> None:
        if num_groups < 1:
            raise UserError(f"--fused_optimizer_groups must be at least 1, got {num_groups}")
        self.master = inner_optimizer(optimizer)
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else None
        factory = optimizer_factory or _default_factory(self.master)
        ordered: list[tuple[int, torch.Tensor]] = []
        seen: set[int] = set()
        for index, group in enumerate(self.master.param_groups):
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    ordered.append((index, p))
        per_group = max(1, math.ceil(len(ordered) / num_groups))
        self.groups: list[_Group] = []
        self._handles: list[Any] = []
        for start in range(0, len(ordered), per_group):
            self.groups.append(self._make_group(ordered[start:start + per_group], factory))

    def _make_group(self, members: list[tuple[int, torch.Tensor]], factory: Callable) -> _Group:
        sub_groups: list[dict[str, Any]] = []
        master_index: list[int] = []
        for index, p in members:  # consecutive parameters of one master group share a sub-group
            if master_index and master_index[-1] == index:
                sub_groups[-1]["params"].append(p)
                continue
            hyper = {k: v for k, v in self.master.param_groups[index].items() if k != "params"}
            sub_groups.append(dict(hyper, params=[p]))
            master_index.append(index)
        sub = factory(sub_groups)
        sub.state = self.master.state
        group = _Group(sub, [p for _, p in members], master_index)
        for p in group.params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(group)))
        return group

    def _make_hook(self, group: _Group) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            group.ready += 1
            if group.ready == len(group.params):
                self._step(group)
        return hook

    def _step(self, group: _Group) -> None:
        """Clip the group's gradients together, step it with the master's current lrs, free them."""
        group.ready = 0
        grads = [p for p in group.params if p.grad is not None]
        if not grads:
            return
        if group.optimizer.state is not self.master.state:  # master.load_state_dict() replaced it
            group.optimizer.state = self.master.state
        for sub_group, index in zip(group.optimizer.param_groups, group.master_index):
            sub_group["lr"] = self.master.param_groups[index]["lr"]
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        group.optimizer.step()
        for p in group.params:
            p.grad = None
        self.master._opt_called = True  # what torch's LR schedulers check to see the optimizer stepped

    def finish(self) -> None:
        """Step every group left partly ready by the last backward (parameters without a gradient)."""
        for group in self.groups:
            if group.ready:
                self._step(group)

    def __len__(self) -> int:
        return len(self.groups)

    def remove(self) -> None:
        """Unregister every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def fused_optimizer_groups(optimizer: torch.optim.Optimizer, num_groups: int,
                           max_grad_norm: float | None = None) -> FusedOptimizerGroups:
    """Install ``--fused_optimizer_groups`` on ``optimizer`` (see :class:`FusedOptimizerGroups`)."""
    return FusedOptimizerGroups(optimizer, num_groups, max_grad_norm)
