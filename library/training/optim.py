"""Optimizers and learning-rate schedulers by name (``--optimizer_type``, ``--lr_scheduler``).

* :func:`build_optimizer`: case-insensitive registry of the sd-scripts names, any class path or bare
  ``torch.optim`` name. Optional packages are imported on demand; a missing one is a one-line
  :class:`UserError` with the ``pip install`` to run. Adafactor with ``relative_step=True`` (its
  default) computes its own lr (:func:`optimizer_manages_lr`): per-group lrs are dropped and
  :func:`build_lr_scheduler` switches to the ``adafactor`` schedule, as sd-scripts does.
* :func:`build_lr_scheduler`: built-in schedules are ``LambdaLR`` over module-level partials, so they
  pickle and their ``state_dict`` round-trips through ``accelerate.save_state``.
* :class:`FusedBackward`: the optimizer step inside backward, one parameter at a time.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from library.errors import UserError

logger = logging.getLogger(__name__)

ParamGroups = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

# --------------------------------------------------------------------------------------------
# key=value arguments


def parse_key_value_args(entries: Sequence[str] | None, option: str) -> dict[str, Any]:
    """Parse ``["key=value", ...]`` into a dict for ``option`` (used in error messages).

    Each value goes through ``ast.literal_eval`` (so ``0.01``, ``True``, ``0.9,0.999`` become a
    float, a bool, a tuple); a value that is not a Python literal is kept as the raw string.
    """
    result: dict[str, Any] = {}
    if isinstance(entries, str):  # a single string from a config file: "a=1 b=2"
        entries = entries.split()
    for entry in entries or ():
        if not isinstance(entry, str):
            raise UserError(f"{option}: expected key=value strings, got {entry!r}")
        key, sep, raw = entry.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key.isidentifier():
            raise UserError(
                f"{option}: malformed entry {entry!r}; write key=value, e.g. {option} weight_decay=0.01"
            )
        try:
            value: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = raw
        result[key] = value
    return result


def parse_optimizer_args(entries: Sequence[str] | None) -> dict[str, Any]:
    """Parse ``--optimizer_args`` (``["key=value", ...]``) into keyword arguments."""
    return parse_key_value_args(entries, "--optimizer_args")


def parse_scheduler_args(entries: Sequence[str] | None) -> dict[str, Any]:
    """Parse ``--lr_scheduler_args`` (``["key=value", ...]``) into keyword arguments."""
    return parse_key_value_args(entries, "--lr_scheduler_args")


# --------------------------------------------------------------------------------------------
# optimizer registry


@dataclass(frozen=True)
class OptimizerSpec:
    """One registry entry: where the class lives and what sd-scripts adds to the user's arguments."""

    name: str  # canonical spelling
    module: str
    attr: str
    pip: str  # package to install when ``module`` is missing
    defaults: dict[str, Any] = field(default_factory=dict)  # applied when the user did not set them
    forced: dict[str, Any] = field(default_factory=dict)  # always passed
    fused_backward: bool = True  # per-parameter stepping computes the same update
    adaptive: bool = False  # D-Adaptation / Prodigy: the learning rate is a multiplier (~1.0)


_BNB = "bitsandbytes.optim"
_DA = "dadaptation"
_NESTEROV = {"defaults": {"momentum": 0.9}, "forced": {"nesterov": True}}

