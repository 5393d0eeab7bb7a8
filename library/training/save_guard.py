"""Never write (or rotate in) a save whose trained weights are broken.

A diverging run can hold NaN, inf or exploded weights long before the logged loss shows it (the
loss is read every ``--log_every_n_steps``). Before every save the loop checks the tensors the
optimizer updates, whatever the method (LoRA, full fine-tune, textual inversion, LLLite): all of
them must be finite and below :data:`MAX_ABS_WEIGHT` in magnitude. One reduction per tensor on
the device and a single host read per save; under several processes every process checks its own
(possibly sharded) tensors and the verdict is shared, so all stop together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from library.errors import UserError

MAX_ABS_WEIGHT = 1e20  # a trained weight beyond this is an exploded run, not a model


def largest_weight(params: Iterable[torch.Tensor]) -> float:
    """The largest |w| over ``params`` (NaN if any weight is NaN); one host read."""
    peaks = [p.detach().abs().amax().float() for p in params if p.numel()]
    if not peaks:
        return 0.0
    devices = {t.device for t in peaks}
    if len(devices) > 1:
        peaks = [t.cpu() for t in peaks]
    return float(torch.stack(peaks).amax().item())  # amax propagates NaN


def weights_are_sound(params: Iterable[torch.Tensor], accelerator=None) -> bool:
    """True when every trained weight is finite and at most :data:`MAX_ABS_WEIGHT` in magnitude
    (agreed over all processes when ``accelerator`` runs several)."""
    peak = largest_weight(params)
    bad = not (peak <= MAX_ABS_WEIGHT)  # NaN compares False
    if accelerator is not None and accelerator.num_processes > 1:
        flag = torch.tensor([1.0 if bad else 0.0], device=accelerator.device)
        bad = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
    return not bad


def broken_weights_error(step: int, last_good: Path | None, cause: str | None = None) -> UserError:
    """The one-line message when a run stops: what happened and which file is the last good save."""
    cause = cause or f"the trained weights became NaN/inf or exploded (|w| > {MAX_ABS_WEIGHT:g})"
    kept = (f"the last good save is {last_good}" if last_good is not None
            else "this run had written no save yet")
    return UserError(f"{cause} by step {step}; training stopped without writing or rotating saves and {kept} "
                     "(try a lower learning rate, --max_grad_norm, --no_half_vae or bf16)")
