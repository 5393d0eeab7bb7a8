"""Guide images and ControlNet-LLLite as a U-Net hook of the denoising loop.

The networks themselves live in ``networks.control_net_lllite``; here they are only duck-typed
objects with ``set_cond_image(tensor | None)``, ``set_enabled(bool)`` and ``set_multiplier(float)``,
so the library does not import the networks package.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from library.errors import UserError
from library.inference.pipeline import DenoiseStep

logger = logging.getLogger(__name__)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while type(model).__name__ in ("OptimizedModule", "DistributedDataParallel"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def block_depths(unet: torch.nn.Module) -> tuple[list[int], int, list[int]]:
    """(depth per down block, mid-block depth, depth per up block) from the U-Net's down/upsamplers."""
    unet = _unwrap(unet)
    down, depth = [], 1
    for block in unet.down_blocks:
        down.append(depth)
        depth += getattr(block, "downsamplers", None) is not None
    mid, up = depth, []
    for block in unet.up_blocks:
        up.append(depth)
        depth -= getattr(block, "upsamplers", None) is not None
    return down, mid, up


def pixel_factor(unet: torch.nn.Module) -> int:
    """The side length every guide / output image must be a multiple of (32 for SDXL): VAE 8 x U-Net."""
    _, mid, _ = block_depths(unet)
    return 8 * 2 ** (mid - 1)


def check_image_size(unet: torch.nn.Module, width: int, height: int) -> None:
    """UserError naming the nearest valid sizes when ``width``/``height`` do not fit the U-Net."""
    factor = pixel_factor(unet)
    for what, value in (("width", width), ("height", height)):
        if value % factor:
            low, high = value - value % factor, value - value % factor + factor
            raise UserError(f"ControlNet-LLLite: image {what} {value} is not a multiple of {factor} (the U-Net's "
                            f"total downsampling); use {low or factor} or {high}")


