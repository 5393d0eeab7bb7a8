"""Image loading, validation, resizing and fingerprinting.

Everything that reads a training image goes through :func:`load_image`, so every image is seen the
same way: EXIF orientation applied, CMYK / 16-bit / palette / grey images turned into 8-bit RGB, and
transparency either composited on white or kept for ``--alpha_mask``. :func:`scan_images` decodes
every file up front and reports *all* bad files at once, by path and reason, instead of failing on
the first one in the middle of caching or training.

Decompression bombs: an image whose header declares more than ``max_pixels`` pixels (default
:data:`DEFAULT_MAX_PIXELS`, 16384 x 16384) is refused. PIL's own guard (``Image.MAX_IMAGE_PIXELS``)
is raised to that limit when it is lower, so the limit named here is the one that applies, and
PIL's ``DecompressionBombError`` / ``DecompressionBombWarning`` are reported as failures.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from library.errors import UserError

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_MAX_PIXELS = 16384 * 16384
"""Largest image (width x height, in pixels) accepted unless a caller passes another limit."""


class _ExtensionSet(frozenset):
    """A set of lower-case extensions whose ``in`` test ignores case (``".PNG" in s`` is true)."""

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return frozenset.__contains__(self, item.lower())
        return False


IMAGE_EXTENSIONS: frozenset = _ExtensionSet({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
"""Extensions treated as images, with the leading dot; membership ignores case."""

INTERPOLATIONS: dict = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}
"""``--resize_interpolation`` names and the PIL filter each one uses (``area`` = box averaging)."""

_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ORIENTATION_TAG = 0x0112


class ImageLoadError(UserError):
    """An image file that cannot be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_path(path: PathLike) -> bool:
    """True when ``path`` has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return os.path.splitext(os.fspath(path))[1] in IMAGE_EXTENSIONS


# --- opening with checks --------------------------------------------------------------------------


def _raise_pil_guard(max_pixels: int) -> None:
    """Make sure PIL's own bomb guard does not fire below our limit (it warns above it)."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _bomb_reason(size: tuple, max_pixels: int) -> str:
    w, h = size
    return (
        f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels"
    )


def _open_checked(path: PathLike, max_pixels: int) -> Image.Image:
    """Open ``path`` lazily (header only) or raise :class:`ImageLoadError` with a clear reason."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read file: {exc.strerror or exc}") from None
    if size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    _raise_pil_guard(max_pixels)
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image, or an unsupported image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(path, f"decompression bomb: {exc}") from None
    except OSError as exc:
        raise ImageLoadError(path, f"cannot open image: {exc}") from None
    except Exception as exc:  # PIL plugins raise assorted errors on garbage headers
        raise ImageLoadError(path, f"corrupt image header: {type(exc).__name__}: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageLoadError(path, _bomb_reason((w, h), max_pixels))
    if w <= 0 or h <= 0:
        img.close()
        raise ImageLoadError(path, f"invalid image size {w}x{h}")
    return img


def _decode(img: Image.Image, path: PathLike) -> None:
    """Fully decode ``img`` so truncated or corrupt data is found now, not during training."""
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(path, f"decompression bomb: {exc}") from None
    except Exception as exc:
        raise ImageLoadError(
            path, f"truncated or corrupt image data ({type(exc).__name__}: {exc})"
        ) from None


# --- orientation and sizes ------------------------------------------------------------------------


def _png_exif_after_header(path: PathLike) -> Optional[bytes]:
    """Return the payload of a PNG ``eXIf`` chunk by walking chunk headers (no pixel decoding)."""
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            length, ctype = struct.unpack(">I4s", head)
            if ctype == b"eXIf":
                data = f.read(length)
                return data if len(data) == length else None
            if ctype == b"IEND":
                return None
            f.seek(length + 4, os.SEEK_CUR)


def _orientation(img: Image.Image, path: PathLike) -> int:
    """EXIF orientation (1..8) of an opened but not necessarily decoded image."""
    try:
        if img.format == "PNG" and "exif" not in img.info:
            # PIL would decode the whole PNG to look for an eXIf chunk after the pixel data.
            img.info["exif"] = _png_exif_after_header(path) or b""
        value = img.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if 1 <= int(value) <= 8 else 1
    except Exception:  # unreadable EXIF: the image itself may still be fine
        return 1


def _oriented_size(size: tuple, orientation: int) -> tuple:
    w, h = size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def image_size(path: PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple:
    """Return ``(width, height)`` of ``path`` after EXIF orientation, reading only the header.

    Raises :class:`ImageLoadError` for an unreadable file or a decompression bomb.
    """
    img = _open_checked(path, max_pixels)
    try:
        return _oriented_size(img.size, _orientation(img, path))
    finally:
        img.close()


# --- colour conversion ----------------------------------------------------------------------------


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """Scale a 16-bit (or 32-bit integer holding 16-bit data) grey image to 8-bit ``L``."""
    arr = np.asarray(img).astype(np.float32)
    arr = np.clip(arr, 0.0, 65535.0)
    return Image.fromarray(np.round(arr / 257.0).astype(np.uint8), "L")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """CMYK -> RGB through the embedded ICC profile when there is one, else PIL's formula."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
            if out is not None:
                return out
        except Exception:  # broken or unsupported profile: fall back to the plain formula
            logger.debug("ICC conversion failed; using PIL's CMYK formula", exc_info=True)
    return img.convert("RGB")


