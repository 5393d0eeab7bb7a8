"""``--network_args`` of networks.lora: validation and the SDXL block-wise settings.

SDXL has 23 blocks for block-wise settings: 0 = time/label embedding, 1-9 input blocks,
10-12 middle block, 13-21 output blocks, 22 = out.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

from library.errors import UserError

logger = logging.getLogger(__name__)

NUM_BLOCKS = 23  # SDXL block-wise settings: 0 = time/label embed, 1-9 in, 10-12 mid, 13-21 out, 22 = out
BLOCK_LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
NETWORK_ARGS = frozenset({
    "conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "rank_dropout",
    "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
})

def _number(name: str, value: Any, kind: type = float) -> Any:
    try:
        number = float(value)
        return int(number) if kind is int else number
    except (TypeError, ValueError):
        raise UserError(f"network_args: {name}={value!r} is not a number") from None


def _numbers(name: str, value: Any, kind: type, count: int | None = NUM_BLOCKS) -> list[Any] | None:
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
    if count is not None and len(items) != count:
        raise UserError(f"network_args: {name} needs exactly {count} comma-separated values, got {len(items)}")
    return [_number(name, v, kind) for v in items]


def _lr_preset(spec: str, n: int) -> list[float]:
    """cosine (1 -> 0), sine (0 -> 1), linear (0 -> 1), reverse_linear (1 -> 0), zeros; ``+base`` adds base."""
    name, _, base_text = spec.partition("+")
    base = _number("lr weight base", base_text) if base_text else 0.0
    t = [i / (n - 1) if n > 1 else 1.0 for i in range(n)]
    shapes = {"cosine": lambda v: math.cos(math.pi / 2 * v), "sine": lambda v: math.sin(math.pi / 2 * v),
              "linear": lambda v: v, "reverse_linear": lambda v: 1.0 - v, "zeros": lambda v: 0.0}
    return [shapes[name](v) + base for v in t]


def _lr_weights(name: str, value: Any, n: int) -> list[float]:
    if value is None:
        return [1.0] * n
    if isinstance(value, str) and value.strip().partition("+")[0] in BLOCK_LR_PRESETS:
        return _lr_preset(value.strip(), n)
    weights = _numbers(name, value, float, None) or []
    if len(weights) != n:
        logger.warning("network_args %s has %d values, SDXL has %d blocks: %s", name, len(weights), n,
                       "padding with 1.0" if len(weights) < n else "ignoring the extra values")
        weights = (weights + [1.0] * n)[:n]
    return weights


def block_lr_weights(down: Any, mid: Any, up: Any, zero_threshold: Any = None) -> list[float] | None:
    """The 23 per-block LR weights from ``down_lr_weight`` (9), ``mid_lr_weight`` (3), ``up_lr_weight`` (9).

    Blocks 0 (time/label embedding) and 22 (out) stay 1.0; weights not above a positive
    ``block_lr_zero_threshold`` become 0. None when none of the three is given.
    """
    if down is None and mid is None and up is None:
        return None
    weights = [1.0] + _lr_weights("down_lr_weight", down, 9) + _lr_weights("mid_lr_weight", mid, 3)
    weights += _lr_weights("up_lr_weight", up, 9) + [1.0]
    threshold = _number("block_lr_zero_threshold", zero_threshold) if zero_threshold not in (None, "") else 0.0
    if threshold > 0:
        weights = [w if w > threshold else 0.0 for w in weights]
    return weights


def dropout_probability(name: str, value: Any) -> float | None:
    """A dropout rate in [0, 1) from a network argument (None or 0: no dropout)."""
    if value is None or value == "":
        return None
    p = _number(name, value)
    if not 0.0 <= p < 1.0:
        raise UserError(f"network_args: {name}={p} must be in [0, 1)")
    return p or None


def parse_network_args(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``--network_args`` (strings) into typed settings; an unknown name is a UserError."""
    unknown = sorted(set(kwargs) - NETWORK_ARGS)
    if unknown:
        raise UserError(f"network_args: unknown argument {', '.join(unknown)} for networks.lora "
                        f"(known: {', '.join(sorted(NETWORK_ARGS))})")
    a = {k: v for k, v in kwargs.items() if v is not None}
    out: dict[str, Any] = {}
    if "conv_dim" in a:
        out["conv_dim"] = _number("conv_dim", a["conv_dim"], int)
        out["conv_alpha"] = _number("conv_alpha", a.get("conv_alpha", 1.0))
    for key, kind in (("block_dims", int), ("block_alphas", float), ("conv_block_dims", int),
                      ("conv_block_alphas", float)):
        out[key] = _numbers(key, a.get(key), kind)
    if out["conv_block_dims"] is not None and out["conv_block_alphas"] is None:
        out["conv_block_alphas"] = [out.get("conv_alpha", 1.0)] * NUM_BLOCKS
    out["block_lr_weight"] = block_lr_weights(a.get("down_lr_weight"), a.get("mid_lr_weight"),
                                              a.get("up_lr_weight"), a.get("block_lr_zero_threshold"))
    out["rank_dropout"] = dropout_probability("rank_dropout", a.get("rank_dropout"))
    out["module_dropout"] = dropout_probability("module_dropout", a.get("module_dropout"))
    ratio = _number("loraplus_lr_ratio", a["loraplus_lr_ratio"]) if "loraplus_lr_ratio" in a else None
    for part in ("unet", "text_encoder"):
        key = f"loraplus_{part}_lr_ratio"
        out[key] = _number(key, a[key]) if key in a else ratio
    return out
