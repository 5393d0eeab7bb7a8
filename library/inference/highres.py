"""Highres fix (sd-scripts' ``--highres_fix_*``): generate small, upscale, refine with img2img at full size.

As sd-scripts does it:

* **First stage**: the size ``int(W * scale + 0.5)`` rounded down to a multiple of 32 (likewise the
  height), ``--highres_fix_steps`` steps (default 28); the original-size and crop conditioning are
  scaled the same way (``int(x * scale + 0.5)``). With img2img, the first stage is the img2img run,
  at ``--highres_fix_strength`` (default: the img2img strength).
* **Upscale** to W x H: the decoded image with LANCZOS (default), the latent bilinearly
  (``--highres_fix_latents_upscaling``), or an upscaler module (``--highres_fix_upscaler``, see
  :func:`load_upscaler`).
* **Second stage**: img2img of the upscaled image at W x H with ``--steps`` and the img2img strength
  (``--strength`` / ``--t``, default 0.8), seed + 1, no mask, control adapters off with
  ``--highres_fix_disable_control_net``.

The control-adapter switch is generic: :meth:`SDXLGenerator.generate` passes ``control_enabled`` to
every U-Net hook as :attr:`DenoiseStep.control_enabled`; adapter hooks (ControlNet-LLLite) honour it.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from PIL import Image

from library.errors import UserError
from library.inference.img2img import InitImage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HighresFix:
    """The highres-fix options (sd-scripts' names without the ``highres_fix_`` prefix)."""

    scale: float
    steps: int = 28
    strength: Optional[float] = None  # first-stage img2img strength (None: the img2img strength)
    latents_upscaling: bool = False
    save_1st: bool = False
    disable_control_net: bool = False
    upscaler: Any = None  # an object with support_latents() and upscale(...), see load_upscaler

    def latent_mode(self) -> bool:
        """Whether the first stage hands latents (not images) to the upscale step."""
        return self.upscaler.support_latents() if self.upscaler is not None else self.latents_upscaling


def scale_value(value: Optional[int], scale: float) -> Optional[int]:
    """``int(value * scale + 0.5)`` (None stays None)."""
    return None if value is None else int(value * scale + 0.5)


def first_stage_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) of the first stage: scaled and rounded down to a multiple of 32 (at least 64)."""
    w, h = scale_value(width, scale), scale_value(height, scale)
    return max(64, w - w % 32), max(64, h - h % 32)


def upscale_latents(latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinear latent upscaling to the final size (sd-scripts' ``--highres_fix_latents_upscaling``)."""
    return F.interpolate(latents.float(), (height // 8, width // 8), mode="bilinear")


def upscale_images(images, width: int, height: int) -> list[Image.Image]:
    """LANCZOS image upscaling to the final size (the default)."""
    return [image.resize((width, height), resample=Image.Resampling.LANCZOS) for image in images]


def load_upscaler(module: str, args: Optional[str], device, dtype):
    """sd-scripts' upscaler protocol: ``module.create_upscaler(**kwargs)`` with kwargs from ``"k=v;k=v"``.

    The object must have ``support_latents() -> bool`` and ``upscale(vae, images, latents, dtype, width,
    height, batch_size, vae_batch_size)`` returning PIL images or latents (in the U-Net's latent space).
    """
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"--highres_fix_upscaler: cannot import {module!r}: {exc}") from None
    kwargs = {}
    for item in (args or "").split(";"):
        if item.strip():
            if "=" not in item:
                raise UserError(f"--highres_fix_upscaler_args: {item!r} is not key=value")
            key, value = item.split("=", 1)
            kwargs[key.strip()] = value.strip()
    if not hasattr(imported, "create_upscaler"):
        raise UserError(f"--highres_fix_upscaler: {module!r} has no create_upscaler()")
    upscaler = imported.create_upscaler(**kwargs)
    if hasattr(upscaler, "to"):
        upscaler.to(device=device, dtype=dtype)
    return upscaler


def _first_stage_kwargs(kwargs: dict, hr: HighresFix) -> dict:
    first = dict(kwargs)
    w1, h1 = first_stage_size(kwargs["width"], kwargs["height"], hr.scale)
    orig = kwargs.get("original_size") or (kwargs["height"], kwargs["width"])
    neg = kwargs.get("negative_original_size") or orig
    crop = kwargs.get("crop_top_left") or (0, 0)
    first.update(width=w1, height=h1, steps=hr.steps, output_type="latent",
                 original_size=tuple(scale_value(v, hr.scale) for v in orig),
                 negative_original_size=tuple(scale_value(v, hr.scale) for v in neg),
                 crop_top_left=tuple(scale_value(v, hr.scale) for v in crop))
    init = kwargs.get("init")
    if init is not None:
        strength = init.strength if hr.strength is None else hr.strength
        first["init"] = dataclasses.replace(init, strength=strength)
    return first


def generate_highres(gen, kwargs: dict, hr: HighresFix,
                     on_first_stage: Optional[Callable[[list[Image.Image], dict], None]] = None) -> Any:
    """Run both stages of the highres fix for one batch; returns what ``gen.generate(**kwargs)`` would.

    ``kwargs`` are :meth:`SDXLGenerator.generate` arguments for the final size (``width``/``height``,
    ``steps``, ``seeds``, an optional ``init`` for img2img, ...); ``strength`` of the second stage is
    ``kwargs["strength"]`` (default 0.8). ``on_first_stage(images, first_kwargs)`` receives the decoded
    first stage (``--highres_fix_save_1st``).
    """
    strength = kwargs.pop("strength", None)
    strength = 0.8 if strength is None else strength
    first = _first_stage_kwargs(kwargs, hr)
    logger.info("highres fix: first stage %dx%d, %d steps", first["width"], first["height"], first["steps"])
    latents = gen.generate(**first)
    images = None
    if on_first_stage is not None or not hr.latent_mode():
        images = gen.decode(latents, "pil", kwargs.get("vae_batch_size"))
    if on_first_stage is not None:
        on_first_stage(images, first)
    width, height = kwargs["width"], kwargs["height"]
    if hr.upscaler is not None:
        b = latents.shape[0]
        upscaled = hr.upscaler.upscale(gen.vae, None if hr.latent_mode() else images,
                                       latents if hr.latent_mode() else None, gen.dtype, width, height, b,
                                       kwargs.get("vae_batch_size") or b)
        init = (InitImage(latents=upscaled.float(), strength=strength) if isinstance(upscaled, torch.Tensor)
                else InitImage(images=list(upscaled), strength=strength))
    elif hr.latents_upscaling:
        init = InitImage(latents=upscale_latents(latents, width, height), strength=strength)
    else:
        init = InitImage(images=upscale_images(images, width, height), strength=strength)
    second = dict(kwargs, init=init, seeds=[int(s) + 1 for s in kwargs["seeds"]])
    if hr.disable_control_net:
        second["control_enabled"] = False
    logger.info("highres fix: second stage %dx%d, strength %g", width, height, strength)
    return gen.generate(**second)
