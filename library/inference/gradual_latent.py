"""Gradual Latent (sd-scripts' ``--gradual_latent_*``): sample small first, grow the latent over the steps.

sd-scripts' behaviour, for the Euler-ancestral sampler only (``euler_a`` / ``k_euler_a``):

* before the first step the latent is resized (bicubic) by ``ratio`` and, with unsharp parameters,
  sharpened;
* at a step whose timestep is below ``timesteps``, when at least ``every_n_steps`` steps passed since
  the last growth, the ratio grows by ``ratio_step`` (at most 1.0) and this step's result is resized
  to ``int(full * ratio) // 8 * 8`` latent pixels per side: the Euler update ``x + d * dt`` is resized
  and then sharpened ("target x", the default), or the sample is resized and sharpened and the
  derivative resized before the update; the ancestral noise is then drawn at the new size and scaled
  by ``s_noise``. Other steps are plain Euler-ancestral steps.

If the ratio has not reached 1.0 by the last step, the image comes out smaller (as in sd-scripts; a
warning says so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from library.errors import UserError

logger = logging.getLogger(__name__)

SUPPORTED_SAMPLERS = ("euler_a", "k_euler_a")


@dataclass(frozen=True)
class Unsharp:
    """Unsharp mask ``x + strength * (x - gaussian_blur(x, ksize, sigma))``; ``target_x`` as in sd-scripts."""

    ksize: int
    sigma: float
    strength: float
    target_x: bool = True


@dataclass(frozen=True)
class GradualLatentSettings:
    """One Gradual Latent configuration (sd-scripts' option defaults)."""

    timesteps: int
    ratio: float = 0.5
    ratio_step: float = 0.125
    every_n_steps: int = 3
    s_noise: float = 1.0
    unsharp: Optional[Unsharp] = None


def parse_unsharp(text: Optional[str]) -> Optional[Unsharp]:
    """``"ksize,sigma,strength[,target_x]"`` (e.g. ``3,0.5,0.5,1``) -> :class:`Unsharp`."""
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        ksize, sigma, strength = (float(v) for v in parts[:3])
        target_x = True if len(parts) < 4 else bool(int(parts[3]))
    except ValueError:
        raise UserError(f"--gradual_latent_unsharp_params {text!r}: expected ksize,sigma,strength[,target_x], "
                        "e.g. 3,0.5,0.5,1") from None
    if len(parts) < 3 or int(ksize) < 1 or int(ksize) % 2 == 0 or sigma <= 0:
        raise UserError(f"--gradual_latent_unsharp_params {text!r}: ksize must be odd and positive, sigma > 0")
    return Unsharp(int(ksize), sigma, strength, target_x)


def gradual_latent_settings(timesteps: Optional[int], ratio: float, ratio_step: float, every_n_steps: int,
                            s_noise: float, unsharp: Optional[str]) -> Optional[GradualLatentSettings]:
    """Settings from the option values (``None`` when ``timesteps`` is not given); checks the ranges."""
    if timesteps is None:
        return None
    if not 0.0 < ratio <= 1.0:
        raise UserError(f"--gradual_latent_ratio {ratio}: must be in (0, 1]")
    if ratio_step <= 0:
        raise UserError(f"--gradual_latent_ratio_step {ratio_step}: must be positive")
    if every_n_steps < 1:
        raise UserError(f"--gradual_latent_every_n_steps {every_n_steps}: must be at least 1")
    return GradualLatentSettings(int(timesteps), float(ratio), float(ratio_step), int(every_n_steps),
                                 float(s_noise), parse_unsharp(unsharp))


def gaussian_blur(x: torch.Tensor, ksize: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding (torchvision's ``gaussian_blur``)."""
    half = (ksize - 1) / 2
    coords = torch.linspace(-half, half, ksize, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    channels = x.shape[1]
    pad = ksize // 2
    out = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, ksize).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, ksize, 1).repeat(channels, 1, 1, 1), groups=channels)


def _resize(x: torch.Tensor, size, unsharp: Optional[Unsharp], sharpen: bool = True) -> torch.Tensor:
    out = F.interpolate(x.float(), size=tuple(size), mode="bicubic", align_corners=False).to(x.dtype)
    if sharpen and unsharp is not None:
        out = out + (out - gaussian_blur(out, unsharp.ksize, unsharp.sigma)) * unsharp.strength
    return out


class GradualLatent:
    """The state of one Gradual Latent run over a (B, 4, h, w) latent of the full size."""

    def __init__(self, settings: GradualLatentSettings, full_size: tuple[int, int]):
        self.settings = settings
        self.full_size = full_size
        self.ratio = settings.ratio
        self._elapsed = 1000  # sd-scripts: the first eligible step grows at once

    def begin(self, latents: torch.Tensor) -> torch.Tensor:
        """The starting latent: resized by ``ratio`` (and sharpened)."""
        if self.ratio >= 1.0:
            return latents
        small = F.interpolate(latents.float(), scale_factor=self.ratio, mode="bicubic",
                              align_corners=False).to(latents.dtype)
        u = self.settings.unsharp
        return small + (small - gaussian_blur(small, u.ksize, u.sigma)) * u.strength if u else small

    def _next_size(self, timestep: float) -> Optional[tuple[int, int]]:
        s = self.settings
        size = None
        if timestep < s.timesteps and self.ratio < 1.0 and self._elapsed >= s.every_n_steps:
            self.ratio = min(self.ratio + s.ratio_step, 1.0)
            size = tuple(max(8, int(side * self.ratio) // 8 * 8) for side in self.full_size)
            if self.ratio >= 1.0:
                size = tuple(self.full_size)
            self._elapsed = 0
        self._elapsed += 1
        return size

    def step(self, scheduler, pred: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor,
             generators: Sequence[torch.Generator]) -> torch.Tensor:
        """One Euler-ancestral step that may grow the latent (see the module docstring)."""
        size = self._next_size(float(timestep))
        if size is None:
            return scheduler.step(pred, timestep, latents, generator=list(generators), return_dict=False)[0]
        if scheduler.step_index is None:
            scheduler._init_step_index(timestep)  # diffusers' own first-step bookkeeping
        i = scheduler.step_index
        sigma_from, sigma_to = scheduler.sigmas[i].to(latents.device), scheduler.sigmas[i + 1].to(latents.device)
        if scheduler.config.prediction_type == "v_prediction":
            x0 = pred * (-sigma_from / (sigma_from ** 2 + 1) ** 0.5) + latents / (sigma_from ** 2 + 1)
        else:
            x0 = latents - sigma_from * pred
        sigma_up = (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
        sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
        derivative = (latents - x0) / sigma_from
        dt = sigma_down - sigma_from
        u = self.settings.unsharp
        if u is None or u.target_x:
            prev = _resize(latents + derivative * dt, size, u)
        else:
            prev = _resize(latents, size, u) + _resize(derivative, size, u, sharpen=False) * dt
        noise = torch.cat([torch.randn((1, latents.shape[1], *size), generator=g, dtype=torch.float32)
                           for g in generators]).to(latents.device)
        scheduler._step_index += 1  # what diffusers' step() does at its end
        return prev + noise * sigma_up * self.settings.s_noise

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """Warn when the run ended before the latent regained its full size."""
        if tuple(latents.shape[-2:]) != tuple(self.full_size):
            h, w = latents.shape[-2:]
            logger.warning("Gradual Latent ended at ratio %.3f: the image is %dx%d instead of %dx%d (lower "
                           "--gradual_latent_every_n_steps or raise --gradual_latent_timesteps)",
                           self.ratio, w * 8, h * 8, self.full_size[1] * 8, self.full_size[0] * 8)
        return latents


def check_sampler(sampler) -> None:
    """Gradual Latent needs the Euler-ancestral sampler (as in sd-scripts)."""
    name = sampler if isinstance(sampler, str) else type(sampler).__name__
    if isinstance(sampler, str) and sampler in SUPPORTED_SAMPLERS:
        return
    if not isinstance(sampler, str) and name == "EulerAncestralDiscreteScheduler":
        return
    raise UserError(f"Gradual Latent works with --sampler euler_a (or k_euler_a) only, not {name!r}")

