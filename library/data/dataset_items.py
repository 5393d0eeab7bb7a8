"""The parts of :mod:`library.data.dataset`: items, sample loading and where cached entries are.

:func:`list_subset` turns one :class:`~library.config.dataset_toml.SubsetConfig` into
:class:`Candidate` records (image path, raw caption, where the caption came from, conditioning
image) and a list of problems ``(path, reason)``; nothing here decodes an image, so the caller can
scan every image of every subset once and report all problems together.

* DreamBooth subsets: the images directly inside ``image_dir``; caption from
  ``<stem><caption_extension>``, else the subset's ``class_tokens``, else a problem.
* Fine-tuning subsets: a metadata ``.json`` (``{key: {"caption", "tags", "image_size", ...}}``)
  or ``.jsonl`` (one ``{"image_path", "caption", "tags", ...}`` object per line). Keys are file
  names, stems (the image extension is found) or paths, relative to ``image_dir`` (or to the
  metadata file's folder when the subset has no ``image_dir``), or absolute.
* ControlNet subsets: like DreamBooth (a missing caption is an empty caption), plus the image of
  the same stem in ``conditioning_data_dir``.

:func:`balance_reg_repeats` spreads the regularisation repeats so that a dataset has as many
regularisation samples as training samples. :func:`load_sample_pixels` and
:func:`load_conditioning_image` turn an item and its crop into tensors. :class:`LatentCacheState`
and :class:`TextEncoderCacheState` map each item to its cached entry (in memory or on disk).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from library.config.dataset_toml import CONTROLNET, FINETUNE, SubsetConfig
from library.data.buckets import crop_for
from library.data.cache import (LatentProvenance, caption_sha256, latent_cache_candidates,
                                latent_cache_path, load_latents, load_te_outputs, shard_for_process,
                                te_cache_path)
from library.data.cachers import (CacheRunReport, LatentCacheItem, LatentCacheOptions, LatentCacher,
                                  TextEncoderCacheItem, TextEncoderCacheOptions,
                                  TextEncoderOutputCacher, latent_provenance, load_cached_te_outputs,
                                  te_provenance)
from library.data.caption_check import warn_caption_fallbacks
from library.data.captions import caption_path_candidates, read_caption
from library.data.images import is_image_path
from library.errors import UserError

logger = logging.getLogger(__name__)

Problem = tuple[str, str]  # (path, reason)


@dataclass
class Candidate:
    """One image a subset wants to train on, before the image itself is checked.

    ``caption`` is the raw caption (lines of a wildcard caption joined by ``\\n``);
    ``caption_source`` the caption file or metadata file it came from (None: class tokens).
    """

    path: str
    caption: str
    caption_source: Optional[str] = None
    conditioning_path: Optional[str] = None


@dataclass
class ImageItem:
    """One image of one subset of one dataset, checked, captioned and placed in its bucket.

    Sizes are ``(width, height)``; ``resized_size`` is what the image is resized to before the
    ``bucket``-sized crop is taken.
    """

    path: str
    dataset_index: int
    subset_index: int
    caption: str
    caption_source: Optional[str]
    original_size: tuple
    bucket: tuple
    resized_size: tuple
    ar_error: float
    num_repeats: int
    is_reg: bool
    conditioning_path: Optional[str] = None


def subset_label(subset: SubsetConfig) -> str:
    """The name sd-scripts uses for a subset in metadata: the folder or metadata file name."""
    source = subset.metadata_file if subset.metadata_file else subset.image_dir
    return os.path.basename(os.path.normpath(os.path.expanduser(source or "")))


def list_folder_images(folder: str, recursive: bool = False, warn_skipped: bool = False) -> list[str]:
    """Image files directly inside ``folder`` (and below, with ``recursive``), any case of a
    known extension, sorted; hidden files are skipped. ``warn_skipped``: log once per folder the
    unsupported media files (GIF, TIFF, ...) and broken or looping links that were left out."""
    folder = os.path.expanduser(folder)
    if recursive:
        return sorted(p for root, _, _ in os.walk(folder) for p in list_folder_images(root, False, warn_skipped))
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise UserError(f"cannot list image folder {folder}: {exc.strerror or exc}") from None
    found = [os.path.join(folder, n) for n in names
             if not n.startswith(".") and is_image_path(n) and os.path.isfile(os.path.join(folder, n))]
    if warn_skipped:
        _warn_skipped_files(folder, names)
    return found


# Files that look like pictures or video but are not trained on (reported once per folder).
_UNSUPPORTED_MEDIA = frozenset({".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".ico", ".psd",
                                ".svg", ".jp2", ".dng", ".raw", ".cr2", ".nef", ".mp4", ".webm", ".mov"})


def _warn_skipped_files(folder: str, names: list[str]) -> None:
    """One warning per folder naming the unsupported media files and broken or looping links."""
    unsupported, broken = [], []
    for n in names:
        if n.startswith("."):
            continue
        full = os.path.join(folder, n)
        if os.path.islink(full) and not os.path.exists(full):
            broken.append(n)
        elif os.path.splitext(n)[1].lower() in _UNSUPPORTED_MEDIA:
            unsupported.append(n)
    if unsupported:
        logger.warning("skipping %d file(s) in %s that are not supported images (png, jpg, jpeg, webp, bmp; "
                       "animated GIFs and other formats are not read): %s", len(unsupported), folder,
                       ", ".join(unsupported[:10]) + (" ..." if len(unsupported) > 10 else ""))
    if broken:
        logger.warning("skipping %d broken or looping symbolic link(s) in %s: %s", len(broken), folder,
                       ", ".join(broken[:10]) + (" ..." if len(broken) > 10 else ""))


class _StemIndex:
    """Finds ``<folder>/<stem>.<any image extension>`` with one directory listing per folder."""

    def __init__(self) -> None:
        self._folders: dict[str, dict[str, str]] = {}

    def find(self, folder: str, stem: str) -> Optional[str]:
        """The image named ``<stem>.<image extension>`` in ``folder``, or None."""
        folder = os.path.normpath(folder)
        index = self._folders.get(folder)
        if index is None:
            index = {}
            if os.path.isdir(folder):
                for path in list_folder_images(folder):
                    index.setdefault(os.path.splitext(os.path.basename(path))[0], path)
            self._folders[folder] = index
        return index.get(stem)


def _read_caption_or_problem(path: str, subset: SubsetConfig, kind: str
                             ) -> tuple[Optional[Candidate], Optional[Problem]]:
    try:
        text = read_caption(path, subset.caption_extension, enable_wildcard=subset.enable_wildcard)
    except UserError as exc:
        return None, (path, str(exc))
    if text is not None:
        source = next((str(c) for c in caption_path_candidates(path, subset.caption_extension)
                       if c.is_file()), None)
        return Candidate(path, text, source), None
    if subset.class_tokens:
        return Candidate(path, subset.class_tokens, None), None
    if kind == CONTROLNET:
        return Candidate(path, "", None), None
    stem = os.path.splitext(os.path.basename(path))[0]
    return None, (path, f"no caption: {stem}{subset.caption_extension} does not exist and the "
                        "subset has no class_tokens; add the caption file, set class_tokens (or "
                        "name the folder '<repeats>_<class tokens>'), or fix caption_extension")


def _folder_candidates(subset: SubsetConfig, kind: str) -> tuple[list[Candidate], list[Problem]]:
    candidates, problems = [], []
    stems = _StemIndex()
    empty = []
    for path in list_folder_images(subset.image_dir, warn_skipped=True):
        cand, problem = _read_caption_or_problem(path, subset, kind)
        if problem:
            problems.append(problem)
            continue
        if not cand.caption.strip() and kind != CONTROLNET:
            empty.append(os.path.basename(path))
        if kind == CONTROLNET:
            stem = os.path.splitext(os.path.basename(path))[0]
            cond = stems.find(os.path.expanduser(subset.conditioning_data_dir), stem)
            if cond is None:
                problems.append((path, f"no conditioning image named {stem}.* in "
                                       f"{subset.conditioning_data_dir} (conditioning_data_dir)"))
                continue
            cand.conditioning_path = cond
        candidates.append(cand)
    if empty:
        tokens = (f"; the class tokens {subset.class_tokens!r} are not used for them" if subset.class_tokens
                  else "")
        logger.warning("%d image(s) in %s have an empty or whitespace-only caption file and train with an empty "
                       "caption%s: %s", len(empty), subset.image_dir, tokens,
                       ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""))
    if not candidates and not problems:
        logger.warning("no images found in %s", subset.image_dir)
    warn_caption_fallbacks(subset.image_dir, subset.caption_extension,
                           [c.path for c in candidates if c.caption_source is None],
                           len(candidates) + len(problems), subset.class_tokens)
    return candidates, problems


def load_metadata(path: str) -> list[tuple[str, Any]]:
    """``[(key or image_path, entry dict), ...]`` from a metadata .json or .jsonl file."""
    try:
        text = open(path, "rb").read().decode("utf-8-sig")
    except OSError as exc:
        raise UserError(f"cannot read metadata file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"metadata file {path} is not UTF-8 text; re-save it as UTF-8") from None
    if path.lower().endswith(".jsonl"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"metadata file {path}, line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("image_path"), str):
                raise UserError(f"metadata file {path}, line {number}: expected an object with "
                                "\"image_path\" (and \"caption\" / \"tags\")")
            rows.append((entry["image_path"], entry))
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"metadata file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"metadata file {path}: expected a JSON object {{image key: {{\"caption\": "
                        "...}}}} (or use a .jsonl file with one object per line)")
    return list(data.items())


def resolve_metadata_key(key: str, base_dir: str, stems: Optional[_StemIndex] = None
                         ) -> Optional[str]:
    """The image file a metadata key names, or None.

    Tried in order: the key as a path (absolute, or relative to ``base_dir``) if it is an image
    file; then an image whose stem is the key's last path component, in that folder.
    """
    stems = stems or _StemIndex()
    path = key if os.path.isabs(key) else os.path.join(base_dir, key)
    if is_image_path(path) and os.path.isfile(path):
        return path
    folder, name = os.path.split(path)
    found = stems.find(folder, name)
    if found is None and is_image_path(name):  # "img.png" given but stored as "img.jpg"
        found = stems.find(folder, os.path.splitext(name)[0])
    return found


def _finetune_caption(entry: Any, separator: str) -> Optional[str]:
    if not isinstance(entry, dict):
        return None
    caption, tags = entry.get("caption"), entry.get("tags")
    caption = caption.strip() if isinstance(caption, str) else None
    tags = tags.strip() if isinstance(tags, str) else None
    if caption is None and tags is None:
        return None
    if not tags:
        return caption or ""
    if not caption:
        return tags
    joiner = separator + (" " if separator.strip() else "")
    return "\n".join(f"{line}{joiner}{tags}" for line in caption.split("\n"))


def _finetune_candidates(subset: SubsetConfig) -> tuple[list[Candidate], list[Problem]]:
    meta = os.path.expanduser(subset.metadata_file)
    base = os.path.expanduser(subset.image_dir) if subset.image_dir else os.path.dirname(meta)
    candidates, problems, stems = [], [], _StemIndex()
    for key, entry in load_metadata(meta):
        path = resolve_metadata_key(str(key), base, stems)
        if path is None:
            problems.append((os.path.join(base, str(key)), f"metadata key {key!r} in {meta}: no "
                             "image file found (tried the key as a path and as a file stem)"))
            continue
        caption = _finetune_caption(entry, subset.caption_separator)
        if caption is None:
            problems.append((path, f"metadata entry {key!r} in {meta} has neither \"caption\" "
                                   "nor \"tags\""))
            continue
        if not subset.enable_wildcard:
            caption = caption.split("\n")[0]
        candidates.append(Candidate(path, caption, meta))
    return candidates, problems


def list_subset(subset: SubsetConfig) -> tuple[list[Candidate], list[Problem]]:
    """The candidate images of one subset and the problems found while listing them."""
    if subset.kind == FINETUNE:
        return _finetune_candidates(subset)
    return _folder_candidates(subset, subset.kind)


def warn_unpaired_conditioning(subsets: Sequence[SubsetConfig], paired: Sequence[Optional[str]]
                               ) -> dict[str, list[str]]:
    """Warn once per ``conditioning_data_dir`` about its images that no training image pairs with.

    ``paired``: the conditioning images the candidates found. Returns ``{folder: [file names]}``.
    sd-scripts stops with an error here; such images are only unused, so a warning with the count
    and the names is enough.
    """
    used = {os.path.normpath(p) for p in paired if p}
    folders = dict.fromkeys(os.path.normpath(os.path.expanduser(s.conditioning_data_dir))
                            for s in subsets if s.kind == CONTROLNET)
    unpaired: dict[str, list[str]] = {}
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        names = [os.path.basename(p) for p in list_folder_images(folder) if os.path.normpath(p) not in used]
        if names:
            unpaired[folder] = names
            logger.warning("%d conditioning image(s) in %s have no training image of the same name and are "
                           "not used: %s", len(names), folder,
                           ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""))
    return unpaired


def balance_reg_repeats(train_samples: int, reg_repeats: Sequence[int]) -> list[int]:
    """Repeats per regularisation image so that they add up to exactly ``train_samples``.

    Images are taken in order with their own ``num_repeats`` (the last one cut short) until the
    total is reached; if one pass is not enough, further passes add one repeat per image. Images
    that are not needed get 0 (sd-scripts leaves them out the same way).
    """
    out = [0] * len(reg_repeats)
    if train_samples <= 0 or not reg_repeats:
        return out
    remaining = train_samples
    for i, repeats in enumerate(reg_repeats):
        take = min(max(repeats, 1), remaining)
        out[i] = take
        remaining -= take
        if remaining == 0:
            return out
    while remaining > 0:
        for i in range(len(out)):
            out[i] += 1
            remaining -= 1
            if remaining == 0:
                break
    return out


def split_validation(indices: Sequence[int], fraction: float, seed: int) -> set:
    """The indices held out for validation: ``round(len * fraction)`` of them (at least one when
    the fraction is > 0 and there are two or more), chosen by a generator seeded with ``seed``."""
    if fraction <= 0 or len(indices) < 2:
        return set()
    count = min(len(indices) - 1, max(1, round(len(indices) * fraction)))
    chosen = list(indices)
    random.Random(f"validation-split:{seed}").shuffle(chosen)
    return set(chosen[:count])


def count_tags(captions: Sequence[str], separator: str) -> dict[str, int]:
    """How often each tag (caption split on ``separator``, stripped) occurs, for ss_tag_frequency.

    Every line of a multi-line (wildcard) caption counts.
    """
    counts: Counter = Counter()
    for caption in captions:
        for line in caption.split("\n"):
            counts.update(t.strip() for t in line.split(separator) if t.strip())
    return dict(counts)


# --- where each item's cached latents / text-encoder outputs are ----------------------------------


@dataclass
class _LatentUnit:
    """One latent cache entry; items showing the same image the same way share it."""

    item: LatentCacheItem
    interpolation: Optional[str]
    flip: bool = False
    alpha: bool = False
    variant: int = 0  # > 0: the same image at another bucket/crop (another dataset's resolution)


def _multires_latent_path(image_path: str, original_size: tuple, bucket: tuple) -> str:
    """Cache name for a second bucket of one image: ``<stem>_<W>x<H>_<bw>x<bh>_sdxl.npz``."""
    base = latent_cache_path(image_path, original_size)
    return f"{base[:-len('_sdxl.npz')]}_{bucket[0]}x{bucket[1]}_sdxl.npz"


class _CacheState:
    """Where each item's cached entry is after caching: in memory, or in a file checked valid
    for this run (files of other processes' shards are checked on first use)."""

    what = ""

    def __init__(self) -> None:
        self.active = False
        self.model_id = ""
        self.options: Any = None
        self.units: list = []
        self.item_unit: list[int] = []
        self.memory: dict[int, Any] = {}
        self.files: dict[int, str] = {}

    def _start(self, group: Any, model_id: str, options: Any, process_index: int,
               num_processes: int) -> tuple[list[int], int]:
        """Build the units, check this shard's files; ``(units to compute, units reused)``."""
        self.model_id, self.options = model_id, options
        self.memory, self.files = {}, {}
        self._build_units(group)
        todo = list(range(len(self.units)))
        if not options.to_disk:
            return todo, 0
        mine = shard_for_process(todo, process_index, num_processes)
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="cache-check") as pool:
            found = list(tqdm(pool.map(self.find_file, mine), total=len(mine), unit="file",
                              desc=f"checking {self.what} caches", disable=not options.show_progress))
        self.files = {u: p for u, p in zip(mine, found) if p is not None}
        return [u for u in mine if u not in self.files], len(self.files)

    def _finish(self, computed: int, reused: int, process_index: int, num_processes: int
                ) -> CacheRunReport:
        self.active = True
        logger.info("%s: %d computed, %d reused (process %d of %d)", self.what, computed, reused,
                    process_index + 1, num_processes)
        return CacheRunReport(computed=computed, reused=reused)

    def _entry(self, index: int) -> tuple:
        """``(unit, entry)`` of item ``index``, loading (and checking, for another process's
        shard) its file when needed; UserError when there is no usable file."""
        u = self.item_unit[index]
        unit = self.units[u]
        entry = self.memory.get(u)
        if entry is None:
            path = self.files.get(u) or self.find_file(u)
            if path is None:
                raise UserError(f"{self._name(unit)}: no valid {self.what} cache file (looked for "
                                f"{', '.join(self._paths(unit))}); cache again and let every process "
                                "finish caching before training")
            self.files[u] = path
            entry = self._load_unchecked(unit, path)
            if entry is None:
                raise UserError(f"{self.what} cache file {path} is unreadable or does not fit this "
                                "run; delete it and cache again")
        return unit, entry


