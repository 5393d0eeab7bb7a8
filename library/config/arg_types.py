"""Small building blocks shared by the argparse option groups.

An option is described once as an :class:`Opt` (name, help text, ``add_argument`` keywords) and the
group functions add lists of them. Adding is idempotent: an option that is already registered on the
parser is skipped, so two groups that both offer, say, ``--cache_text_encoder_outputs`` can be used
together (the first registration wins).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Iterable

# Sampler names accepted by --sample_sampler (same spelling as sd-scripts / sdxl_gen_img.py).
SAMPLER_NAMES = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
    "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)

# Learning-rate schedule names understood without --lr_scheduler_type.
LR_SCHEDULER_NAMES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor",
)

RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")

DYNAMO_BACKENDS = (
    "eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs",
    "ofi", "fx2trt", "onnxrt", "tensorrt", "ipex", "tvm",
)


@dataclass(frozen=True)
class Opt:
    """One ``--name`` option: its help text and the keywords passed to ``add_argument``."""

    name: str
    help: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def opt(name: str, help: str, **kwargs: Any) -> Opt:
    """Describe a valued option ``--name`` (``type``/``default``/``choices``/``nargs`` as in argparse)."""
    return Opt(name, help, kwargs)


def flag(name: str, help: str) -> Opt:
    """Describe an on/off switch ``--name`` (``store_true``, default False)."""
    return Opt(name, help, {"action": "store_true"})


def has_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str) -> bool:
    """True if ``--name`` is already registered on ``parser`` (or the parser owning a group)."""
    return ("--" + name) in parser._option_string_actions


def add_options(container: argparse.ArgumentParser | argparse._ArgumentGroup, opts: Iterable[Opt]) -> None:
    """Add every option of ``opts`` to ``container`` unless it is already registered.

    Raises ValueError for an option without a help text (every option must explain itself).
    """
    for o in opts:
        if not o.help or not o.help.strip():
            raise ValueError(f"option --{o.name} has no help text")
        if has_option(container, o.name):
            continue
        container.add_argument("--" + o.name, help=o.help, **o.kwargs)


def group(parser: argparse.ArgumentParser, title: str, description: str) -> argparse._ArgumentGroup:
    """Return the argument group called ``title``, creating it on first use."""
    for g in parser._action_groups:
        if g.title == title:
            return g
    return parser.add_argument_group(title, description)


def int_or_float(text: str) -> int | float:
    """Parse a step count that may be a fraction: ``"100"`` -> 100, ``"0.05"`` -> 0.05, ``"10%"`` -> 0.1.

    A value of 1 or more must be a whole number (a count of steps); below 1 it is a fraction of the
    total number of training steps. Negative values are rejected.
    """
    s = str(text).strip()
    percent = s.endswith("%")
    try:
        value = float(s[:-1]) / 100.0 if percent else float(s)
    except ValueError:
        value = float("nan")
    if percent and 0 <= value < 1:
        return value
    if value != value or value < 0 or percent:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of steps, a fraction below 1 or a percentage below 100% like 10%,"
            f" got {text!r}"
        )
    if float(value).is_integer():
        return int(value)
    if value < 1:
        return value
    raise argparse.ArgumentTypeError(f"a step count of 1 or more must be a whole number, got {text!r}")
