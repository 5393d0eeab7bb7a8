"""Frozen weights stored in float8 (``--fp8_base``): each Linear/Conv2d upcasts its weight when called.

The weights take one byte per value instead of two; the layers still compute in the run's bf16/fp16.
Upcasting inside the layer (rather than leaving the fp8 weights to autocast) lets the model run as a
bf16-stored one does, without autocast: its normalisations then keep their activations in bf16/fp16
instead of the fp32 copies autocast makes around them. float8 values are exact in bf16, fp16 and
fp32, so the upcast itself rounds nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear/Conv computes ``x`` in: autocast's where it is on, else ``x``'s own.

    Under autocast the activations reaching a layer are often fp32 (normalisations run in fp32) while the
    matmul runs in bf16/fp16: an fp8 weight upcast to fp32 first would be a 4-byte copy of the weight that
    autocast then casts again.
    """
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _upcast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` whose stored weight may be float8; it computes in :func:`compute_dtype`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        return F.linear(x, self.weight.to(dtype), _upcast(self.bias, dtype))


class Fp8Conv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose stored weight may be float8; it computes in :func:`compute_dtype`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        return self._conv_forward(x, self.weight.to(dtype), _upcast(self.bias, dtype))


_UPCASTING = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d}


def store_in_fp8(model: nn.Module) -> int:
    """Store the weights of ``model``'s Linear and Conv2d layers as float8_e4m3fn; each such layer
    becomes its upcasting subclass (same parameters, same state-dict keys). Returns how many.

    Layers of other classes (subclasses with their own forward) get no upcasting forward and are left
    as they are; :func:`needs_autocast` then says the model still needs autocast.
    """
    count = 0
    for module in model.modules():
        upcasting = _UPCASTING.get(type(module))
        if upcasting is not None:
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
            module.__class__ = upcasting
            count += 1
    return count


def needs_autocast(model: nn.Module, compute: torch.dtype) -> bool:
    """Whether ``model`` holds a parameter in another dtype than ``compute`` that no layer upcasts itself."""
    for module in model.modules():
        upcasts = isinstance(module, (Fp8Linear, Fp8Conv2d))
        for name, p in module.named_parameters(recurse=False):
            if p.dtype != compute and not (upcasts and name == "weight" and p.dtype in FP8_DTYPES):
                return True
    return False