_SPECS = (
    OptimizerSpec("AdamW", "torch.optim", "AdamW", "torch"),
    OptimizerSpec("AdamW8bit", _BNB, "AdamW8bit", "bitsandbytes"),
    OptimizerSpec("PagedAdamW", _BNB, "PagedAdamW", "bitsandbytes"),
    OptimizerSpec("PagedAdamW8bit", _BNB, "PagedAdamW8bit", "bitsandbytes"),
    OptimizerSpec("PagedAdamW32bit", _BNB, "PagedAdamW32bit", "bitsandbytes"),
    OptimizerSpec("Lion", "lion_pytorch", "Lion", "lion-pytorch"),
    OptimizerSpec("Lion8bit", _BNB, "Lion8bit", "bitsandbytes"),
    OptimizerSpec("PagedLion8bit", _BNB, "PagedLion8bit", "bitsandbytes"),
    OptimizerSpec("SGDNesterov", "torch.optim", "SGD", "torch", **_NESTEROV),
    OptimizerSpec("SGDNesterov8bit", _BNB, "SGD8bit", "bitsandbytes", **_NESTEROV),
    OptimizerSpec("RMSprop8bit", _BNB, "RMSprop8bit", "bitsandbytes"),
    OptimizerSpec("Adagrad8bit", _BNB, "Adagrad8bit", "bitsandbytes"),
    OptimizerSpec("DAdaptation", f"{_DA}.experimental", "DAdaptAdamPreprint", _DA, fused_backward=False, adaptive=True),
    OptimizerSpec("DAdaptAdam", _DA, "DAdaptAdam", _DA, fused_backward=False, adaptive=True),
    OptimizerSpec("DAdaptAdaGrad", _DA, "DAdaptAdaGrad", _DA, fused_backward=False, adaptive=True),
    OptimizerSpec("DAdaptAdan", _DA, "DAdaptAdan", _DA, fused_backward=False, adaptive=True),
    OptimizerSpec("DAdaptAdanIP", f"{_DA}.experimental", "DAdaptAdanIP", _DA, fused_backward=False, adaptive=True),
    OptimizerSpec("DAdaptLion", _DA, "DAdaptLion", _DA, fused_backward=False, adaptive=True),
    OptimizerSpec("DAdaptSGD", _DA, "DAdaptSGD", _DA, fused_backward=False, adaptive=True),
    OptimizerSpec("Prodigy", "prodigyopt", "Prodigy", "prodigyopt", fused_backward=False, adaptive=True),
    OptimizerSpec("Adafactor", "transformers.optimization", "Adafactor", "transformers"),
    OptimizerSpec("RAdamScheduleFree", "schedulefree", "RAdamScheduleFree", "schedulefree", fused_backward=False),
    OptimizerSpec("AdamWScheduleFree", "schedulefree", "AdamWScheduleFree", "schedulefree", fused_backward=False),
    OptimizerSpec("SGDScheduleFree", "schedulefree", "SGDScheduleFree", "schedulefree", fused_backward=False),
)

#: lower-case name -> spec; lookups are case-insensitive.
OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name.lower(): spec for spec in _SPECS}

_PIP_NAMES = {"lion_pytorch": "lion-pytorch"}


@dataclass
class OptimizerBuild:
    """What :func:`build_optimizer` did; kept on the optimizer as ``optimizer.sdxl_build``."""

    name: str  # the --optimizer_type as resolved (canonical spelling for registry names)
    cls: type
    constructor_kwargs: dict[str, Any]  # everything passed besides the parameter groups (lr included)
    learning_rate: float  # the --learning_rate given (Adafactor relative_step: initial lr for logs)
    manages_lr: bool  # Adafactor relative_step: the optimizer computes its own lr
    description: str


def resolve_legacy_optimizer_flags(
    optimizer_type: str | None, use_8bit_adam: bool = False, use_lion_optimizer: bool = False
) -> str:
    """Fold ``--use_8bit_adam`` / ``--use_lion_optimizer`` into an ``--optimizer_type`` name.

    Returns ``"AdamW"`` when nothing is chosen. Combining a legacy flag with another choice is an error.
    """
    chosen = (optimizer_type or "").strip()
    if use_8bit_adam and use_lion_optimizer:
        raise UserError("--use_8bit_adam and --use_lion_optimizer are both set; use --optimizer_type instead")
    legacy = "AdamW8bit" if use_8bit_adam else "Lion" if use_lion_optimizer else ""
    if legacy:
        flag = "--use_8bit_adam" if use_8bit_adam else "--use_lion_optimizer"
        if chosen:
            raise UserError(f"{flag} and --optimizer_type {chosen} are both set; keep only --optimizer_type")
        return legacy
    return chosen or "AdamW"


def _canonical_name(optimizer_type: str | None) -> str:
    return (optimizer_type or "").strip() or "AdamW"


