"""``--cpu_offload_checkpointing``: gradient checkpointing whose saved block inputs live in CPU memory.

Plain gradient checkpointing keeps the input of every checkpointed block on the GPU until the
backward pass recomputes the block. With this option the U-Net's blocks are checkpointed through
:func:`offloaded_checkpoint`, which moves each block's tensor inputs to the CPU before
checkpointing and back to the compute device inside the recomputed function, so only the CPU copy
is held between forward and backward (sd-scripts does the same for its U-Net/DiT blocks). The
result (loss and gradients) is the same as plain checkpointing; it costs two copies per block.
It applies to the U-Net (as in sd-scripts); text encoders keep plain checkpointing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint

OFFLOAD_DEVICE = torch.device("cpu")


def _move(values: tuple, device: torch.device | None, non_blocking: bool = False) -> tuple:
    if device is None:
        return values
    return tuple(v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v for v in values)


def offloaded_checkpoint(module: Any, *args: Any) -> Any:
    """diffusers' checkpointing hook (``module``, inputs) with the inputs kept on the CPU."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    pin = device is not None and device.type == "cuda"
    stored = _move(args, OFFLOAD_DEVICE, non_blocking=pin)

    def run(*cpu_args: Any) -> Any:
        return module(*_move(cpu_args, device, non_blocking=pin))

    return torch.utils.checkpoint.checkpoint(run, *stored, use_reentrant=False)


def enable_cpu_offload_checkpointing(unet: torch.nn.Module) -> None:
    """Checkpoint ``unet`` (a diffusers model, possibly compiled) with :func:`offloaded_checkpoint`."""
    inner = getattr(unet, "_orig_mod", unet)
    inner = getattr(inner, "module", inner)  # DDP / accelerate wrappers
    inner.enable_gradient_checkpointing(gradient_checkpointing_func=offloaded_checkpoint)
