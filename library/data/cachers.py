"""The cachers: compute latents / text-encoder outputs for a list of items and keep them.

The cachers are model-free: the encoder is an injected callable, so the same code serves the
real VAE, the tiny test model and stand-ins in unit tests. Entries valid for the current run (see
the provenance rules in :mod:`library.data.cache`) are reused; the rest are computed in batches
and kept in memory or written to disk (atomically, with provenance). These classes used to live
in :mod:`library.data.cache`; imports flow one way, cachers -> cache.

The last section holds the pieces that connect real models to them: :class:`VaeEncoder` and
:class:`TextEncoderPairEncoder` (the ``encode_fn`` callables) and :func:`module_fingerprint`,
the weight-content id that trainers and caching tools must both use as ``vae_id`` / ``te_id``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from library.data.cache import (
    LatentCacheEntry,
    LatentProvenance,
    TextEncoderCacheEntry,
    TextEncoderProvenance,
    caption_sha256,
    latent_cache_candidates,
    load_latents,
    load_te_outputs,
    save_latents,
    save_te_outputs,
    te_cache_path,
)
from library.data.images import (
    DEFAULT_MAX_PIXELS,
    convert_to_rgb,
    file_fingerprint,
    load_image,
    resize_and_crop,
    to_tensor,
)
from library.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "CacheRunReport", "LatentCacheItem", "LatentCacheOptions", "latent_provenance",
    "load_cached_latents", "LatentCacher", "TextEncoderCacheItem", "TextEncoderCacheOptions",
    "te_provenance", "load_cached_te_outputs", "TextEncoderOutputCacher", "module_fingerprint",
    "vae_cache_dtype", "VaeEncoder", "TextEncoderPairEncoder",
]


@dataclass
class CacheRunReport:
    """Outcome of a cacher run; ``entries`` (key -> entry) is filled only when caching in memory."""

    computed: int = 0
    reused: int = 0
    entries: dict = field(default_factory=dict)


class _Cacher:
    """Shared skeleton: reuse valid entries, compute the rest, keep them in memory or on disk."""

    desc = unit = ""

    def __init__(self, encode_fn: Callable, model_id: str, options: object) -> None:
        self.encode_fn = encode_fn
        self.options = options
        self.entries: dict = {}  # in-memory entries by key
        self._model_id = model_id

    def cache(self, items: Sequence) -> CacheRunReport:
        """Compute each entry of ``items`` that is missing or stale; see :class:`CacheRunReport`."""
        o = self.options
        report = CacheRunReport()
        todo = []
        for item in items:
            expect = self._provenance(item)
            if o.skip_existing and self._is_cached(item, expect):
                report.reused += 1
            else:
                todo.append((item, expect))
        with tqdm(total=len(todo), desc=self.desc, unit=self.unit,
                  disable=not o.show_progress) as bar:
            for done in self._compute(todo):
                report.computed += done
                bar.update(done)
        if not o.to_disk:
            report.entries = {self._key(it): self.entries[self._key(it)] for it in items}
        logger.info("%s: %d computed, %d reused", self.desc, report.computed, report.reused)
        return report

    def _is_cached(self, item: object, expect: object) -> bool:
        if not self.options.to_disk:
            entry = self.entries.get(self._key(item))
            return entry is not None and self._usable(entry, expect)
        if self.options.skip_cache_check:
            return any(os.path.isfile(p) for p in self._paths(item))
        return self._load(item, expect) is not None

    def _put(self, item: object, entry: object, expect: object) -> None:
        if self.options.to_disk:
            self._save(self._paths(item)[-1], entry, expect)
        else:
            self.entries[self._key(item)] = entry


@dataclass
class LatentCacheItem:
    """One image to cache, already placed in its bucket by the dataset."""

    image_path: str
    original_size: tuple  # (W, H) after EXIF orientation
    bucket_reso: tuple  # (W, H)
    resized_size: tuple  # (W, H) the image is resized to before cropping
    crop_left_top: tuple  # (left, top) offset of the bucket-sized crop in the resized image
    crop_ltrb: tuple  # (l, t, r, b) recorded for size conditioning (unflipped)
    cache_path: Optional[str] = None  # default: latent_cache_path(image_path, original_size)
    fingerprint: Optional[str] = None  # content hash taken by the dataset scan (None: fingerprint now)


@dataclass
class LatentCacheOptions:
    """Settings of a :class:`LatentCacher` (``--vae_batch_size``, ``--cache_latents_to_disk``)."""

    vae_dtype: str = "float32"
    vae_batch_size: int = 1
    to_disk: bool = False
    skip_existing: bool = True
    skip_cache_check: bool = False  # trust existing files (sd-scripts option): stale risk
    flip_aug: bool = False
    alpha_mask: bool = False
    interpolation: Optional[str] = None
    content_hash: bool = False  # fingerprint images by sha256 instead of size + mtime
    num_workers: int = 2  # threads loading images ahead of the encoder (0 = inline)
    max_pixels: int = DEFAULT_MAX_PIXELS
    show_progress: bool = True


def latent_provenance(item: LatentCacheItem, vae_id: str, options: LatentCacheOptions
                      ) -> LatentProvenance:
    """The provenance the current run gives ``item``: its content hash from the dataset scan, else
    a fingerprint of the file taken now (a content hash with ``options.content_hash``)."""
    fingerprint = item.fingerprint or file_fingerprint(item.image_path, content_hash=options.content_hash)
    return LatentProvenance(
        image_fingerprint=fingerprint,
        original_size=tuple(int(v) for v in item.original_size),
        bucket_reso=tuple(int(v) for v in item.bucket_reso),
        crop_ltrb=tuple(int(v) for v in item.crop_ltrb),
        vae_id=vae_id, dtype=options.vae_dtype, interpolation=options.interpolation,
    )


def _latent_paths(item: LatentCacheItem) -> list:
    """Where to look, in order; the last one is where a new entry is written."""
    if item.cache_path:
        return [item.cache_path]
    return latent_cache_candidates(item.image_path, item.original_size)


def load_cached_latents(
    item: LatentCacheItem, vae_id: str, options: LatentCacheOptions,
    expect: Optional[LatentProvenance] = None,
) -> Optional[LatentCacheEntry]:
    """The first valid on-disk entry for ``item`` (legacy name first), or None."""
    expect = expect or latent_provenance(item, vae_id, options)
    for path in _latent_paths(item):
        entry = load_latents(
            path, expect, options.flip_aug, image_path=item.image_path,
            require_alpha_mask=options.alpha_mask, check_provenance=not options.skip_cache_check,
        )
        if entry is not None:
            return entry
    return None


def _prefetched(batches: list, prepare: Callable, num_workers: int) -> Iterator:
    """Yield ``(batch, prepare(batch))`` in order, preparing up to ``num_workers + 1`` ahead."""
    if num_workers <= 0:
        for batch in batches:
            yield batch, prepare(batch)
        return
    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="cache-load")
    try:
        pending: deque = deque()
        upcoming = iter(batches)
        for batch in upcoming:
            pending.append((batch, pool.submit(prepare, batch)))
            if len(pending) > num_workers:
                break
        while pending:
            batch, future = pending.popleft()
            nxt = next(upcoming, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(prepare, nxt)))
            yield batch, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class LatentCacher(_Cacher):
    """Encode images to latents with an injected ``encode_fn`` and cache them.

    ``encode_fn(pixels)``: float32 CPU tensor [B, 3, H, W] in [-1, 1] -> tensor [B, C, H/8, W/8]
    (the callable moves data to its device / dtype and samples the VAE posterior). Items of the
    same bucket are batched ``vae_batch_size`` at a time; entries valid for this run are reused.
    In-memory entries (``to_disk=False``) are kept in ``entries`` by image path.
    """

    desc, unit = "caching latents", "img"

    def __init__(self, encode_fn: Callable, vae_id: str,
                 options: Optional[LatentCacheOptions] = None) -> None:
        super().__init__(encode_fn, vae_id, options or LatentCacheOptions())
        self.vae_id = vae_id

    def _provenance(self, item: LatentCacheItem) -> LatentProvenance:
        return latent_provenance(item, self.vae_id, self.options)

    def _key(self, item: LatentCacheItem) -> str:
        return item.image_path

    _paths = staticmethod(_latent_paths)
    _save = staticmethod(save_latents)

    def _load(self, item: LatentCacheItem, expect: LatentProvenance) -> Optional[LatentCacheEntry]:
        return load_cached_latents(item, self.vae_id, self.options, expect)

    def _usable(self, entry: LatentCacheEntry, expect: LatentProvenance) -> bool:
        o = self.options
        return (entry.provenance == expect
                and (not o.flip_aug or entry.latents_flipped is not None)
                and (not o.alpha_mask or entry.alpha_mask is not None))

    def _compute(self, todo: list) -> Iterator:
        by_bucket: dict = {}
        for pair in todo:
            by_bucket.setdefault(tuple(pair[0].bucket_reso), []).append(pair)
        size = max(1, self.options.vae_batch_size)
        batches = [group[i:i + size] for _, group in sorted(by_bucket.items())
                   for i in range(0, len(group), size)]
        stream = _prefetched(batches, self._prepare, self.options.num_workers)
        with contextlib.closing(stream):
            for batch, (pixels, masks) in stream:
                self._store(batch, pixels, masks)
                yield len(batch)

    def _load_pixels(self, item: LatentCacheItem) -> tuple:
        o = self.options
        img = load_image(item.image_path, keep_alpha=o.alpha_mask, max_pixels=o.max_pixels)
        if img.size != tuple(item.original_size):
            raise UserError(
                f"{item.image_path}: image is {img.size[0]}x{img.size[1]} but the dataset saw "
                f"{item.original_size[0]}x{item.original_size[1]}; it changed during the run, "
                "start again"
            )
        args = (item.resized_size, item.crop_left_top[0], item.crop_left_top[1],
                item.bucket_reso, False, o.interpolation)
        # with alpha_mask the pixels are still composited on white, exactly as without it
        arr = resize_and_crop(convert_to_rgb(img) if o.alpha_mask else img, *args)
        mask = None
        if o.alpha_mask:
            mask = resize_and_crop(img.getchannel("A"), *args).astype(np.float32) / 255.0
        return to_tensor(arr), mask

    def _prepare(self, batch: list) -> tuple:
        loaded = [self._load_pixels(item) for item, _ in batch]
        return torch.stack([t for t, _ in loaded]), [m for _, m in loaded]

    def _encode(self, pixels: torch.Tensor, batch: list) -> np.ndarray:
        with torch.no_grad():
            out = self.encode_fn(pixels)
        b, _, h, w = pixels.shape
        if not (isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[0] == b
                and tuple(out.shape[2:]) == (h // 8, w // 8)):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"encode_fn returned {got} for pixels {tuple(pixels.shape)}; "
                             "expected [B, C, H/8, W/8]")
        arr = out.detach().float().cpu().numpy()
        bad = [it.image_path for i, (it, _) in enumerate(batch) if not np.isfinite(arr[i]).all()]
        if bad:
            raise UserError(f"the VAE produced NaN/inf latents for {', '.join(bad)}; "
                            "run the VAE in float32 (--no_half_vae)")
        return arr

    def _store(self, batch: list, pixels: torch.Tensor, masks: list) -> None:
        latents = self._encode(pixels, batch)
        flipped = self._encode(pixels.flip(3), batch) if self.options.flip_aug else None  # mirror W
        for i, (item, expect) in enumerate(batch):
            entry = LatentCacheEntry(
                latents=latents[i], original_size=tuple(item.original_size),
                crop_ltrb=tuple(item.crop_ltrb),
                latents_flipped=None if flipped is None else flipped[i],
                alpha_mask=masks[i], provenance=expect,
            )
            self._put(item, entry, expect)


@dataclass
class TextEncoderCacheItem:
    """One caption to cache; ``key`` (the image path) names the file and the in-memory entry."""

    key: str
    caption: str
    cache_path: Optional[str] = None  # default: te_cache_path(key)
    source_path: Optional[str] = None  # caption file / metadata JSON the caption came from


@dataclass
class TextEncoderCacheOptions:
    """Settings of a :class:`TextEncoderOutputCacher`."""

    batch_size: int = 1
    to_disk: bool = False
    skip_existing: bool = True
    skip_cache_check: bool = False
    max_token_length: Optional[int] = None
    weighted_captions: bool = False
    show_progress: bool = True


def te_provenance(caption: str, te_id: str, options: TextEncoderCacheOptions
                  ) -> TextEncoderProvenance:
    """The provenance the current run gives a caption."""
    return TextEncoderProvenance(caption_sha256(caption), te_id, options.max_token_length,
                                 bool(options.weighted_captions))


def load_cached_te_outputs(item: TextEncoderCacheItem, te_id: str,
                           options: TextEncoderCacheOptions) -> Optional[TextEncoderCacheEntry]:
    """The valid on-disk entry for ``item``, or None."""
    return load_te_outputs(
        item.cache_path or te_cache_path(item.key), te_provenance(item.caption, te_id, options),
        source_path=item.source_path, check_provenance=not options.skip_cache_check,
    )


class TextEncoderOutputCacher(_Cacher):
    """Cache text-encoder outputs with an injected ``encode_fn``.

    ``encode_fn(captions: list[str]) -> (hidden1 [B, T, C1], hidden2 [B, T, C2], pool2 [B, C2])``.
    Identical captions are encoded once; ``batch_size`` distinct captions per call.
    """

    desc, unit = "caching text encoder outputs", "caption"

    def __init__(self, encode_fn: Callable, te_id: str,
                 options: Optional[TextEncoderCacheOptions] = None) -> None:
        super().__init__(encode_fn, te_id, options or TextEncoderCacheOptions())
        self.te_id = te_id

    def _provenance(self, item: TextEncoderCacheItem) -> TextEncoderProvenance:
        return te_provenance(item.caption, self.te_id, self.options)

    def _key(self, item: TextEncoderCacheItem) -> str:
        return item.key

    def _paths(self, item: TextEncoderCacheItem) -> list:
        return [item.cache_path or te_cache_path(item.key)]

    _save = staticmethod(save_te_outputs)

    def _load(self, item: TextEncoderCacheItem, expect: object) -> Optional[TextEncoderCacheEntry]:
        return load_cached_te_outputs(item, self.te_id, self.options)

    def _usable(self, entry: TextEncoderCacheEntry, expect: TextEncoderProvenance) -> bool:
        return entry.provenance == expect

    def _compute(self, todo: list) -> Iterator:
        by_caption: dict = {}
        for item, expect in todo:
            by_caption.setdefault(item.caption, []).append((item, expect))
        captions = list(by_caption)
        size = max(1, self.options.batch_size)
        for start in range(0, len(captions), size):
            chunk = captions[start:start + size]
            h1, h2, pool = self._encode(chunk, by_caption)
            for j, caption in enumerate(chunk):
                for item, expect in by_caption[caption]:
                    self._put(item, TextEncoderCacheEntry(h1[j], h2[j], pool[j], expect), expect)
                yield len(by_caption[caption])

    def _encode(self, chunk: list, by_caption: Mapping) -> tuple:
        with torch.no_grad():
            outs = self.encode_fn(list(chunk))
        h1, h2, pool = (t.detach().float().cpu().numpy() for t in outs)
        n = len(chunk)
        if not (h1.ndim == 3 and h2.ndim == 3 and pool.ndim == 2 and h1.shape[0] == n
                and h2.shape[0] == n and pool.shape[0] == n and h1.shape[1] == h2.shape[1]):
            raise ValueError(f"encode_fn returned shapes {h1.shape}, {h2.shape}, {pool.shape} for "
                             f"{n} captions; expected [B,T,C1], [B,T,C2], [B,C2]")
        for j, caption in enumerate(chunk):
            if not all(np.isfinite(a[j]).all() for a in (h1, h2, pool)):
                key = by_caption[caption][0][0].key
                raise UserError(f"the text encoders produced NaN/inf for the caption of {key}; "
                                "run them in float32")
        return h1, h2, pool


# --- encoders and model identities for the cachers ------------------------------------------------


FINGERPRINT_SAMPLE = 4096  # values per tensor taken from its start, its end and spread over it


def module_fingerprint(*modules: torch.nn.Module) -> str:
    """A content id of model weights, for the ``vae_id`` / ``te_id`` of cache provenance.

    blake2b over every tensor's name and shape and, of its values as float32, the first and last
    :data:`FINGERPRINT_SAMPLE` and as many more spread evenly over the rest: the same weights give
    the same id wherever the file lives (renamed, copied, single file or diffusers folder) and
    whatever dtype they were loaded in without rounding (an fp16 file read as fp16 or as fp32);
    other weights (another VAE, a fine-tuned text encoder, a file replaced at the same path)
    another one. Trainers and caching tools both use it, so their caches are interchangeable.
    Computed once per run: well under a second for SDXL's VAE and text encoders (docs/reliability.md).
    """
    digest = hashlib.blake2b(digest_size=12)
    n = FINGERPRINT_SAMPLE
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            if flat.numel() > 3 * n:
                middle = n + torch.arange(n, device=flat.device) * ((flat.numel() - 2 * n) // n)
                flat = torch.cat([flat[:n], flat[middle], flat[-n:]])
            digest.update(f"{name}:{tuple(tensor.shape)}".encode())
            digest.update(flat.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def vae_cache_dtype(mixed_precision: str, no_half_vae: bool) -> torch.dtype:
    """The dtype the VAE encodes cached latents in, for trainers and tools alike: float32 unless
    bf16 mixed precision without ``--no_half_vae`` (fp16 overflows in the SDXL VAE)."""
    return torch.bfloat16 if mixed_precision == "bf16" and not no_half_vae else torch.float32


def sample_posterior_per_image(posterior: Any, pixels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A sample of the VAE posterior whose noise is seeded by each image's own pixels (and ``seed``).

    The latents of an image are then the same whatever batch, order or process encoded it, so a
    cache filled by several processes equals one filled by a single process. Noise is drawn in
    float32 on the CPU (the same on every device). Returns float32 [B, C, h, w].
    """
    mean = posterior.mean.float()
    std = posterior.std.float()
    noise = []
    for image in pixels:
        digest = hashlib.blake2b(image.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=8,
                                 key=str(seed).encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        noise.append(torch.randn(tuple(mean.shape[1:]), generator=gen, dtype=torch.float32))
    return mean + std * torch.stack(noise).to(mean.device)


class VaeEncoder:
    """``encode_fn`` for :class:`LatentCacher`: pixels [B, 3, H, W] in [-1, 1] -> latents
    [B, 4, H/8, W/8] float32, *unscaled*, sampled from the VAE posterior (as sd-scripts samples,
    not the mean) with noise seeded per image (:func:`sample_posterior_per_image`)."""

    def __init__(self, vae: torch.nn.Module, device: torch.device | str, dtype: torch.dtype,
                 seed: int = 0) -> None:
        self.device, self.dtype = torch.device(device), dtype
        if next(vae.parameters()).dtype != dtype:
            vae = vae.to(dtype=dtype)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.seed = seed

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            posterior = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
            return sample_posterior_per_image(posterior, pixels, self.seed)


class TextEncoderPairEncoder:
    """``encode_fn`` for :class:`TextEncoderOutputCacher`: captions -> (hidden1 [B, T, C1],
    hidden2 [B, T, C2], pool2 [B, P]) from SDXL's two text encoders, optionally with
    A1111-style caption weights (``--weighted_captions``)."""

    def __init__(self, tokenizers: tuple, text_encoders: tuple, max_token_length: Optional[int],
                 weighted: bool = False) -> None:
        self.tokenizers, self.text_encoders = tokenizers, text_encoders
        self.max_token_length, self.weighted = max_token_length, weighted

    def __call__(self, captions: list) -> tuple:
        with torch.no_grad():
            if self.weighted:
                from library.text.weighting import encode_weighted_prompt

                context, pool = encode_weighted_prompt(self.tokenizers, self.text_encoders, captions,
                                                       self.max_token_length)
                width = self.text_encoders[0].config.hidden_size
                return context[..., :width], context[..., width:], pool
            from library.diffusion.conditioning import TextConditioner

            cond = TextConditioner(*self.tokenizers, *self.text_encoders, self.max_token_length)
            return cond.encode_ids(*cond.tokenize(captions))
