"""Deep Shrink (sd-scripts' ``--ds_depth_1 --ds_timesteps_1 --ds_depth_2 --ds_timesteps_2 --ds_ratio``).

While the timestep is high, the U-Net's hidden state is shrunk (bicubic, by ``ratio``) just before
one of its input blocks, so the deep blocks see a smaller image (fewer repeated subjects at large
sizes); on the way up, the hidden state is resized back (bicubic) to the size of each skip
connection it is concatenated with, and to the input size before the output layers.

The depth counts sd-scripts' input blocks of the SAI U-Net layout: 0 is the input convolution, then
for each level its layers (resnet, with its attention) and its downsampler; for SDXL
1, 2 = level-0 resnets, 3 = the first downsampler, 4, 5 = level-1 layers, 6 = the second
downsampler, 7, 8 = level-2 layers. On diffusers' ``UNet2DConditionModel`` the same points are the
inputs of ``conv_in``, ``down_blocks[i].resnets[j]`` and ``down_blocks[i].downsamplers[0]``;
:class:`DeepShrink` works through forward hooks on those modules (no copy of the U-Net's forward),
so LoRA and ControlNet-LLLite hooks inside the blocks keep working.

Window (as sd-scripts): depth 1 is shrunk while ``t >= timesteps_1``; depth 2 while
``timesteps_2 <= t < timesteps_1``. Outside the window, or with ratio 1.0, the U-Net is untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from library.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeepShrinkSettings:
    """One Deep Shrink configuration; ``depth_2=None`` switches the second window off."""

    depth_1: int
    timesteps_1: int = 650
    depth_2: Optional[int] = None
    timesteps_2: int = 650
    ratio: float = 0.5

    def depth_at(self, timestep: float) -> Optional[int]:
        """The input-block depth shrunk at ``timestep``, or ``None`` outside both windows."""
        if timestep >= self.timesteps_1:
            return self.depth_1
        if self.depth_2 is not None and self.timesteps_2 <= timestep < self.timesteps_1:
            return self.depth_2
        return None


def deep_shrink_settings(depth_1: Optional[int], timesteps_1: Optional[int], depth_2: Optional[int],
                         timesteps_2: Optional[int], ratio: Optional[float]) -> Optional[DeepShrinkSettings]:
    """Settings from the option values (``None`` when ``depth_1`` is not given); checks the ranges."""
    if depth_1 is None:
        return None
    for name, depth in (("ds_depth_1", depth_1), ("ds_depth_2", depth_2)):
        if depth is not None and not 0 <= depth <= 8:
            raise UserError(f"--{name} {depth}: Deep Shrink depth must be 0..8 (an input block of the U-Net)")
    ratio = 0.5 if ratio is None else float(ratio)
    if not 0.0 < ratio <= 1.0:
        raise UserError(f"--ds_ratio {ratio}: must be in (0, 1]")
    return DeepShrinkSettings(int(depth_1), 650 if timesteps_1 is None else int(timesteps_1),
                              None if depth_2 is None else int(depth_2),
                              650 if timesteps_2 is None else int(timesteps_2), ratio)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bicubic resize (computed in fp32) back to ``x``'s dtype."""
    return F.interpolate(x.float(), size=tuple(size), mode="bicubic", align_corners=False).to(x.dtype)


def _shrink(x: torch.Tensor, ratio: float) -> torch.Tensor:
    return F.interpolate(x.float(), scale_factor=ratio, mode="bicubic", align_corners=False).to(x.dtype)


def _replace_first(output: Any, fn) -> Any:
    """Apply ``fn`` to a module output: a tensor, a tuple whose first item is the tensor, or ``.sample``."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return (fn(output[0]),) + tuple(output[1:])
    if hasattr(output, "sample"):
        output.sample = fn(output.sample)
        return output
    return output


def _layer_outputs(block) -> list[torch.nn.Module]:
    """The modules whose output is a block's per-layer hidden state (attention if present, else resnet)."""
    attentions = getattr(block, "attentions", None)
    return list(attentions) if attentions else list(block.resnets)


