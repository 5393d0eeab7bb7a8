"""The fused backward pass (``--fused_backward_pass``): each parameter is stepped inside backward.

The full set of gradients is never held: a post-accumulate-grad hook on every trained parameter
clips its gradient, steps a one-parameter optimizer of the same class and hyperparameters as the
parameter's group, and frees the gradient.

With the batched Adafactor (``library.training.adafactor``) the whole backward, optimizer steps
included, can be replayed as a CUDA graph (:meth:`FusedBackward.use_device_scalars`): the numbers that
change from step to step (learning rate, Adafactor's decay) then live in device tensors that
:meth:`FusedBackward.before_step` fills, from the host's fp64 arithmetic, before every step, so a replay
steps with this step's values and updates as an eager step does.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from library.errors import UserError
from library.training.adafactor import Adafactor
from library.training.optim import OPTIMIZERS, _canonical_name, inner_optimizer


def optimizer_supports_fused_backward(optimizer_type: str | None) -> bool:
    """Whether stepping each parameter on its own gives the same update as a full step.

    True for element-wise optimizers (AdamW, Adafactor, Lion, SGD, the 8-bit ones, torch.optim
    classes...). False for D-Adaptation / Prodigy (their step size is estimated over all
    parameters together) and schedule-free optimizers (which need whole-model train/eval switches).
    """
    name = _canonical_name(optimizer_type)
    spec = OPTIMIZERS.get(name.lower())
    if spec is not None:
        return spec.fused_backward
    leaf = name.rsplit(".", 1)[-1].lower()
    return not (leaf.startswith(("dadapt", "prodigy")) or "schedulefree" in leaf or leaf == "lbfgs")


def check_fused_backward(
    optimizer_type: str | None,
    gradient_accumulation_steps: int = 1,
    mixed_precision: str = "no",
    option: str = "--fused_backward_pass",
) -> None:
    """Raise :class:`UserError` when ``option`` (``--fused_backward_pass`` or
    ``--fused_optimizer_groups``, which steps inside backward too) cannot work with these options."""
    if not optimizer_supports_fused_backward(optimizer_type):
        name = _canonical_name(optimizer_type)
        raise UserError(f"{option} does not work with --optimizer_type {name}")
    if gradient_accumulation_steps != 1:
        raise UserError(f"{option} needs --gradient_accumulation_steps 1")
    if mixed_precision == "fp16":
        raise UserError(f"{option} cannot unscale fp16 gradients; use --mixed_precision bf16 or no")


def clip_grad_norm_one_(grad: torch.Tensor, max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` of one gradient: the same operators (its foreach path), without
    its argument handling and grouping, which took longer on the host than the kernels (it runs once per
    tensor in the fused backward pass). No host sync: the scale is clamped on the device."""
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([grad], 2.0)), 2.0)
    torch._foreach_mul_([grad], torch.clamp(max_norm / (total + 1e-6), max=1.0))