def _import_attr(module: str, attr: str, pip: str, requested: str) -> Any:
    """Import ``module.attr``; a missing package becomes a one-line install message."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, or e.g. bitsandbytes failing to load its native library
        if isinstance(exc, ImportError) and exc.name == module.split(".")[0]:
            raise UserError(
                f"--optimizer_type {requested} needs the {pip} package, which is not installed: pip install {pip}"
            ) from None
        raise UserError(f"--optimizer_type {requested}: importing {module} failed: {exc}") from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise UserError(f"--optimizer_type {requested}: {module} has no attribute {attr}") from None


def resolve_optimizer_class(optimizer_type: str | None) -> tuple[type, OptimizerSpec | None]:
    """Find the optimizer class for ``--optimizer_type`` (registry name, class path or torch.optim name)."""
    name = _canonical_name(optimizer_type)
    spec = OPTIMIZERS.get(name.lower())
    if spec is not None:
        return _import_attr(spec.module, spec.attr, spec.pip, spec.name), spec
    if "." in name:
        module, _, attr = name.rpartition(".")
        top = module.split(".")[0]
        cls = _import_attr(module, attr, _PIP_NAMES.get(top, top), name)
        if not callable(cls):
            raise UserError(f"--optimizer_type {name}: {attr} is not an optimizer class")
        return cls, None
    matches = [n for n in dir(torch.optim) if n.lower() == name.lower()]
    cls = getattr(torch.optim, name, None) or (getattr(torch.optim, matches[0]) if matches else None)
    if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
        return cls, None
    choices = ", ".join(spec.name for spec in _SPECS)
    raise UserError(
        f"--optimizer_type {name!r} is not known; choose one of {choices}, a torch.optim class "
        f"name, or a class path such as bitsandbytes.optim.AdEMAMix8bit"
    )


def _copy_groups(param_groups: ParamGroups) -> list[Any]:
    """Materialise the parameter groups, copying group dicts so the caller's are never changed."""
    items = list(param_groups)
    if items and isinstance(items[0], dict):
        return [dict(group, params=list(group["params"])) for group in items]
    return items


def _is_adafactor(cls: type) -> bool:
    return cls.__name__ == "Adafactor" and cls.__module__.startswith(("transformers", "library.training.adafactor"))