class DeepShrink:
    """Deep Shrink hooks on a diffusers SDXL U-Net; :attr:`settings` selects the behaviour per run.

    ``DeepShrink(unet)`` installs the hooks once (before any ``torch.compile``); with
    ``settings = None`` (the default) they do nothing. :meth:`remove` takes them off again.
    """

    def __init__(self, unet: torch.nn.Module):
        self.settings: Optional[DeepShrinkSettings] = None
        self._sites = [unet.conv_in]  # index = sd-scripts input-block depth
        skips = [unet.conv_in]  # modules whose outputs become skip connections, in push order
        for block in unet.down_blocks:
            self._sites.extend(block.resnets)
            skips.extend(_layer_outputs(block))
            if getattr(block, "downsamplers", None):
                self._sites.extend(block.downsamplers)
                skips.extend(block.downsamplers)
        producers = []  # producers[k]: module whose output meets the k-th popped skip
        previous = unet.mid_block
        for block in unet.up_blocks:
            outputs = _layer_outputs(block)
            for j in range(len(block.resnets)):
                producers.append(previous)
                previous = outputs[j]
            if getattr(block, "upsamplers", None):
                previous = block.upsamplers[0]
        self._skip_sizes: list[tuple[int, int]] = []
        self._input_size: Optional[tuple[int, int]] = None
        self._depth: Optional[int] = None
        handles = [unet.register_forward_pre_hook(self._on_unet, with_kwargs=True),
                   unet.conv_norm_out.register_forward_pre_hook(self._on_out)]
        handles += [m.register_forward_pre_hook(self._make_site_hook(d)) for d, m in enumerate(self._sites)]
        handles += [m.register_forward_hook(self._record_skip) for m in dict.fromkeys(skips)]
        handles += [m.register_forward_hook(self._make_producer_hook(k)) for k, m in enumerate(producers)]
        self._handles = handles
        self._producer_count = len(producers)

    @property
    def depths(self) -> int:
        """How many input-block depths this U-Net has (9 for SDXL)."""
        return len(self._sites)

    def remove(self) -> None:
        """Take every hook off the U-Net."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---- hooks --------------------------------------------------------------------------------------
    def _on_unet(self, _module, args, kwargs):
        self._skip_sizes = []
        self._input_size = None
        self._depth = None
        s = self.settings
        if s is not None and s.ratio != 1.0:
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
            self._depth = s.depth_at(value)
            if self._depth is not None and self._depth >= len(self._sites):
                raise UserError(f"Deep Shrink depth {self._depth}: this U-Net has only {len(self._sites)} input blocks")
        return None

    def _make_site_hook(self, depth: int):
        def hook(_module, args):
            if depth == 0 and self._input_size is None:
                self._input_size = tuple(args[0].shape[-2:])
            if self._depth == depth:
                return (_shrink(args[0], self.settings.ratio),) + tuple(args[1:])
            return None
        return hook

    def _record_skip(self, _module, _args, output):
        if self._depth is not None:
            tensor = output if isinstance(output, torch.Tensor) else output[0]
            self._skip_sizes.append(tuple(tensor.shape[-2:]))

    def _make_producer_hook(self, k: int):
        def hook(_module, _args, output):
            if self._depth is None:
                return None
            index = len(self._skip_sizes) - 1 - k  # the k-th pop takes the skips from the end
            if index < 0:
                return None
            target = self._skip_sizes[index]
            return _replace_first(output, lambda h: h if tuple(h.shape[-2:]) == target else _resize(h, target))
        return hook

    def _on_out(self, _module, args):
        if self._depth is not None and self._input_size and tuple(args[0].shape[-2:]) != self._input_size:
            return (_resize(args[0], self._input_size),) + tuple(args[1:])
        return None