def _default_factory(optimizer: torch.optim.Optimizer) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    """Make new optimizers of the same class with the same constructor arguments."""
    cls = type(optimizer)
    build = getattr(optimizer, "sdxl_build", None)
    if build is not None:
        return lambda groups: cls(groups, **build.constructor_kwargs)

    def factory(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        try:
            return cls(groups, **optimizer.defaults)
        except TypeError:  # defaults holding keys the constructor does not take
            return cls(groups)  # group dicts carry every hyperparameter anyway

    return factory


class FusedBackward:
    """Step each parameter from inside backward and free its gradient right away.

    For every trainable parameter of ``optimizer`` a one-parameter optimizer of the same class is
    made from the hyperparameters of the group the parameter belongs to; a
    ``register_post_accumulate_grad_hook`` then clips that gradient (``max_grad_norm`` per tensor,
    0/None: no clipping), steps it with the group's current lr, and sets ``.grad = None``.
    The per-parameter optimizers share ``optimizer.state``, so ``optimizer.state_dict()`` (and
    ``accelerate.save_state``) save and load the full state; a scheduler built on ``optimizer``
    drives every per-parameter lr. Call ``loss.backward()`` only — never ``optimizer.step()`` —
    and :meth:`remove` to detach. Gradient accumulation 1 (see :func:`check_fused_backward`).

    ``grad_reduce(param)``, when given, runs first in each hook: with several processes it averages
    ``param.grad`` over them (:func:`library.training.distributed.average_grad`), so every process
    steps with the same gradient, as DDP would give it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float | None = None,
        optimizer_factory: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None,
        grad_reduce: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self.optimizer = inner_optimizer(optimizer)
        self.grad_reduce = grad_reduce
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else None
        factory = optimizer_factory or _default_factory(self.optimizer)
        self.param_optimizers: list[torch.optim.Optimizer] = []
        self._handles: list[Any] = []
        self.factors: list[dict[str, torch.Tensor]] | None = None  # per master group (use_device_scalars)
        self._group_of: list[int] = []  # the master group of each per-parameter optimizer
        self._graph_param: torch.Tensor | None = None  # the first parameter stepped while a graph was captured
        seen: set[int] = set()
        for index, group in enumerate(self.optimizer.param_groups):
            hyper = {key: value for key, value in group.items() if key != "params"}
            for param in group["params"]:
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                sub = factory([dict(hyper, params=[param])])
                sub.state = self.optimizer.state
                self.param_optimizers.append(sub)
                self._group_of.append(index)
                self._handles.append(param.register_post_accumulate_grad_hook(self._make_hook(sub, index)))

    def _make_hook(self, sub: torch.optim.Optimizer, group_index: int) -> Callable[[torch.Tensor], None]:
        master, clip, reduce = self.optimizer, self.max_grad_norm, self.grad_reduce
        sub_group = sub.param_groups[0]
        # The batched Adafactor updates one tensor without Optimizer.step's machinery (profiling, hooks),
        # which cost more host time per tensor than the update itself; other optimizers step as usual.
        one_tensor = type(sub) is Adafactor

        def hook(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            if reduce is not None:
                reduce(param)
            if sub.state is not master.state:  # master.load_state_dict() replaced it
                sub.state = master.state
            if self.factors is None:
                sub_group["lr"] = master.param_groups[group_index]["lr"]
            if clip is not None:
                clip_grad_norm_one_(param.grad, clip)
            if self._graph_param is None and self.factors is not None and param.is_cuda \
                    and torch.cuda.is_current_stream_capturing():
                self._graph_param = param
            if one_tensor:
                with torch.no_grad():
                    sub.step_param(param, sub_group)
            else:
                sub.step()
            param.grad = None
            master._opt_called = True  # what torch's LR schedulers check to see the optimizer stepped

        return hook

    def __len__(self) -> int:
        return len(self.param_optimizers)

    # --------------------------------------------------------------------------------- CUDA graphs
    def graph_blocker(self) -> str | None:
        """Why the backward with its optimizer steps cannot be replayed as a CUDA graph, or None."""
        if self.grad_reduce is not None:
            return "the fused backward pass averages gradients across processes"
        if not all(type(sub) is Adafactor for sub in self.param_optimizers):
            return "the fused backward pass is graphed with --optimizer_type Adafactor only"
        return None

    def use_device_scalars(self, device: torch.device) -> None:
        """Step from device tensors holding each group's :meth:`Adafactor.step_factors`, which
        :meth:`before_step` fills (the master optimizer's, shared by every per-parameter one).

        The hooks' host code runs once, while a graph is captured; every replay then reads this
        step's values from the tensors. Only for optimizers that take them (:meth:`graph_blocker`).
        """
        self.optimizer.use_device_factors(device)
        self.factors = self.optimizer.device_factors
        for sub, index in zip(self.param_optimizers, self._group_of):
            sub.device_factors = [self.factors[index]]

    def before_step(self) -> None:
        """Fill the device tensors with this step's factors, computed on the host (no host sync)."""
        if self.factors is None:
            return
        self._next_step = self.optimizer.steps_taken() + 1
        self.optimizer.fill_device_factors(self._next_step)

    def after_step(self) -> None:
        """Count the step in every parameter's state (a graph replay does not run the host code that would)."""
        if self.factors is None:
            return
        self.optimizer.count_step(self._next_step)
        self.optimizer._opt_called = True

    def probe(self) -> torch.Tensor:
        """A tensor every step changes: the second-moment state of a parameter stepped inside a captured
        graph (for :class:`library.training.cuda_graphs.GraphedLoss`, which checks that a new graph did
        its work; a parameter stepped eagerly after the replay, such as a text encoder's, would not tell)."""
        graphed = self._graph_param
        states = [self.optimizer.state.get(graphed, {})] if graphed is not None else self._param_states()
        return self.optimizer.state_probe(states)

    def _param_states(self):
        """The master optimizer's state of each parameter, in hook order (empty before its first step)."""
        for sub in self.param_optimizers:
            yield self.optimizer.state.get(sub.param_groups[0]["params"][0], {})

    def state_dict(self) -> dict[str, Any]:
        """The master optimizer's state dict (it holds every parameter's state)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load into the master optimizer; the per-parameter optimizers follow it."""
        self.optimizer.load_state_dict(state)
        for sub in self.param_optimizers:
            sub.state = self.optimizer.state

    def remove(self) -> None:
        """Unregister every hook (the optimizer can then be stepped normally again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def fused_backward_step(optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None,
                        grad_reduce: Callable[[torch.Tensor], None] | None = None) -> FusedBackward:
    """Install the fused backward pass on ``optimizer`` (see :class:`FusedBackward`) and return it."""
    return FusedBackward(optimizer, max_grad_norm=max_grad_norm, grad_reduce=grad_reduce)
