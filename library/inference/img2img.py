"""img2img and inpainting for :class:`library.inference.pipeline.SDXLGenerator` (sd-scripts' ``--image_path``,
``--mask_path``, ``--strength``).

What sd-scripts does, and what we do:

* **Images**: ``--image_path`` is a file or a folder (``*.png *.jpg *.jpeg *.webp``, sorted by name),
  converted to RGB; the images are used in turn, one per generated image. With ``--W`` and ``--H`` given,
  every image (and mask) is first resized to that size with LANCZOS; the output size is then the image
  size rounded down to a multiple of 32 (the image is resized to it, so a non-multiple is slightly
  stretched, as in sd-scripts).
* **Strength** ``s`` with ``N`` steps: the last ``int(N * s)`` steps of the ``N``-step schedule run
  (at least one), starting from the VAE latent of the image noised to the first of those timesteps.
  This is diffusers' ``StableDiffusionXLImg2ImgPipeline``; sd-scripts' pipeline (inherited from an old
  "long prompt weighting" pipeline) noises the image one step higher than the first step it runs, and
  at strength 1.0 it skips the first step: we do not copy that off-by-one.
* **Mask** (white = repaint, black = keep): grey levels are kept, converted to one channel and
  resized to the latent size with PIL's bilinear filter (a soft edge, no extra blur), as in sd-scripts.
  The ordinary U-Net runs and after every step the kept part is replaced by the original latent noised
  to the next step's level (the clean latent after the last step), as diffusers' inpainting pipeline
  does for a 4-channel U-Net; sd-scripts noises it to the level of the step just taken (one step too
  much noise in the kept part). No inpainting U-Net is involved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from library.errors import UserError
from library.models.sdxl import VAE_SCALE_FACTOR

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class SourceImage:
    """An image read for img2img / inpainting, with the file it came from."""

    image: Image.Image
    path: Path


def load_images(path: str, option: str = "--image_path") -> list[SourceImage]:
    """The image file ``path`` or the images of folder ``path`` (sorted by name), as RGB."""
    where = Path(path)
    if where.is_dir():
        files = sorted(p for p in where.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    elif where.is_file():
        files = [where]
    else:
        raise UserError(f"{option}: {path} not found")
    if not files:
        raise UserError(f"{option}: no .png/.jpg/.jpeg/.webp images in {path}")
    images = []
    for file in files:
        try:
            with Image.open(file) as opened:
                image = opened.convert("RGB")
                image.info.update({k: v for k, v in getattr(opened, "text", {}).items()})
        except (OSError, SyntaxError, ValueError) as exc:
            raise UserError(f"{option}: cannot read {file}: {exc}") from None
        images.append(SourceImage(image, file))
    return images


def resize_images(images: Sequence[SourceImage], size: tuple[int, int]) -> list[SourceImage]:
    """Every image resized to ``size`` (width, height) with LANCZOS (sd-scripts' ``--W/--H`` resize)."""
    return [SourceImage(s.image.resize(size, Image.Resampling.LANCZOS), s.path) if s.image.size != size else s
            for s in images]


def output_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the generated image for an init image: its size rounded down to /32."""
    w, h = image.size
    return w - w % 32, h - h % 32


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, h, w) in [-1, 1], the image first resized (LANCZOS) to a multiple of 32 if needed."""
    size = output_size(image)
    if min(size) < 32:
        raise UserError(f"init image of {image.size[0]}x{image.size[1]} is too small (at least 32x32)")
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def mask_to_latent(mask: Image.Image) -> torch.Tensor:
    """(1, 1, h/8, w/8) repaint weight in [0, 1] (white = 1 = repaint) from a mask image.

    Grey levels are kept; the mask is sized like :func:`image_to_tensor` (multiple of 32) and then
    reduced to the latent size with PIL's bilinear filter.
    """
    w, h = output_size(mask)
    small = mask.convert("L").resize((w // 8, h // 8), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None, None]


def denoise_start(steps: int, strength: float) -> int:
    """Index of the first of the ``N = steps`` schedule steps that img2img runs (``int(N * s)`` run, >= 1)."""
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"img2img strength must be between 0 and 1 (got {strength})")
    run = min(max(int(steps * strength), 1), steps)
    return steps - run


@dataclass
class InitImage:
    """What img2img starts from: PIL images (VAE-encoded here) or latents, one per generated image.

    ``latents`` are in the U-Net's latent space (already multiplied by the VAE scale factor), e.g.
    the upscaled first stage of the highres fix. ``mask`` is the repaint weight (B or 1, 1, h/8, w/8)
    of :func:`mask_to_latent`, or ``None`` for plain img2img.
    """

    images: Optional[Sequence[Image.Image]] = None
    latents: Optional[torch.Tensor] = None
    strength: float = 0.8
    mask: Optional[torch.Tensor] = None

    def size(self) -> tuple[int, int]:
        """(width, height) of the generated image."""
        if self.latents is not None:
            return self.latents.shape[-1] * 8, self.latents.shape[-2] * 8
        return output_size(self.images[0])


def encode_images(vae, images: Sequence[Image.Image], generators: Sequence[torch.Generator], device, dtype
                  ) -> torch.Tensor:
    """VAE latents (a sample of each latent distribution, drawn from each image's generator) x 0.13025."""
    latents = []
    with torch.no_grad():
        for image, generator in zip(images, generators):
            pixels = image_to_tensor(image).to(device, dtype)
            dist = vae.encode(pixels).latent_dist
            eps = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(device)
            latents.append((dist.mean.float() + dist.std.float() * eps) * VAE_SCALE_FACTOR)
    return torch.cat(latents)


BlendFn = Callable[[torch.Tensor, int], torch.Tensor]


def prepare(init: InitImage, vae, vae_dtype, scheduler, steps: int, generators: Sequence[torch.Generator],
            device) -> tuple[torch.Tensor, int, Optional[BlendFn]]:
    """Starting latents, first schedule index and the per-step mask blend (or ``None``) for img2img.

    Call after ``scheduler.set_timesteps``. Per image, the generator gives first the VAE sample
    (when images are given), then the noise, then (ancestral samplers) the step noises, as in
    diffusers' img2img pipeline. The returned index is in ``scheduler.timesteps`` (``order`` calls per step).
    """
    b = len(generators)
    if init.latents is not None:
        x0 = init.latents.float().to(device)
    else:
        images = list(init.images)
        if len(images) == 1 and b > 1:
            images = images * b
        x0 = encode_images(vae, images, generators, device, vae_dtype)
    if x0.shape[0] != b:
        raise ValueError(f"{x0.shape[0]} init images for {b} images")
    noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g, dtype=torch.float32) for g in generators])
    noise = noise.to(device)
    start = denoise_start(steps, init.strength) * getattr(scheduler, "order", 1)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    latents = scheduler.add_noise(x0, noise, scheduler.timesteps[start:start + 1].repeat(b))
    if init.mask is None:
        return latents, start, None
    mask = init.mask.float().to(device)
    if tuple(mask.shape[-2:]) != tuple(x0.shape[-2:]):
        raise UserError(f"the mask ({mask.shape[-1] * 8}x{mask.shape[-2] * 8}) and the image "
                        f"({x0.shape[-1] * 8}x{x0.shape[-2] * 8}) differ in size; use masks of the image size")
    timesteps = scheduler.timesteps[start:]

    def blend(current: torch.Tensor, i: int) -> torch.Tensor:
        """After call ``i``: keep the unmasked part at the original latent, noised to the next level."""
        kept = x0
        if i + 1 < len(timesteps):
            kept = scheduler.add_noise(x0, noise, timesteps[i + 1:i + 2])
        return mask * current + (1.0 - mask) * kept

    return latents, start, blend