class LatentCacheState(_CacheState):
    """Latents of every item, after :meth:`DatasetGroup.cache_latents`."""

    what = "latents"

    def _build_units(self, group: Any) -> None:
        by_key: dict = {}
        variants: dict = {}
        self.units, self.item_unit = [], []
        for index, item in enumerate(group.items):
            sub, interp = group.subset_of(index), group.interpolation(index)
            plan = crop_for(item.original_size, item.bucket, False, None, resized=item.resized_size)
            key = (item.path, item.bucket, item.resized_size, (plan.left, plan.top), interp)
            if key not in by_key:
                variant = variants[item.path] = variants.get(item.path, -1) + 1
                path = _multires_latent_path(item.path, item.original_size, item.bucket) if variant else None
                litem = LatentCacheItem(item.path, item.original_size, item.bucket, item.resized_size,
                                        (plan.left, plan.top), plan.crop_ltrb, path,
                                        fingerprint=getattr(group, "fingerprints", {}).get(item.path))
                by_key[key] = len(self.units)
                self.units.append(_LatentUnit(litem, interp, variant=variant))
            unit = self.units[by_key[key]]
            unit.flip |= bool(sub.flip_aug)
            unit.alpha |= bool(sub.alpha_mask)
            self.item_unit.append(by_key[key])

    def _unit_options(self, unit: _LatentUnit) -> LatentCacheOptions:
        return replace(self.options, flip_aug=unit.flip, alpha_mask=unit.alpha,
                       interpolation=unit.interpolation, skip_existing=False)

    @staticmethod
    def _name(unit: _LatentUnit) -> str:
        return unit.item.image_path

    @staticmethod
    def _paths(unit: _LatentUnit) -> list[str]:
        it = unit.item
        return [it.cache_path] if it.cache_path else latent_cache_candidates(it.image_path, it.original_size)

    def find_file(self, u: int) -> Optional[str]:
        """The first cache file of unit ``u`` valid for this run (with skip_cache_check: the
        first that exists)."""
        unit = self.units[u]
        opts = self._unit_options(unit)
        if opts.skip_cache_check:
            return next((p for p in self._paths(unit) if os.path.isfile(p)), None)
        expect = latent_provenance(unit.item, self.model_id, opts)
        return next((p for p in self._paths(unit) if load_latents(
            p, expect, unit.flip, image_path=unit.item.image_path,
            require_alpha_mask=unit.alpha) is not None), None)

    def _load_unchecked(self, unit: _LatentUnit, path: str) -> Any:
        it = unit.item
        expect = LatentProvenance("", it.original_size, it.bucket_reso, it.crop_ltrb, self.model_id,
                                  self.options.vae_dtype)
        return load_latents(path, expect, unit.flip, require_alpha_mask=unit.alpha, check_provenance=False)

    def run(self, group: Any, encode_fn: Callable, vae_id: str, options: LatentCacheOptions,
            process_index: int, num_processes: int) -> CacheRunReport:
        """Cache this process's share of the group's latents (see DatasetGroup.cache_latents)."""
        todo, reused = self._start(group, vae_id, options, process_index, num_processes)
        groups: dict = {}
        for u in todo:
            unit = self.units[u]
            groups.setdefault((unit.flip, unit.alpha, unit.interpolation or "", unit.variant), []).append(u)
        computed = 0
        for key in sorted(groups):
            members = groups[key]
            cacher = LatentCacher(encode_fn, vae_id, self._unit_options(self.units[members[0]]))
            report = cacher.cache([self.units[u].item for u in members])
            computed += report.computed
            for u in members:
                it = self.units[u].item
                if options.to_disk:
                    self.files[u] = it.cache_path or latent_cache_path(it.image_path, it.original_size)
                else:
                    self.memory[u] = report.entries[it.image_path]
        return self._finish(computed, reused, process_index, num_processes)

    def get(self, index: int, flip: bool) -> Optional[tuple]:
        """``(latents [C, h, w] float32, alpha mask [H, W] or None)`` of item ``index``, or None
        when latents are not cached."""
        if not self.active:
            return None
        _, entry = self._entry(index)
        mask = entry.alpha_mask
        if mask is not None:
            mask = torch.from_numpy(np.ascontiguousarray(mask[:, ::-1] if flip else mask))
        latents = entry.latents_flipped if flip else entry.latents
        return torch.from_numpy(np.ascontiguousarray(latents)), mask


