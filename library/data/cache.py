"""Latent and text-encoder-output caches, on disk (sd-scripts compatible ``.npz``) or in memory.

File layout (the same files sd-scripts reads and writes):

* latents: ``<image path without ext>_<W:04d>x<H:04d>_sdxl.npz`` (W x H = original image size)
  with ``latents`` float32 (C, h, w) *unscaled*, ``original_size`` [W, H], ``crop_ltrb``
  [l, t, r, b], optional ``latents_flipped`` and ``alpha_mask`` (H, W). Also read: the
  multi-resolution layout with ``_{h}x{w}`` suffixed keys (``latents_128x128`` ...) and the legacy
  ``<image path without ext>.npz`` written by ``prepare_buckets_latents.py`` (tried first).
* text-encoder outputs: ``<image path without ext>_te_outputs.npz`` with ``hidden_state1``
  (T, C1), ``hidden_state2`` (T, C2), ``pool2`` (C2,) float32.

Provenance: every file we write also holds ``sdxl_trainer_provenance``, a JSON string (numpy
unicode array) saying what produced it (image fingerprint, sizes, crop, VAE / text-encoder
identity, dtype, caption hash, ...) plus a digest of each array. An entry is used only when that
record matches what the current run would produce; otherwise it is recomputed.

Rule for files without provenance (written by sd-scripts): a latent file is accepted only when
its latent shape equals bucket / 8, its ``original_size`` (if stored) matches, and the image file
was last modified strictly *before* the cache file; a text-encoder file only when T matches
``max_token_length`` and the caption's source file (caption file or metadata JSON) was modified
strictly before it. Anything else is recomputed and overwritten with a file that has provenance.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

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

PROVENANCE_KEY = "sdxl_trainer_provenance"
FORMAT_VERSION = 1
_LATENT_KEYS = ("latents", "original_size", "crop_ltrb", "latents_flipped", "alpha_mask")


# --- paths ----------------------------------------------------------------------------------------


def _stem(image_path: str) -> str:
    return os.path.splitext(os.fspath(image_path))[0]


def latent_cache_path(image_path: str, original_size_wh: Sequence[int]) -> str:
    """``<image path without ext>_<W:04d>x<H:04d>_sdxl.npz`` for an image of original size W x H."""
    w, h = int(original_size_wh[0]), int(original_size_wh[1])
    return f"{_stem(image_path)}_{w:04d}x{h:04d}_sdxl.npz"


def legacy_latent_cache_path(image_path: str) -> str:
    """``<image path without ext>.npz``, the name ``prepare_buckets_latents.py`` writes."""
    return _stem(image_path) + ".npz"


def latent_cache_candidates(image_path: str, original_size_wh: Sequence[int]) -> list:
    """Paths to look for a latent cache, in sd-scripts' order of preference (legacy first)."""
    return [legacy_latent_cache_path(image_path), latent_cache_path(image_path, original_size_wh)]


def te_cache_path(image_path: str) -> str:
    """``<image path without ext>_te_outputs.npz``."""
    return _stem(image_path) + "_te_outputs.npz"


# --- provenance records ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentProvenance:
    """What produces a latent entry; any difference means the entry must be recomputed."""

    image_fingerprint: str
    original_size: tuple  # (W, H) of the image after EXIF orientation
    bucket_reso: tuple  # (W, H) of the bucket = latent size * 8
    crop_ltrb: tuple  # (left, top, right, bottom) stored for size conditioning
    vae_id: str
    dtype: str  # dtype the VAE ran in, e.g. "float32"
    interpolation: Optional[str] = None  # --resize_interpolation (None = default rule)


@dataclass(frozen=True)
class TextEncoderProvenance:
    """What produces a text-encoder-output entry."""

    caption_sha256: str
    te_id: str
    max_token_length: Optional[int]
    weighted_captions: bool


