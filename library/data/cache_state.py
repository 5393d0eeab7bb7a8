"""Where each dataset item's cached latents and text-encoder outputs are (in memory or on disk).

:class:`LatentCacheState` and :class:`TextEncoderCacheState` map every item of a
:class:`~library.data.dataset.DatasetGroup` to its cache entry, build the missing entries with the
cachers of :mod:`library.data.cachers` and load them back; split from :mod:`library.data.dataset_items`
(items and sample loading), which the dataset uses beside them.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from library.data.buckets import crop_for
from library.data.cache import (LatentProvenance, caption_sha256, latent_cache_candidates,
                                latent_cache_path, load_latents, load_te_outputs, shard_for_process,
                                te_cache_path)
from library.data.cachers import (CacheRunReport, LatentCacheItem, LatentCacheOptions, LatentCacher,
                                  TextEncoderCacheItem, TextEncoderCacheOptions,
                                  TextEncoderOutputCacher, latent_provenance, load_cached_te_outputs,
                                  te_provenance)
from library.errors import UserError

logger = logging.getLogger(__name__)


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
                                "finish caching before training (on several machines, every machine must see "
                                "the cache files of all of them: a shared dataset folder, or caches made ahead with "
                                "tools/cache_latents.py / tools/cache_text_encoder_outputs.py)")
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