def _prepare_adafactor(kwargs: dict[str, Any], groups: list[Any], learning_rate: float) -> tuple[float | None, bool]:
    """Apply sd-scripts' Adafactor rules; returns (lr to pass, whether Adafactor manages the lr)."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.warning("Adafactor: warmup_init=True needs relative_step=True; turning relative_step on")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        if kwargs.get("clip_threshold", 1.0) != 1.0:
            logger.warning("Adafactor: clip_threshold=1.0 is recommended")
        return learning_rate, False
    dropped = [group.pop("lr") for group in groups if isinstance(group, dict) and "lr" in group]
    if dropped:
        logger.warning("Adafactor relative_step=True: per-group learning rates are ignored")
    logger.info(
        "Adafactor relative_step=True: Adafactor computes the learning rate itself; the scheduler "
        "becomes 'adafactor' and --learning_rate %s is only the value logged before the first step",
        learning_rate,
    )
    return None, True


def _check_adaptive(name: str, groups: list[Any], learning_rate: float) -> None:
    if learning_rate <= 0.1:
        logger.warning("%s: the lr multiplies the adapted step; 1.0 is usual, got %s", name, learning_rate)
    lrs = {group.get("lr", learning_rate) for group in groups if isinstance(group, dict)}
    if len(lrs) > 1:
        logger.warning("%s: per-group learning rates differ (%s); the adapted step is shared", name, sorted(lrs))


def _description(cls: type, shown_kwargs: dict[str, Any]) -> str:
    args = ",".join(f"{key}={value}" for key, value in shown_kwargs.items())
    return f"{cls.__module__}.{cls.__name__}({args})"


def build_optimizer(
    optimizer_type: str | None,
    param_groups: ParamGroups,
    learning_rate: float,
    optimizer_args: dict[str, Any] | None = None,
) -> tuple[torch.optim.Optimizer, str]:
    """Build the optimizer named by ``--optimizer_type``.

    ``param_groups`` is a list of tensors or of ``{"params": [...], "lr": ...}`` dicts (not
    modified). ``optimizer_args`` comes from :func:`parse_optimizer_args`. Returns the optimizer and
    a description for metadata, e.g. ``transformers.optimization.Adafactor(relative_step=False)``.
    The optimizer carries an :class:`OptimizerBuild` as ``optimizer.sdxl_build``.
    """
    name = _canonical_name(optimizer_type)
    cls, spec = resolve_optimizer_class(name)
    kwargs = dict(optimizer_args or {})
    if "lr" in kwargs:
        raise UserError("--optimizer_args: set the learning rate with --learning_rate, not lr=")
    groups = _copy_groups(param_groups)
    if spec is not None:
        name = spec.name
        for key, value in spec.defaults.items():
            kwargs.setdefault(key, value)
    lr: float | None = learning_rate
    manages_lr = False
    if _is_adafactor(cls):
        lr, manages_lr = _prepare_adafactor(kwargs, groups, learning_rate)
    elif spec is not None and spec.adaptive:
        _check_adaptive(name, groups, learning_rate)
    constructor_kwargs = {**kwargs, **(spec.forced if spec else {}), "lr": lr}
    if cls is torch.optim.AdamW and "fused" not in kwargs and "foreach" not in kwargs and _all_cuda_float(groups):
        constructor_kwargs["fused"] = True  # one fused kernel per step instead of a per-tensor loop
    description = _description(cls, kwargs)
    if _is_adafactor(cls) and constructor_kwargs.pop("foreach", True):
        from library.training.adafactor import Adafactor  # same update, batched over tensors

        cls = Adafactor
    try:
        optimizer = cls(groups, **constructor_kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"--optimizer_args: {name} rejected {kwargs or 'its arguments'}: {exc}") from None
    optimizer.sdxl_build = OptimizerBuild(name, cls, constructor_kwargs, learning_rate, manages_lr, description)
    return optimizer, description


def _all_cuda_float(groups: list[Any]) -> bool:
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under wrappers such as accelerate's ``AcceleratedOptimizer`` (itself an
    ``Optimizer`` subclass, holding the real one as ``.optimizer``)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_manages_lr(optimizer: Any) -> bool:
    """True when the optimizer computes its own learning rate (Adafactor with ``relative_step``)."""
    opt = inner_optimizer(optimizer)
    return _is_adafactor(type(opt)) and bool(opt.defaults.get("relative_step", False))


def is_schedule_free(optimizer: Any) -> bool:
    """True for schedule-free optimizers, which must be put in train()/eval() mode around use."""
    return type(inner_optimizer(optimizer)).__name__.lower().endswith("schedulefree")


# --------------------------------------------------------------------------------------------
# learning-rate schedulers

SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor",
)


def resolve_warmup_steps(
    value: int | float | str | None, max_train_steps: int, option: str = "--lr_warmup_steps"
) -> int:
    """Turn ``--lr_warmup_steps`` (or ``--lr_decay_steps``) into a step count.

    Accepts an int (steps), a float < 1 (a ratio of ``max_train_steps``), or a string: ``"N%"``
    (percent of ``max_train_steps``) or a number as above. ``None`` means 0.
    """
    if value is None:
        return 0
    original, hint = value, "give a step count, a ratio below 1 or a percentage like 10%"
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.endswith("%"):
                percent = float(text[:-1])
                if not 0 <= percent <= 100:
                    raise ValueError
                return int(percent / 100.0 * max_train_steps)
            value = float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise UserError(f"{option} {original!r}: {hint}") from None
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
    if bad or (isinstance(value, float) and value >= 1 and not value.is_integer()):
        raise UserError(f"{option} {original!r}: {hint}")
    return int(value * max_train_steps) if isinstance(value, float) and value < 1 else int(value)


def _constant_factor(step: int, *, value: float = 1.0) -> float:
    return value


def _piecewise_factor(step: int, *, boundaries: tuple[int, ...], values: tuple[float, ...], last: float) -> float:
    for boundary, value in zip(boundaries, values):
        if step < boundary:
            return value
    return last


def _piecewise_constant(optimizer: torch.optim.Optimizer, step_rules: str, last_epoch: int = -1) -> LambdaLR:
    """``step_rules="1:10,0.1:20,0.01"``: factor 1 before step 10, 0.1 before step 20, then 0.01."""
    rules: dict[int, float] = {}
    try:
        *pairs, last = str(step_rules).split(",")
        for pair in pairs:
            factor, step = pair.split(":")
            rules[int(step)] = float(factor)
        last_factor = float(last)
    except ValueError:
        raise UserError(
            f"--lr_scheduler_args step_rules={step_rules!r}: write factor:step pairs and a final factor, "
            f"e.g. step_rules=\"1:10,0.1:20,0.01\""
        ) from None
    bounds = tuple(sorted(rules))
    fn = partial(_piecewise_factor, boundaries=bounds, values=tuple(rules[b] for b in bounds), last=last_factor)
    return LambdaLR(optimizer, fn, last_epoch=last_epoch)


def _adafactor_schedule(optimizer: torch.optim.Optimizer, initial_lr: float) -> LambdaLR:
    """transformers' AdafactorSchedule with a picklable lambda (its own is a closure)."""
    from transformers.optimization import AdafactorSchedule

    scheduler = AdafactorSchedule(optimizer, initial_lr)
    scheduler.lr_lambdas = [partial(_constant_factor, value=initial_lr) for _ in optimizer.param_groups]
    return scheduler


