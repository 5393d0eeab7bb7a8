"""Aspect-ratio bucketing: the bucket set, image-to-bucket assignment, crops and batches.

Sizes are always ``(width, height)`` in pixels. The bucket set and the assignment rule are the
ones sd-scripts uses, so a dataset lands in the same buckets here as there. One deliberate
difference: :func:`crop_for` reports the crop that is really applied to the resized image (the
offset SDXL's ``crop_top_left`` conditioning is meant to carry), where sd-scripts reports a
letterbox offset (its issue #1443).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from library.errors import UserError

Size = tuple[int, int]

#: SDXL's U-Net halves the latent twice, so pixel sizes must be multiples of 8 * 4 = 32.
SDXL_BUCKET_STEP_MULTIPLE = 32


def check_bucket_reso_steps(step: int, where: str = "--bucket_reso_steps") -> None:
    """Raise :class:`UserError` unless ``step`` is a positive multiple of 32 (what SDXL needs).

    ``where`` names the option or config entry in the message.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step <= 0:
        raise UserError(f"{where} = {step!r}: expected a positive integer such as 64 or 32")
    if step % SDXL_BUCKET_STEP_MULTIPLE != 0:
        lower = max(SDXL_BUCKET_STEP_MULTIPLE, step // 32 * 32)
        raise UserError(
            f"{where} = {step}: SDXL needs bucket sizes that are multiples of 32 (the U-Net "
            f"downsamples the 8x latent twice); use 64 (the default) or 32, e.g. {lower}"
        )


def make_bucket_resolutions(max_reso: Size, min_size: int = 256, max_size: int = 1024,
                            step: int = 64) -> list[Size]:
    """Return the sorted bucket sizes for a training area of ``max_reso[0] * max_reso[1]``.

    The square bucket is the largest multiple of ``step`` whose area fits; then for every width
    ``min_size, min_size + step, ... <= max_size`` the tallest step-multiple height that keeps the
    area within the maximum (and within ``max_size``) is added in both orientations, if at least
    ``min_size``.
    """
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // step) * step
    found: set[Size] = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, (max_area // width) // step * step)
        if height >= min_size:
            found.add((width, height))
            found.add((height, width))
        width += step
    return sorted(found)


def resized_size(image_size: Size, bucket: Size) -> Size:
    """Size to resize ``image_size`` to so that it covers ``bucket`` with its aspect ratio kept.

    An image relatively wider than the bucket is scaled to the bucket height, otherwise to the
    bucket width; the other side is rounded half up and never falls below the bucket.
    """
    img_w, img_h = image_size
    bucket_w, bucket_h = bucket
    if img_w / img_h > bucket_w / bucket_h:
        scale = bucket_h / img_h
    else:
        scale = bucket_w / img_w
    new_w = max(bucket_w, int(img_w * scale + 0.5))
    new_h = max(bucket_h, int(img_h * scale + 0.5))
    return new_w, new_h


def closest_bucket(image_size: Size, buckets: Sequence[Size]) -> tuple[Size, float]:
    """The bucket whose aspect ratio w/h is closest to the image's (first one on a tie), and the
    absolute aspect-ratio difference."""
    aspect = image_size[0] / image_size[1]
    best = buckets[0]
    best_err = abs(best[0] / best[1] - aspect)
    for bucket in buckets[1:]:
        err = abs(bucket[0] / bucket[1] - aspect)
        if err < best_err:
            best, best_err = bucket, err
    return best, best_err


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes: its bucket, the size it is resized to first, and the AR mismatch."""

    bucket: Size
    resized_size: Size
    ar_error: float


class BucketManager:
    """Assigns image sizes to buckets for one dataset.

    Modes: predefined buckets (``enable_bucket``, the default), ad-hoc buckets
    (``no_upscale``: images are only ever shrunk, ``min_size``/``max_size`` are ignored) and one
    fixed bucket (``enable_bucket=False``: every image is resized to cover ``resolution`` and
    cropped to it, centred or, with ``random_crop``, at a random offset).
    """

    def __init__(self, resolution: Size, *, enable_bucket: bool = True, min_size: int = 256,
                 max_size: int = 1024, step: int = 64, no_upscale: bool = False) -> None:
        check_bucket_reso_steps(step, "bucket_reso_steps")
        self.resolution: Size = (int(resolution[0]), int(resolution[1]))
        self.enable_bucket = enable_bucket
        self.no_upscale = no_upscale and enable_bucket
        self.step = step
        self.max_area = self.resolution[0] * self.resolution[1]
        self._seen: set[Size] = set()
        if not enable_bucket:
            self._predefined: list[Size] = [self.resolution]
        elif self.no_upscale:
            self._predefined = []
        else:
            self._predefined = make_bucket_resolutions(self.resolution, min_size, max_size, step)
        self._predefined_set = set(self._predefined)

    @property
    def buckets(self) -> list[Size]:
        """Predefined buckets, or (with ``no_upscale``) the buckets created so far, sorted."""
        return sorted(self._predefined_set | self._seen)

    def assign(self, image_size: Size, *, path: Optional[str] = None,
               random_crop: bool = False) -> BucketAssignment:
        """Pick the bucket for an image of ``image_size`` and the size to resize it to first.

        ``path`` only makes error messages name the file; ``random_crop`` is accepted for callers
        that pass it (the crop offset itself is drawn later by :func:`crop_for`).
        """
        width, height = int(image_size[0]), int(image_size[1])
        name = f"image {path} " if path else "image "
        if width <= 0 or height <= 0:
            raise UserError(f"{name}has an invalid size {width}x{height}")
        if not self.enable_bucket:
            result = self._assign_fixed(width, height, name, random_crop)
        elif self.no_upscale:
            result = self._assign_no_upscale(width, height, name)
        else:
            result = self._assign_predefined(width, height)
        self._seen.add(result.bucket)
        return result

    def _assign_fixed(self, width: int, height: int, name: str,
                      random_crop: bool) -> BucketAssignment:
        """Without bucketing, as sd-scripts caches it: resize to cover ``resolution``, then crop
        (centred, or at a random offset with ``random_crop``; see :func:`crop_for`)."""
        if (width, height) == self.resolution:
            return BucketAssignment(self.resolution, (width, height), 0.0)
        ar_error = abs(self.resolution[0] / self.resolution[1] - width / height)
        return BucketAssignment(self.resolution, resized_size((width, height), self.resolution), ar_error)

    def _assign_predefined(self, width: int, height: int) -> BucketAssignment:
        if (width, height) in self._predefined_set:
            return BucketAssignment((width, height), (width, height), 0.0)
        best, best_err = closest_bucket((width, height), self._predefined)
        return BucketAssignment(best, resized_size((width, height), best), best_err)

    def _round_to_step(self, value: float) -> int:
        return int(value / self.step + 0.5) * self.step

    def _assign_no_upscale(self, width: int, height: int, name: str) -> BucketAssignment:
        aspect = width / height
        if width * height > self.max_area:
            # Shrink to the maximum area, then snap one side to the step; keep whichever of
            # "snap the width" / "snap the height" distorts the aspect ratio less.
            ideal_w = math.sqrt(self.max_area * aspect)
            ideal_h = self.max_area / ideal_w
            w_snap = self._round_to_step(ideal_w)
            h_for_w = self._round_to_step(w_snap / aspect)
            h_snap = self._round_to_step(ideal_h)
            w_for_h = self._round_to_step(h_snap * aspect)
            err_w = abs(w_snap / h_for_w - aspect) if h_for_w else math.inf
            err_h = abs(w_for_h / h_snap - aspect) if h_snap else math.inf
            if err_w < err_h:
                size = (w_snap, int(w_snap / aspect + 0.5))
            else:
                size = (int(h_snap * aspect + 0.5), h_snap)
        else:
            size = (width, height)
        bucket = (size[0] - size[0] % self.step, size[1] - size[1] % self.step)
        if bucket[0] <= 0 or bucket[1] <= 0:
            raise UserError(
                f"{name}is {width}x{height}: a side is below bucket_reso_steps={self.step} "
                "after resizing, so no bucket fits; remove it or use a larger image"
            )
        return BucketAssignment(bucket, size, abs(bucket[0] / bucket[1] - aspect))


@dataclass(frozen=True)
class CropPlan:
    """How one image becomes one training sample: resize, then crop ``bucket`` at (left, top).

    ``left``/``top`` are pixel offsets in the resized image (in the flipped image when
    ``flipped``): exactly what SDXL's ``crop_top_left`` conditioning should be.
    """

    resized_size: Size
    bucket: Size
    left: int
    top: int
    flipped: bool = False

    @property
    def crop_ltrb(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the crop in the (possibly flipped) resized image."""
        return self.left, self.top, self.left + self.bucket[0], self.top + self.bucket[1]

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left), the order SDXL's size conditioning uses."""
        return self.top, self.left

    def flip(self) -> "CropPlan":
        """The same crop seen after a horizontal flip: left becomes resized_w - left - bucket_w."""
        mirrored = self.resized_size[0] - self.left - self.bucket[0]
        return replace(self, left=mirrored, flipped=not self.flipped)


def crop_for(image_size: Size, bucket: Size, random_crop: bool, rng: Optional[random.Random],
             *, flip: bool = False, resized: Optional[Size] = None) -> CropPlan:
    """Plan the resize and crop that turn an image of ``image_size`` into a ``bucket`` sample.

    The image is resized to ``resized`` (default: :func:`resized_size`, the cover size; pass
    :attr:`BucketAssignment.resized_size`), then the overflow is cropped: centred, or at a
    uniformly random offset with ``random_crop`` (drawn from ``rng``). With ``flip`` the returned
    offsets are those of the horizontally flipped sample.
    """
    res_w, res_h = resized if resized is not None else resized_size(image_size, bucket)
    bucket_w, bucket_h = bucket
    if res_w < bucket_w or res_h < bucket_h:
        raise ValueError(f"resized size {res_w}x{res_h} does not cover bucket "
                         f"{bucket_w}x{bucket_h}")
    spare_w, spare_h = res_w - bucket_w, res_h - bucket_h
    if random_crop:
        if rng is None:
            raise ValueError("random_crop needs an rng")
        left = rng.randint(0, spare_w) if spare_w else 0
        top = rng.randint(0, spare_h) if spare_h else 0
    else:
        left, top = spare_w // 2, spare_h // 2
    plan = CropPlan((res_w, res_h), (bucket_w, bucket_h), left, top)
    return plan.flip() if flip else plan


def max_bucket_warning(resolution: int | Size, max_bucket_reso: int,
                       step: int = 64) -> Optional[str]:
    """A warning when ``max_bucket_reso`` clips the non-square buckets (sd-scripts issue #731).

    With ``max_bucket_reso`` at or below the resolution's long side, every non-square bucket
    is capped to that side, so e.g. 16:9 images train far below the target area. Returns None
    when the setting is fine.
    """
    res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    long_side = max(res)
    if max_bucket_reso > long_side:
        return None
    # Show the damage on a 16:9 image.
    buckets = make_bucket_resolutions((res[0], res[1]), min(step, max_bucket_reso),
                                      max_bucket_reso, step)
    bucket, _ = closest_bucket((1920, 1080), buckets)
    share = bucket[0] * bucket[1] / (res[0] * res[1])
    return (
        f"max_bucket_reso = {max_bucket_reso} is not larger than the resolution "
        f"{res[0]}x{res[1]}: every non-square bucket is capped at {max_bucket_reso} px per side "
        f"and trains below the target area (a 16:9 image gets the {bucket[0]}x{bucket[1]} "
        f"bucket, {share:.0%} of the area). For SDXL set max_bucket_reso = {2 * long_side}."
    )


def bucket_batches(assignments: Sequence[Size], batch_size: int, seed: int, epoch: int,
                   shuffle: bool = True) -> list[list[int]]:
    """Group sample indices into batches that never mix buckets, in a reproducible order.

    ``assignments[i]`` is the bucket of sample ``i`` (repeats already expanded). Inside each
    bucket the samples are shuffled, cut into batches of ``batch_size`` (the last may be short),
    and the order of all batches is shuffled; both use a generator seeded by ``(seed, epoch)``.
    With ``shuffle=False`` the order is by bucket, then by sample index.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    by_bucket: dict[Size, list[int]] = defaultdict(list)
    for index, bucket in enumerate(assignments):
        by_bucket[tuple(bucket)].append(index)
    rng = random.Random(f"bucket-batches:{seed}:{epoch}")
    batches: list[list[int]] = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        if shuffle:
            rng.shuffle(members)
        batches.extend(members[i:i + batch_size] for i in range(0, len(members), batch_size))
    if shuffle:
        rng.shuffle(batches)
    return batches


def bucket_summary(assignments: Sequence[BucketAssignment]) -> dict:
    """Counts per bucket and the mean aspect-ratio error, as sd-scripts' ``ss_bucket_info``."""
    counts: dict[Size, int] = defaultdict(int)
    for item in assignments:
        counts[item.bucket] += 1
    buckets = {
        str(i): {"resolution": list(bucket), "count": counts[bucket]}
        for i, bucket in enumerate(sorted(counts))
    }
    mean_error = sum(a.ar_error for a in assignments) / len(assignments) if assignments else 0.0
    return {"buckets": buckets, "mean_img_ar_error": mean_error}
