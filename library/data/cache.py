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

The cachers that fill these files (``LatentCacher``, ``TextEncoderOutputCacher`` and their item
and option classes) live in :mod:`library.data.cachers`, which imports this module (never the
other way round).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

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