def _custom_scheduler(path: str, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any], warmup: int) -> Any:
    if warmup:
        raise UserError(
            f"--lr_scheduler_type {path} does not use --lr_warmup_steps; set it to 0 "
            "(pass warmup through --lr_scheduler_args if the class supports it)"
        )
    if "." in path:
        module, _, attr = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"--lr_scheduler_type {path}: cannot import it ({exc})") from None
    else:
        cls = getattr(torch.optim.lr_scheduler, path, None)
        if cls is None:
            raise UserError(f"--lr_scheduler_type {path}: not in torch.optim.lr_scheduler; give a class path")
    try:
        return cls(optimizer, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"--lr_scheduler_args: {path} rejected {kwargs}: {exc}") from None


def _adafactor_branch(name: str, optimizer: torch.optim.Optimizer, warmup: int) -> LambdaLR:
    if not _is_adafactor(type(optimizer)):
        raise UserError("--lr_scheduler adafactor needs --optimizer_type Adafactor")
    _, _, value = name.partition(":")
    build = getattr(optimizer, "sdxl_build", None)
    try:
        initial_lr = float(value) if value else float(build.learning_rate if build else 0.0)
    except ValueError:
        raise UserError(f"--lr_scheduler {name}: write adafactor or adafactor:<initial lr>") from None
    if warmup:
        logger.warning("Adafactor manages the learning rate; --lr_warmup_steps is ignored (use warmup_init=True)")
    return _adafactor_schedule(optimizer, initial_lr)