def caption_sha256(caption: str) -> str:
    """Hex sha256 of the UTF-8 caption text, as stored in :class:`TextEncoderProvenance`."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


def expected_token_count(max_token_length: Optional[int]) -> int:
    """Sequence length T of cached hidden states: 77 / 152 / 227 for None (75) / 150 / 225."""
    return (max_token_length or 75) + 2


def _plain(value: object) -> object:
    """Tuples -> lists etc., i.e. the value as it reads back from JSON."""
    return json.loads(json.dumps(value))


def _digest(arr: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(arr).data, digest_size=16).hexdigest()


def _record_valid(stored: Mapping, kind: str, expect: object, arrays: Mapping) -> bool:
    """True when a stored provenance record equals ``expect`` and every array still has the
    digest recorded at write time (sd-scripts rewrites keys in place, keeping our record)."""
    if stored.get("kind") != kind or stored.get("version") != FORMAT_VERSION:
        return False
    if any(stored.get(k) != v for k, v in _plain(asdict(expect)).items()):
        return False
    digests = stored.get("digests", {})
    return set(digests) == set(arrays) and all(digests[k] == _digest(a) for k, a in arrays.items())


def _save_with_record(path: str, arrays: dict, kind: str, provenance: object, durable: bool,
                      **extra: object) -> None:
    record = {"kind": kind, "version": FORMAT_VERSION, **_plain(asdict(provenance)), **extra}
    record["digests"] = {k: _digest(a) for k, a in arrays.items()}
    arrays[PROVENANCE_KEY] = np.array(json.dumps(record, sort_keys=True))
    _atomic_savez(path, arrays, durable=durable)


# --- npz I/O --------------------------------------------------------------------------------------


def _atomic_savez(path: str, arrays: Mapping, durable: bool = True) -> None:
    """Write ``arrays`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                   dir=folder)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise UserError(
            f"cannot write cache file {path}: {exc.strerror or exc}; check free disk space and "
            "write permission of the image folder, or cache in memory instead of to disk"
        ) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _read_npz(path: str) -> Optional[dict]:
    """All arrays of ``path`` as a dict, or None when missing or unreadable (logged)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:  # truncated zip, bad header, pickled object, ...
        logger.warning("ignoring unreadable cache file %s (%s); it will be recomputed", path, exc)
        return None


def _read_provenance(data: Mapping) -> Optional[dict]:
    raw = data.get(PROVENANCE_KEY)
    if raw is None:
        return None
    try:
        value = json.loads(str(raw))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _older_than(source_path: Optional[str], cache_path: str) -> bool:
    """True when ``source_path`` exists and was modified strictly before ``cache_path``."""
    if source_path is None:
        return False
    try:
        return os.stat(source_path).st_mtime_ns < os.stat(cache_path).st_mtime_ns
    except OSError:
        return False


# --- latent entries -------------------------------------------------------------------------------


@dataclass
class LatentCacheEntry:
    """One image's cached latents (arrays float32; ``latents`` unscaled, shape (C, h, w))."""

    latents: np.ndarray
    original_size: tuple  # (W, H)
    crop_ltrb: tuple  # (left, top, right, bottom)
    latents_flipped: Optional[np.ndarray] = None
    alpha_mask: Optional[np.ndarray] = None  # (H, W) in [0, 1] at bucket resolution
    provenance: Optional[LatentProvenance] = None  # None: accepted from a file without one


def _pick_latent_arrays(data: Mapping, latent_hw: tuple, own: bool) -> Optional[dict]:
    """Select the key set to read: our plain keys, else ``_{h}x{w}``-suffixed, else plain."""
    suffix = f"_{latent_hw[0]}x{latent_hw[1]}"
    if not own and "latents" + suffix in data:
        return {k: data[k + suffix] for k in _LATENT_KEYS if k + suffix in data}
    if "latents" in data:
        return {k: data[k] for k in _LATENT_KEYS if k in data}
    return None


def _latent_shapes_ok(arrays: Mapping, latent_hw: tuple) -> bool:
    lat = arrays["latents"]
    if lat.ndim != 3 or tuple(lat.shape[1:]) != latent_hw:
        return False
    flipped = arrays.get("latents_flipped")
    if flipped is not None and flipped.shape != lat.shape:
        return False
    if not np.isfinite(lat).all() or (flipped is not None and not np.isfinite(flipped).all()):
        return False
    mask = arrays.get("alpha_mask")
    return mask is None or tuple(mask.shape) == (latent_hw[0] * 8, latent_hw[1] * 8)


def load_latents(
    path: str,
    expect: LatentProvenance,
    require_flipped: bool = False,
    *,
    image_path: Optional[str] = None,
    require_alpha_mask: bool = False,
    check_provenance: bool = True,
) -> Optional[LatentCacheEntry]:
    """Read a latent cache file; return None (= recompute) unless it is valid for ``expect``.

    Invalid means: missing or unreadable, latent shape != bucket / 8, non-finite values, a
    required ``latents_flipped`` / ``alpha_mask`` absent, or a provenance record that differs
    from ``expect`` (or arrays that no longer match its digests). A file without provenance
    is accepted only under the rule in the module docstring, which needs ``image_path``.
    ``check_provenance=False`` (``--skip_cache_check``) keeps only the shape checks.
    """
    data = _read_npz(path)
    if data is None:
        return None
    bw, bh = expect.bucket_reso
    latent_hw = (int(bh) // 8, int(bw) // 8)
    stored = _read_provenance(data)
    arrays = _pick_latent_arrays(data, latent_hw, own=stored is not None)
    if arrays is None or not _latent_shapes_ok(arrays, latent_hw):
        return None
    if require_flipped and "latents_flipped" not in arrays:
        return None
    if require_alpha_mask and "alpha_mask" not in arrays:
        return None
    if check_provenance:
        if stored is not None:
            if not _record_valid(stored, "latents", expect, arrays):
                return None
        else:
            size = arrays.get("original_size")
            if size is not None and [int(v) for v in np.ravel(size)] != list(expect.original_size):
                return None
            if not _older_than(image_path, path):
                return None
    return _latent_entry(arrays, expect, own=stored is not None and check_provenance)


def _latent_entry(arrays: Mapping, expect: LatentProvenance, own: bool) -> LatentCacheEntry:
    def f32(key: str) -> Optional[np.ndarray]:
        a = arrays.get(key)
        return None if a is None else np.asarray(a, dtype=np.float32)

    # Files from sd-scripts store a letterbox-style crop_ltrb (not the crop actually applied,
    # sd-scripts issue #1443); their pixels come from the same centre crop, so the crop this run
    # computed is the truthful one.
    crop = tuple(int(v) for v in np.ravel(arrays["crop_ltrb"])) if own else tuple(expect.crop_ltrb)
    return LatentCacheEntry(
        latents=f32("latents"),
        original_size=tuple(int(v) for v in expect.original_size),
        crop_ltrb=crop,
        latents_flipped=f32("latents_flipped"),
        alpha_mask=f32("alpha_mask"),
        provenance=expect if own else None,
    )


def save_latents(
    path: str, entry: LatentCacheEntry, provenance: LatentProvenance, durable: bool = True
) -> None:
    """Write ``entry`` with its provenance to ``path`` atomically (temp file + ``os.replace``).

    The file is written fresh (no keys merged from an older file, so no stale resolution or
    flipped latents survive). ``durable`` fsyncs before the rename.
    """
    arrays = {
        "latents": np.ascontiguousarray(entry.latents, dtype=np.float32),
        "original_size": np.asarray(entry.original_size, dtype=np.int64),
        "crop_ltrb": np.asarray(entry.crop_ltrb, dtype=np.int64),
    }
    if entry.latents_flipped is not None:
        arrays["latents_flipped"] = np.ascontiguousarray(entry.latents_flipped, dtype=np.float32)
    if entry.alpha_mask is not None:
        arrays["alpha_mask"] = np.ascontiguousarray(entry.alpha_mask, dtype=np.float32)
    _save_with_record(path, arrays, "latents", provenance, durable,
                      flipped=entry.latents_flipped is not None)


# --- text-encoder entries -------------------------------------------------------------------------


@dataclass
class TextEncoderCacheEntry:
    """One caption's text-encoder outputs (float32): (T, C1), (T, C2) and (C2,)."""

    hidden_state1: np.ndarray
    hidden_state2: np.ndarray
    pool2: np.ndarray
    provenance: Optional[TextEncoderProvenance] = None


_TE_KEYS = ("hidden_state1", "hidden_state2", "pool2")


def load_te_outputs(
    path: str,
    expect: TextEncoderProvenance,
    *,
    source_path: Optional[str] = None,
    check_provenance: bool = True,
) -> Optional[TextEncoderCacheEntry]:
    """Read a text-encoder cache file; None (= recompute) unless valid for ``expect``.

    ``source_path`` is the file the caption came from (caption file or metadata JSON); it is
    needed to accept a file without provenance (see the module docstring).
    """
    data = _read_npz(path)
    if data is None or any(k not in data for k in _TE_KEYS):
        return None
    h1, h2, pool = (np.asarray(data[k], dtype=np.float32) for k in _TE_KEYS)
    if h1.ndim != 2 or h2.ndim != 2 or pool.ndim != 1 or h1.shape[0] != h2.shape[0]:
        return None
    if not all(np.isfinite(a).all() for a in (h1, h2, pool)):
        return None
    stored = _read_provenance(data)
    if check_provenance:
        if stored is not None:
            if not _record_valid(stored, "te_outputs", expect, {k: data[k] for k in _TE_KEYS}):
                return None
        elif h1.shape[0] != expected_token_count(expect.max_token_length):
            return None
        elif not _older_than(source_path, path):
            return None
    own = stored is not None and check_provenance
    return TextEncoderCacheEntry(h1, h2, pool, provenance=expect if own else None)


def save_te_outputs(
    path: str, entry: TextEncoderCacheEntry, provenance: TextEncoderProvenance,
    durable: bool = True,
) -> None:
    """Write text-encoder outputs with provenance to ``path`` atomically."""
    arrays = {
        k: np.ascontiguousarray(getattr(entry, k), dtype=np.float32) for k in _TE_KEYS
    }
    _save_with_record(path, arrays, "te_outputs", provenance, durable)


# --- sharding -------------------------------------------------------------------------------------


def shard_for_process(items: Sequence, process_index: int, num_processes: int) -> list:
    """Every ``num_processes``-th item starting at ``process_index``: the shards of all
    processes are disjoint, together complete, and the same on every run for the same input.
    Meant for caching to disk under ``accelerate launch``; an in-memory cache is needed whole
    by every process.
    """
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"invalid process {process_index} of {num_processes}")
    return list(items)[process_index::num_processes]


# --- cachers (model-free: the encoder is an injected callable) ------------------------------------


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
    """The provenance the current run gives ``item`` (fingerprints the image file now)."""
    return LatentProvenance(
        image_fingerprint=file_fingerprint(item.image_path, content_hash=options.content_hash),
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