class TextEncoderCacheState(_CacheState):
    """Text-encoder outputs of every item's caption, after
    :meth:`DatasetGroup.cache_text_encoder_outputs`."""

    what = "text-encoder outputs"

    def _build_units(self, group: Any) -> None:
        by_key: dict = {}
        self.units, self.item_unit = [], []
        seen_paths: set = set()
        for index, item in enumerate(group.items):
            caption = group.cache_caption(index)
            key = (item.path, caption)
            if key not in by_key:
                name, path = item.path, None
                if item.path in seen_paths:  # same image, another caption: its own file
                    digest = caption_sha256(caption)[:8]
                    name = f"{item.path}#{digest}"
                    path = f"{os.path.splitext(item.path)[0]}_{digest}_te_outputs.npz"
                seen_paths.add(item.path)
                by_key[key] = len(self.units)
                self.units.append(TextEncoderCacheItem(name, caption, path, item.caption_source))
            self.item_unit.append(by_key[key])

    @staticmethod
    def _name(unit: TextEncoderCacheItem) -> str:
        return unit.key

    @staticmethod
    def _paths(unit: TextEncoderCacheItem) -> list[str]:
        return [unit.cache_path or te_cache_path(unit.key)]

    def find_file(self, u: int) -> Optional[str]:
        """The cache file of unit ``u`` if valid for this run (skip_cache_check: if it exists)."""
        unit = self.units[u]
        path = self._paths(unit)[0]
        if self.options.skip_cache_check:
            return path if os.path.isfile(path) else None
        return path if load_cached_te_outputs(unit, self.model_id, self.options) is not None else None

    def _load_unchecked(self, unit: TextEncoderCacheItem, path: str) -> Any:
        return load_te_outputs(path, te_provenance(unit.caption, self.model_id, self.options),
                               check_provenance=False)

    def run(self, group: Any, encode_fn: Callable, te_id: str, options: TextEncoderCacheOptions,
            process_index: int, num_processes: int) -> CacheRunReport:
        """Cache this process's share of the captions' text-encoder outputs."""
        todo, reused = self._start(group, te_id, options, process_index, num_processes)
        report = TextEncoderOutputCacher(encode_fn, te_id, replace(options, skip_existing=False)
                                         ).cache([self.units[u] for u in todo])
        for u in todo:
            if options.to_disk:
                self.files[u] = self._paths(self.units[u])[0]
            else:
                self.memory[u] = report.entries[self.units[u].key]
        return self._finish(report.computed, reused, process_index, num_processes)

    def get(self, index: int) -> Optional[tuple]:
        """``(cached caption, (h1 [T, C1], h2 [T, C2], pool2 [P]))`` of item ``index``, or None."""
        if not self.active:
            return None
        unit, entry = self._entry(index)
        return unit.caption, tuple(torch.from_numpy(np.ascontiguousarray(a))
                                   for a in (entry.hidden_state1, entry.hidden_state2, entry.pool2))