def load_guide_image(path: str | os.PathLike, width: int, height: int) -> torch.Tensor:
    """A guide (conditioning) image as (3, height, width) float32 in [-1, 1], resized to the output size.

    No preprocessing is applied: give the map the model was trained on (e.g. Canny edges).
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise UserError(f"guide image {path} not found")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (width, height):
                img = img.resize((width, height), Image.LANCZOS)
            arr = np.asarray(img, dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise UserError(f"guide image {path}: cannot read it ({exc})") from None
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def check_ratios(values: Optional[Sequence[float]], count: int, what: str) -> list[float]:
    """One value per model (the last given value repeats; default 1.0); ratios must be in (0, 1]."""
    values = list(values or [])
    if len(values) > count:
        raise UserError(f"--{what} has {len(values)} values for {count} --control_net_lllite_models")
    out = (values + [values[-1] if values else 1.0] * count)[:count]
    if what == "control_net_ratios" and any(not 0 < r <= 1 for r in out):
        raise UserError(f"--control_net_ratios must be in (0, 1] (the fraction of the steps that use the model); "
                        f"got {values}")
    return out


def guide_paths(specs: Sequence[Any], guides: Sequence[str] | None) -> list[str]:
    """The guide image of every image to generate: its prompt's ``--cn``, else ``guides`` in turn.

    Every path is checked to exist, so a missing one stops the run before any model loads.
    """
    guides = list(guides or [])
    paths = []
    for i, spec in enumerate(specs):
        path = spec.controlnet_image or (guides[i % len(guides)] if guides else None)
        if path is None:
            raise UserError(f"ControlNet-LLLite needs a guide image for prompt {spec.prompt!r}: give "
                            "--guide_image_path or the prompt option --cn")
        if not Path(path).is_file():
            raise UserError(f"guide image {path} not found (prompt {spec.prompt!r})")
        paths.append(path)
    return paths


class LLLiteControl:
    """Switches each attached LLLite network on for the first ``ratio`` of the U-Net calls.

    Register with ``generator.unet_hooks.append(control)``; call :meth:`prepare` (or
    :meth:`set_images`) before each generation with one guide image per generated image and
    :meth:`clear` afterwards. A run at another latent size than the guide images' (the first stage
    of the highres fix, Gradual Latent) embeds them again at that size; a run with
    ``step.control_enabled`` False (``--highres_fix_disable_control_net``) keeps the networks off.
    """

    def __init__(self, networks: Sequence[Any], multipliers: Sequence[float], ratios: Sequence[float]):
        self.networks = list(networks)
        self.ratios = list(ratios)
        self._pixels: torch.Tensor | None = None  # the guide images, (B, 3, H, W) in [-1, 1]
        self._embedded_size: tuple[int, int] | None = None  # (H, W) the networks hold embeddings for
        self._enabled: tuple[bool, ...] = ()  # which networks the last call switched on
        for network, multiplier in zip(self.networks, multipliers):
            network.set_multiplier(float(multiplier))

    @classmethod
    def from_options(cls, networks: Sequence[Any], multipliers: Optional[Sequence[float]],
                     ratios: Optional[Sequence[float]]) -> "LLLiteControl":
        """The hook for ``--control_net_multipliers`` / ``--control_net_ratios`` (one value each, or one for all)."""
        count = len(networks)
        control = cls(networks, check_ratios(multipliers, count, "control_net_multipliers"),
                      check_ratios(ratios, count, "control_net_ratios"))
        logger.info("ControlNet-LLLite: %d model(s), %d modules", count,
                    sum(len(getattr(n, "unet_modules", ())) for n in networks))
        return control

    def set_images(self, images: Sequence[torch.Tensor], device: torch.device | str, dtype: torch.dtype) -> None:
        """Embed the guide images ((3, H, W) each, one per image of the batch) in every network, once."""
        self._pixels = torch.stack(list(images)).to(device=device, dtype=dtype)
        self._embed(self._pixels)

    def _embed(self, pixels: torch.Tensor) -> None:
        with torch.no_grad():
            for network in self.networks:
                network.set_cond_image(pixels)
                network.set_enabled(True)
        self._embedded_size = (int(pixels.shape[-2]), int(pixels.shape[-1]))

    def prepare(self, unet: torch.nn.Module, paths: Sequence[str], width: int, height: int,
                device: torch.device | str, dtype: torch.dtype) -> None:
        """Check the size against ``unet`` and embed the guide images at ``paths`` (one per image)."""
        check_image_size(unet, width, height)
        self.set_images([load_guide_image(p, width, height) for p in paths], device, dtype)

    def clear(self) -> None:
        """Forget the embeddings; the U-Net is the base model (plus any LoRA) again."""
        self._pixels, self._embedded_size = None, None
        for network in self.networks:
            network.set_cond_image(None)

    def __call__(self, step: DenoiseStep) -> None:
        if self._pixels is not None:
            size = (int(step.latent_input.shape[-2]) * 8, int(step.latent_input.shape[-1]) * 8)  # VAE factor 8
            if size != self._embedded_size:  # a stage at another size: the guide resized to it
                self._embed(torch.nn.functional.interpolate(self._pixels, size=size, mode="bilinear",
                                                            antialias=True, align_corners=False))
        self._enabled = tuple(step.control_enabled and step.index < math.ceil(ratio * step.num_calls - 1e-9)
                              for ratio in self.ratios)
        for network, enabled in zip(self.networks, self._enabled):
            network.set_enabled(enabled)
        return None

    def graph_key(self) -> tuple:
        """What of this hook's state a CUDA-graphed U-Net call depends on within one sampling loop.

        The embeddings and multipliers are fixed for a loop; which networks are on changes with
        ``--control_net_ratios`` (see library/inference/unet_graphs.py).
        """
        return self._embedded_size, self._enabled


def lllite_control(generator: Any) -> Optional[LLLiteControl]:
    """The generator's ControlNet-LLLite hook, if one is registered."""
    return next((h for h in getattr(generator, "unet_hooks", ()) if isinstance(h, LLLiteControl)), None)
