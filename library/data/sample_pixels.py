"""Loading the pixels of one training sample: resize, crop, flip, colour jitter, alpha mask."""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from PIL import Image

from library.data.dataset_items import ImageItem
from library.data.images import DEFAULT_MAX_PIXELS, convert_to_rgb, load_image, resize_and_crop, to_tensor
from library.errors import UserError

#: Largest hue rotation of ``color_aug``, as a fraction of the hue circle (about +-16 degrees).
COLOR_AUG_MAX_HUE_SHIFT = 0.045


def hue_shift(img: Image.Image, rng: random.Random) -> Image.Image:
    """Rotate the hue of an RGB image by a random amount (``color_aug``)."""
    shift = int(round(rng.uniform(-COLOR_AUG_MAX_HUE_SHIFT, COLOR_AUG_MAX_HUE_SHIFT) * 256))
    if shift == 0:
        return img
    hsv = np.array(img.convert("HSV"))
    hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int16) + shift) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def load_sample_pixels(item: ImageItem, crop_left_top: tuple, flip: bool,
                       interpolation: Optional[str], *, alpha_mask: bool = False,
                       color_rng: Optional[random.Random] = None,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple:
    """The training pixels of one sample: ``([3, H, W] float32 in [-1, 1], mask or None)``.

    The image is resized to ``item.resized_size``, cropped to ``item.bucket`` at
    ``crop_left_top`` (offsets in the unflipped image) and mirrored when ``flip``. With
    ``alpha_mask`` the mask is the alpha channel cropped the same way (``[H, W]`` in [0, 1]);
    the pixels are composited on white either way. ``color_rng`` turns on the hue jitter.
    """
    img = load_image(item.path, keep_alpha=alpha_mask, max_pixels=max_pixels)
    if img.size != tuple(item.original_size):
        raise UserError(f"{item.path}: image is {img.size[0]}x{img.size[1]} but was "
                        f"{item.original_size[0]}x{item.original_size[1]} when the dataset was "
                        "scanned; it changed during the run, start again")
    args = (item.resized_size, crop_left_top[0], crop_left_top[1], item.bucket, flip, interpolation)
    mask = None
    if alpha_mask:
        mask = torch.from_numpy(resize_and_crop(img.getchannel("A"), *args).astype(np.float32) / 255.0)
        img = convert_to_rgb(img)
    if color_rng is not None:
        img = hue_shift(img, color_rng)
    return to_tensor(resize_and_crop(img, *args)), mask


def load_conditioning_image(item: ImageItem, crop_left_top: tuple, flip: bool,
                            interpolation: Optional[str],
                            max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The conditioning image of a ControlNet sample, ``[3, H, W]`` float32 in [0, 1], resized
    and cropped exactly like the training image (a conditioning image of another size is
    first stretched to the training image's size)."""
    img = load_image(item.conditioning_path, max_pixels=max_pixels)
    arr = resize_and_crop(img, item.resized_size, crop_left_top[0], crop_left_top[1], item.bucket,
                          flip, interpolation)
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()