def convert_to_rgb(img: Image.Image, keep_alpha: bool = False) -> Image.Image:
    """Convert any decoded PIL image to 8-bit ``RGB`` (or ``RGBA`` when ``keep_alpha``).

    16-bit data is scaled (65535 -> 255), not clipped. Transparent images are composited on
    white unless ``keep_alpha``; with ``keep_alpha`` an opaque image gets an all-255 alpha.
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        img = _sixteen_bit_to_l(img)
    has_alpha = img.mode in _ALPHA_MODES or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        if keep_alpha:
            return rgba
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    rgb = _cmyk_to_rgb(img) if img.mode == "CMYK" else img.convert("RGB")
    if keep_alpha:
        rgb.putalpha(255)  # convert() returned a new image, so this does not touch the input
    return rgb


def load_image(
    path: PathLike, keep_alpha: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Load ``path`` as an 8-bit ``RGB`` PIL image (``RGBA`` when ``keep_alpha``).

    EXIF orientation is applied, so ``size`` matches :func:`image_size`. Raises
    :class:`ImageLoadError` (a :class:`UserError`) naming the file for anything unreadable:
    empty, not an image, truncated or corrupt, or a decompression bomb.
    """
    img = _open_checked(path, max_pixels)
    try:
        _decode(img, path)
        try:
            oriented = ImageOps.exif_transpose(img)
        except Exception:  # unreadable EXIF: keep the pixels as stored
            logger.warning("%s: unreadable EXIF orientation, image used as stored", path)
            oriented = img
        try:
            return convert_to_rgb(oriented, keep_alpha=keep_alpha)
        except Exception as exc:
            reason = f"unsupported colour mode {oriented.mode!r}: {exc}"
            raise ImageLoadError(path, reason) from None
    finally:
        img.close()


def split_alpha(arr: np.ndarray) -> tuple:
    """Split an HWC uint8 array into ``(rgb HxWx3, mask HxW float32 in [0,1] or None)``."""
    if arr.ndim == 3 and arr.shape[2] == 4:
        return arr[:, :, :3], arr[:, :, 3].astype(np.float32) / 255.0
    return arr, None


# --- scanning a data set --------------------------------------------------------------------------


@dataclass
class ScanReport:
    """Result of :func:`scan_images`.

    ``good``: usable paths in input order; ``bad``: ``(path, reason)`` for each unusable file;
    ``sizes``: ``(width, height)`` after EXIF orientation of every good path; ``fingerprints``:
    the content fingerprint (``sha256:<hex>`` of the bytes) of every good path a full scan read.
    """

    good: list = field(default_factory=list)
    bad: list = field(default_factory=list)
    sizes: dict = field(default_factory=dict)
    fingerprints: dict = field(default_factory=dict)

    def format_bad(self) -> str:
        """One line per bad file: ``path: reason``."""
        return "\n".join(f"  {path}: {reason}" for path, reason in self.bad)

    def raise_if_bad(self, skip_bad: bool) -> None:
        """Raise :class:`UserError` listing every bad file, or (``skip_bad``) log and return."""
        if not self.bad:
            return
        total = len(self.good) + len(self.bad)
        if skip_bad:
            logger.warning(
                "skipping %d of %d image(s) that cannot be used (--skip_bad_images):\n%s",
                len(self.bad), total, self.format_bad(),
            )
            return
        raise UserError(
            f"{len(self.bad)} of {total} image(s) cannot be used:\n{self.format_bad()}\n"
            "Fix or remove these files, or pass --skip_bad_images to train without them."
        )