def _builtin_scheduler(
    name: str, optimizer: torch.optim.Optimizer, total: int, warmup: int, decay: int,
    num_cycles: float, power: float, timescale: int | None, min_lr_ratio: float | None, kwargs: dict[str, Any],
) -> LambdaLR:
    """Dispatch to transformers' schedule functions (module-level partials: picklable)."""
    import transformers.optimization as tf

    if name == "constant":
        if warmup:
            raise UserError("--lr_scheduler constant has no warmup; use constant_with_warmup or --lr_warmup_steps 0")
        return tf.get_constant_schedule(optimizer, **kwargs)
    common = {"num_warmup_steps": warmup}
    if name == "constant_with_warmup":
        return tf.get_constant_schedule_with_warmup(optimizer, **common, **kwargs)
    if name == "inverse_sqrt":
        return tf.get_inverse_sqrt_schedule(optimizer, **common, timescale=timescale, **kwargs)
    common["num_training_steps"] = total
    if name == "linear":
        return tf.get_linear_schedule_with_warmup(optimizer, **common, **kwargs)
    if name == "cosine":
        return tf.get_cosine_schedule_with_warmup(optimizer, **common, **kwargs)
    if name == "cosine_with_restarts":
        fn = tf.get_cosine_with_hard_restarts_schedule_with_warmup
        return fn(optimizer, **common, num_cycles=num_cycles, **kwargs)
    if name == "polynomial":
        if not optimizer.defaults.get("lr"):
            raise UserError("--lr_scheduler polynomial needs a learning rate on the optimizer")
        return tf.get_polynomial_decay_schedule_with_warmup(optimizer, **common, power=power, **kwargs)
    if name == "cosine_with_min_lr":
        if min_lr_ratio is not None and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
            kwargs = {**kwargs, "min_lr_rate": min_lr_ratio}
        if "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
            raise UserError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio")
        return tf.get_cosine_with_min_lr_schedule_with_warmup(optimizer, **common, num_cycles=num_cycles / 2, **kwargs)
    if name == "warmup_stable_decay":
        stable = total - warmup - decay
        if stable < 0:
            raise UserError(
                f"--lr_scheduler warmup_stable_decay: warmup ({warmup}) + decay ({decay}) steps exceed the "
                f"{total} training steps; lower --lr_warmup_steps or --lr_decay_steps"
            )
        kwargs = {"min_lr_ratio": min_lr_ratio or 0.0, **kwargs}
        return tf.get_wsd_schedule(
            optimizer, num_warmup_steps=warmup, num_decay_steps=decay, num_stable_steps=stable,
            num_cycles=num_cycles / 2, **kwargs,
        )
    raise UserError(f"--lr_scheduler {name!r} is not known; choose one of {', '.join(SCHEDULERS)}")


def build_lr_scheduler(
    name: str | None,
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    num_warmup_steps: int | float | str | None = 0,
    num_cycles: float = 1,
    power: float = 1.0,
    scheduler_args: dict[str, Any] | None = None,
    scheduler_type: str | None = None,
    *,
    num_decay_steps: int | float | str | None = 0,
    timescale: int | None = None,
    min_lr_ratio: float | None = None,
) -> Any:
    """Build the ``--lr_scheduler`` schedule (or the ``--lr_scheduler_type`` class) for ``optimizer``.

    ``num_training_steps`` is the schedule length (``max_train_steps * num_processes`` in
    sd-scripts). Warmup/decay accept anything :func:`resolve_warmup_steps` does. ``scheduler_args``
    (``--lr_scheduler_args``) are passed on as keyword arguments, e.g. ``step_rules`` for
    ``piecewise_constant`` or ``lr_end`` for ``polynomial``. ``adafactor`` (or ``adafactor:<lr>``)
    is used automatically when the optimizer manages its own lr; schedule-free optimizers get a
    constant schedule.
    """
    kwargs = dict(scheduler_args or {})
    warmup = resolve_warmup_steps(num_warmup_steps, num_training_steps)
    decay = resolve_warmup_steps(num_decay_steps, num_training_steps, option="--lr_decay_steps")
    if scheduler_type:
        return _custom_scheduler(scheduler_type.strip(), optimizer, kwargs, warmup)
    opt = inner_optimizer(optimizer)
    sched = (name or "constant").strip().lower()
    if is_schedule_free(opt):
        if sched != "constant" or warmup:
            logger.warning("schedule-free optimizer: --lr_scheduler and --lr_warmup_steps are ignored "
                           "(set warmup_steps in --optimizer_args)")
        return LambdaLR(opt, partial(_constant_factor, value=1.0))
    if optimizer_manages_lr(opt) and not sched.startswith("adafactor"):
        logger.info("Adafactor relative_step=True: using the adafactor scheduler instead of %s", sched)
        sched = "adafactor"
    if sched.startswith("adafactor"):
        return _adafactor_branch(sched, opt, warmup)
    if sched == "piecewise_constant":
        if "step_rules" not in kwargs:
            raise UserError('--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules="1:10,0.1:20,0.01"')
        return _piecewise_constant(opt, **kwargs)
    try:
        return _builtin_scheduler(
            sched, opt, num_training_steps, warmup, decay, num_cycles, power, timescale, min_lr_ratio, kwargs
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"--lr_scheduler {sched}: {exc} (check --lr_scheduler_args)") from None
