"""Mixed-precision checks and fixes the accelerate object needs for fp16 training.

fp16 training runs through accelerate's GradScaler: the loss is scaled before backward, gradients
are unscaled before clipping and the optimizer step is skipped when they overflow. The trained
weights stay float32 (master weights) unless ``--full_fp16``; then the weights and gradients are
fp16 themselves, which torch's GradScaler refuses to unscale, so :func:`allow_fp16_gradients`
lets it (as sd-scripts does for ``--full_fp16``).
"""

from __future__ import annotations

import types
from typing import Any

from library.errors import UserError

#: Devices where accelerate runs fp16 with autocast and a GradScaler.
FP16_DEVICES = ("cuda", "xpu", "npu", "mlu", "musa", "hpu", "sdaa", "mps", "xla")


def check_mixed_precision_device(mixed_precision: str, device_type: str) -> None:
    """Raise UserError when ``mixed_precision`` cannot run on ``device_type``.

    accelerate turns fp16 off on the CPU without saying so (no autocast, no GradScaler) while the
    frozen models are still cast to fp16, so training would fail deep inside the U-Net.
    """
    if mixed_precision == "fp16" and device_type not in FP16_DEVICES:
        raise UserError(f"--mixed_precision fp16 needs a GPU, but training runs on the {device_type.upper()} "
                        "(no CUDA device found); use --mixed_precision bf16 or no on this machine")


def allow_fp16_gradients(accelerator: Any) -> bool:
    """Let the accelerator's GradScaler unscale fp16 gradients (``--full_fp16``); True if patched.

    torch's GradScaler raises "Attempting to unscale FP16 gradients" for fp16 parameters; with
    ``--full_fp16`` that is what the parameters are, so its check is switched off for this scaler.
    """
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or getattr(scaler, "_sdxl_trainer_allows_fp16", False):
        return False
    unscale = scaler._unscale_grads_

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = types.MethodType(_unscale_grads_, scaler)
    scaler._sdxl_trainer_allows_fp16 = True
    return True