def check_image(
    path: PathLike, min_size: Optional[int] = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple:
    """Fully decode one file; return its oriented ``(w, h)`` or raise :class:`ImageLoadError`.

    ``min_size``: both sides must be at least this many pixels (``None``: no size check).
    """
    img = _open_checked(path, max_pixels)
    try:
        orientation = _orientation(img, path)
        _decode(img, path)
        w, h = _oriented_size(img.size, orientation)
    finally:
        img.close()
    if min_size is not None and min(w, h) < min_size:
        raise ImageLoadError(
            path, f"too small: {w}x{h}, both sides must be at least {min_size} pixels"
        )
    return w, h


def _scan_one(path: str, min_size: Optional[int], max_pixels: int) -> tuple:
    """``(size, None, content fingerprint)`` for a usable file, ``(None, reason, None)`` otherwise;
    never raises. The bytes are hashed right after the decode read them (from the page cache)."""
    try:
        size = check_image(path, min_size=min_size, max_pixels=max_pixels)
        return size, None, file_fingerprint(path, content_hash=True)
    except ImageLoadError as exc:
        return None, exc.reason, None
    except Exception as exc:  # never let one odd file abort the scan of the others
        return None, f"cannot read image: {type(exc).__name__}: {exc}", None


def scan_images(
    paths: Iterable[PathLike],
    min_size: Optional[int] = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_workers: int = 0,
) -> ScanReport:
    """Check every file in ``paths`` (all of them, never stopping at the first problem).

    Each file is really decoded, so zero-byte, truncated or corrupt files, non-images with an
    image extension, decompression bombs and (with ``min_size``) images with a side shorter
    than ``min_size`` are all reported in ``ScanReport.bad`` with their reason.
    ``num_workers`` > 0 decodes in that many threads (PIL releases the GIL while decoding).
    """
    todo = [os.fspath(p) for p in paths]
    report = ScanReport()
    if num_workers > 0:
        with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="scan") as pool:
            results = list(pool.map(lambda p: _scan_one(p, min_size, max_pixels), todo))
    else:
        results = [_scan_one(p, min_size, max_pixels) for p in todo]
    for path, (size, reason, fingerprint) in zip(todo, results):
        if reason is None:
            report.good.append(path)
            report.sizes[path] = size
            report.fingerprints[path] = fingerprint
        else:
            report.bad.append((path, reason))
    return report


# --- resize / crop / tensor -----------------------------------------------------------------------


def validate_interpolation(name: Optional[str]) -> Optional[str]:
    """Return ``name`` lower-cased if it is a known ``--resize_interpolation``, else raise."""
    if name is None:
        return None
    key = name.lower()
    if key not in INTERPOLATIONS:
        raise UserError(
            f"--resize_interpolation {name!r} is not supported; use one of: "
            + ", ".join(INTERPOLATIONS)
        )
    return key


def _resample_filter(src: tuple, dst: tuple, interpolation: Optional[str]) -> int:
    key = validate_interpolation(interpolation)
    if key is not None:
        return INTERPOLATIONS[key]
    upscaling = dst[0] * dst[1] > src[0] * src[1]
    return Image.Resampling.LANCZOS if upscaling else Image.Resampling.BOX


def resize_and_crop(
    img: Image.Image,
    resized_size: Sequence[int],
    crop_left: int,
    crop_top: int,
    bucket_size: Sequence[int],
    flip: bool = False,
    interpolation: Optional[str] = None,
) -> np.ndarray:
    """Resize ``img`` to ``resized_size`` (w, h), crop ``bucket_size`` (w, h) at the given
    offset, optionally mirror left-right, and return a contiguous uint8 HWC array.

    ``interpolation`` is a ``--resize_interpolation`` name; ``None`` means area averaging when
    shrinking and LANCZOS when enlarging. ``RGB``, ``RGBA`` and ``L`` (a mask: HxW result)
    keep their mode, so a mask cropped with the same arguments stays aligned with the pixels;
    other modes are converted to RGB.
    """
    rw, rh = int(resized_size[0]), int(resized_size[1])
    bw, bh = int(bucket_size[0]), int(bucket_size[1])
    if not (0 <= crop_left and crop_left + bw <= rw and 0 <= crop_top and crop_top + bh <= rh):
        raise ValueError(
            f"crop {bw}x{bh} at ({crop_left}, {crop_top}) does not fit the resized image {rw}x{rh}"
        )
    if img.mode not in ("RGB", "RGBA", "L"):
        img = convert_to_rgb(img)
    if img.size != (rw, rh):
        img = img.resize((rw, rh), resample=_resample_filter(img.size, (rw, rh), interpolation))
    if (crop_left, crop_top, bw, bh) != (0, 0, rw, rh):
        img = img.crop((crop_left, crop_top, crop_left + bw, crop_top + bh))
    arr = np.asarray(img)
    if flip:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC (3 or 4 channels; alpha is dropped) -> float32 tensor ``[3, H, W]`` in [-1, 1]."""
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 or HxWx4 array, got shape {arr.shape}")
    t = torch.tensor(arr[:, :, :3], dtype=torch.float32)  # a copy: PIL arrays are read-only
    return t.permute(2, 0, 1).div_(127.5).sub_(1.0).contiguous()  # HWC -> CHW


# --- fingerprints ---------------------------------------------------------------------------------


def file_fingerprint(path: PathLike, content_hash: bool = False) -> str:
    """Identify the current version of a file for cache provenance.

    Cheap form ``stat:<size>:<mtime_ns>`` (any edit or copy that does not preserve mtime
    changes it); ``content_hash=True`` gives ``sha256:<hex>`` of the bytes (survives copies).
    """
    path = os.fspath(path)
    if not content_hash:
        st = os.stat(path)
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"
