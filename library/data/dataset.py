"""The training dataset: every dataset of a config, scanned once, bucketed, served as whole batches.

:class:`DatasetGroup` is built from the ``list[DatasetConfig]`` of
:mod:`library.config.dataset_toml` and a :class:`DataOptions`. On construction it lists the
images of every subset, reads their captions, decodes every image once (all bad files are
reported together, by path and reason, before any model is loaded), assigns buckets per dataset
and balances regularisation images to the number of training samples.

Each index is one whole batch from one bucket of one dataset (use :func:`make_dataloader`, a
DataLoader with ``batch_size=1`` and :func:`collate_single`). A batch is a dict:

* ``latents`` float32 [B, 4, h, w], unscaled (when latents are cached), or ``images`` float32
  [B, 3, H, W] in [-1, 1];
* ``captions`` list[str] (processed for this epoch and step); ``te_outputs`` (h1 [B, T, C1],
  h2 [B, T, C2], pool2 [B, P]) when text-encoder outputs are cached; ``input_ids1``/``input_ids2``
  when a tokenize function is set (:meth:`DatasetGroup.set_tokenize_fn`);
* ``original_sizes_hw``, ``crop_top_lefts``, ``target_sizes_hw`` LongTensor [B, 2]: the image's
  size, the offset of the crop really applied (mirrored for a flipped sample) and the bucket;
* ``loss_weights`` float32 [B] (``prior_loss_weight`` for regularisation images),
  ``network_multipliers`` float32 [B], ``flipped`` bool [B], ``image_paths``, ``custom_attributes``;
* ``conditioning_images`` float32 [B, 3, H, W] in [0, 1] for ControlNet datasets, cropped exactly
  like the image; ``alpha_masks`` float32 [B, H, W] in [0, 1] when any subset uses alpha masks.

Every random choice (batch order, flips, random crops, caption shuffles and dropout, colour jitter)
comes from generators seeded by (seed, epoch, sample), so a run is reproducible whatever the
number of loader workers. The epoch (counted from 0) and step live in shared memory, so
:meth:`set_epoch` and :meth:`set_current_step` reach persistent loader workers.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
from collections import defaultdict
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from library.config.dataset_cli import (  # the checks live with the configs; re-exported here
    _subset_where,
    dataset_configs_from_values,
    verify_latent_cache_compat,
    verify_text_encoder_cache_compat,
)
from library.config.dataset_toml import (
    CONTROLNET,
    FINETUNE,
    DatasetConfig,
)
from library.data.buckets import BucketAssignment, BucketManager, bucket_batches, bucket_summary, crop_for
from library.data.cachers import CacheRunReport, LatentCacheOptions, TextEncoderCacheOptions
from library.data.captions import CaptionOptions, process_caption
from library.data.cache_state import LatentCacheState, TextEncoderCacheState
from library.data.dataset_items import (
    ImageItem,
    balance_reg_repeats,
    count_tags,
    list_subset,
    split_validation,
    subset_label,
    warn_unpaired_conditioning,
)
from library.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, ScanReport, image_size, scan_images
from library.data.sample_pixels import load_conditioning_image, load_sample_pixels
from library.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class DataOptions:
    """Run-wide options of a :class:`DatasetGroup` (everything else comes from the configs).

    ``seed``: seeds every random choice. ``max_train_steps``: resolves a fractional
    ``token_warmup_step``. ``skip_bad_images``: leave unusable images out (listed in a warning)
    instead of stopping. ``prior_loss_weight``: loss weight of regularisation images.
    ``max_token_length``: 75 (None), 150 or 225, for text-encoder caches.
    ``resize_interpolation``: used where no dataset/subset sets one. ``alpha_mask``: give every
    batch ``alpha_masks`` (all ones for images of subsets without ``alpha_mask``).
    ``full_scan``: decode every image up front (False: read only headers, faster for huge sets,
    but corrupt pixel data is found only when the image is used). ``scan_workers``: threads
    decoding images during the scan. ``debug_dataset``: log a line per batch served.
    """

    seed: int = 0
    max_train_steps: Optional[int] = None
    skip_bad_images: bool = False
    debug_dataset: bool = False
    prior_loss_weight: float = 1.0
    max_token_length: Optional[int] = None
    resize_interpolation: Optional[str] = None
    alpha_mask: bool = False
    full_scan: bool = True
    scan_workers: int = min(8, os.cpu_count() or 1)
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "DataOptions":
        """Pick the fields from plain option values (e.g. ``vars(args)``); None means default."""
        skip = ("alpha_mask",)  # --alpha_mask reaches the subsets through the dataset config
        return cls(**{f.name: values[f.name] for f in fields(cls)
                      if f.name not in skip and values.get(f.name) is not None})


class DatasetGroup(torch.utils.data.Dataset):
    """All datasets of a run; ``group[i]`` is the i-th batch of the current epoch (a dict).

    ``source`` names where the configs came from (the dataset config file, or "the command
    line") in messages.
    """

    def __init__(self, configs: Sequence[DatasetConfig], options: Optional[DataOptions] = None,
                 *, source: str = "the command line") -> None:
        self.configs = list(configs)
        self.options = options or DataOptions()
        self.source = source
        if self.options.max_token_length not in (None, 75, 150, 225):
            raise UserError(f"--max_token_length {self.options.max_token_length}: use 75, 150 or 225")
        self._caption_opts = [[self._caption_options(d, s, sub) for s, sub in enumerate(ds.subsets)]
                              for d, ds in enumerate(self.configs)]
        self.items: list[ImageItem] = []
        self.bad_images: list[tuple[str, str]] = []
        self.fingerprints: dict[str, str] = {}  # image path -> content hash (full scan)
        self._samples: list[list[int]] = [[] for _ in self.configs]  # item index per sample
        self.is_validation = False
        self._build()
        self._held_out = self._validation_items()
        self._alpha = self.options.alpha_mask or any(
            sub.alpha_mask for ds in self.configs for sub in ds.subsets)
        self.latent_cache = LatentCacheState()
        self.te_cache = TextEncoderCacheState()
        self._tokenize_fn: Optional[Callable] = None
        self._make_samples()

    def validation_group(self) -> Optional["DatasetGroup"]:
        """The images held out by ``validation_split`` (each once, no regularisation images) as
        a group sharing this one's scan and caches; None when no dataset sets a split."""
        if not self._held_out:
            return None
        other = copy.copy(self)
        other.is_validation = True
        other._samples = [[] for _ in self.configs]
        other._make_samples()
        return other

    # --- building ---------------------------------------------------------------------------------

    def _caption_options(self, d: int, s: int, subset: Any) -> CaptionOptions:
        try:
            return CaptionOptions.from_subset(subset, self.options.max_train_steps)
        except ValueError:
            raise UserError(f"token_warmup_step = {subset.token_warmup_step} (a fraction of the "
                            f"training steps) in {_subset_where(self.source, d, s, subset)} needs "
                            "--max_train_steps") from None

    def _scan(self, paths: list[str]) -> ScanReport:
        if self.options.full_scan:
            return scan_images(paths, max_pixels=self.options.max_pixels,
                               num_workers=self.options.scan_workers if len(paths) > 8 else 0)
        report = ScanReport()
        for path in paths:
            try:
                report.sizes[path] = image_size(path, self.options.max_pixels)
                report.good.append(path)
            except ImageLoadError as exc:
                report.bad.append((path, exc.reason))
        return report

    def _build(self) -> None:
        """List, scan, caption and bucket every image; report every problem at once."""
        listed, problems = [], []
        for d, ds in enumerate(self.configs):
            for s, sub in enumerate(ds.subsets):
                candidates, found = list_subset(sub)
                problems += found
                listed += [(d, s, c) for c in candidates]
        warn_unpaired_conditioning([sub for ds in self.configs for sub in ds.subsets],
                                   [c.conditioning_path for _, _, c in listed])
        paths = list(dict.fromkeys(p for _, _, c in listed
                                   for p in (c.path, c.conditioning_path) if p))
        logger.info("checking %d image file(s)", len(paths))
        scan = self._scan(paths)
        self.fingerprints = scan.fingerprints  # content hashes for latent-cache provenance
        bad_paths = {p for p, _ in scan.bad}
        managers = [BucketManager(ds.resolution, enable_bucket=ds.enable_bucket,
                                  min_size=ds.min_bucket_reso, max_size=ds.max_bucket_reso,
                                  step=ds.bucket_reso_steps, no_upscale=ds.bucket_no_upscale)
                    for ds in self.configs]
        for d, s, cand in listed:
            if cand.path in bad_paths or cand.conditioning_path in bad_paths:
                continue
            sub = self.configs[d].subsets[s]
            size = scan.sizes[cand.path]
            try:
                placed = managers[d].assign(size, path=cand.path, random_crop=sub.random_crop)
            except UserError as exc:
                problems.append((cand.path, str(exc).replace(f"image {cand.path} ", "")))
                continue
            self.items.append(ImageItem(
                cand.path, d, s, cand.caption, cand.caption_source, tuple(size), placed.bucket,
                placed.resized_size, placed.ar_error, sub.num_repeats, sub.is_reg,
                cand.conditioning_path))
        report = ScanReport(good=[i.path for i in self.items], bad=scan.bad + problems)
        self.bad_images = list(report.bad)
        report.raise_if_bad(self.options.skip_bad_images)
        if not self.items:
            raise UserError(f"no usable training images in {self.source}; check image_dir / "
                            "metadata_file and the image file types (png, jpg, jpeg, webp, bmp)")

    def _validation_items(self) -> set:
        held_out: set = set()
        for d, ds in enumerate(self.configs):
            if ds.validation_split > 0:
                train = [i for i, it in enumerate(self.items) if it.dataset_index == d and not it.is_reg]
                seed = ds.validation_seed if ds.validation_seed is not None else self.options.seed
                held_out |= split_validation(train, ds.validation_split, seed)
        return held_out

    def _make_samples(self) -> None:
        """Expand repeats (and balance regularisation images) into the per-dataset sample lists."""
        for d in range(len(self.configs)):
            mine = [i for i, it in enumerate(self.items) if it.dataset_index == d]
            if self.is_validation:
                self._samples[d] = [i for i in mine if i in self._held_out]
                continue
            train = [i for i in mine if not self.items[i].is_reg and i not in self._held_out]
            reg = [i for i in mine if self.items[i].is_reg]
            samples = [i for i in train for _ in range(self.items[i].num_repeats)]
            if reg:
                repeats = balance_reg_repeats(len(samples), [self.items[i].num_repeats for i in reg])
                if not samples:
                    logger.warning("dataset %d of %s has only regularisation images; they are not "
                                   "used", d + 1, self.source)
                elif 0 in repeats:
                    logger.warning("dataset %d: %d of %d regularisation images are not needed to "
                                   "match %d training samples and are left out", d + 1,
                                   repeats.count(0), len(reg), len(samples))
                samples += [i for i, r in zip(reg, repeats) for _ in range(r)]
            self._samples[d] = samples
        self._num_batches = sum(math.ceil(n / ds.batch_size) for d, ds in enumerate(self.configs)
                                for n in self._bucket_counts(d).values())
        self._state = torch.tensor([0, 0], dtype=torch.int64).share_memory_()  # epoch, step
        self._order = (None, [])

    def _bucket_counts(self, d: int) -> dict:
        counts: dict = defaultdict(int)
        for i in self._samples[d]:
            counts[self.items[i].bucket] += 1
        return counts

    # --- epochs, steps, batches -------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch, counted from 0 like ``DistributedSampler.set_epoch`` and accelerate
        (whose prepared DataLoader calls this with its own pass counter on every ``iter()``:
        with accelerate call ``loader.set_epoch(epoch)`` on the prepared loader). Batch order,
        flips, crops and captions follow (seed, epoch); ``caption_dropout_every_n_epochs``
        counts epochs from 1 (epoch 0 is the first). Reaches persistent DataLoader workers."""
        self._state[0] = int(epoch)

    def set_current_step(self, step: int) -> None:
        """The global step, for token warm-up (``token_warmup_step``); loader workers read it
        when they build a batch, i.e. a few batches ahead of the trainer (as in sd-scripts)."""
        self._state[1] = int(step)

    @property
    def epoch(self) -> int:
        """The current epoch (0-based)."""
        return int(self._state[0])

    def set_tokenize_fn(self, fn: Optional[Callable]) -> None:
        """``fn(captions) -> (ids1, ids2)`` run in the loader workers; batches then carry
        ``input_ids1``/``input_ids2``. It is copied into each worker: give it tokenizers only,
        never text encoders (see :class:`PairTokenizer`)."""
        self._tokenize_fn = fn

    def batch_order(self, epoch: int) -> list[tuple[int, list[int]]]:
        """``[(dataset index, [sample index, ...]), ...]``: every batch of ``epoch`` in order."""
        if self._order[0] == epoch:
            return self._order[1]
        order = []
        for d, ds in enumerate(self.configs):
            buckets = [self.items[i].bucket for i in self._samples[d]]
            for members in bucket_batches(buckets, ds.batch_size, self.options.seed + 7919 * d, epoch):
                order.append((d, members))
        random.Random(f"dataset-group:{self.options.seed}:{epoch}").shuffle(order)
        self._order = (epoch, order)
        return order

    def __len__(self) -> int:
        """Batches per epoch over all datasets."""
        return self._num_batches

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self._num_batches:
            raise IndexError(f"batch {index} of {self._num_batches}")
        epoch, step = (int(v) for v in self._state)
        d, members = self.batch_order(epoch)[index]
        samples = [self._sample(d, m, epoch, step) for m in members]
        batch = self._collate(d, samples)
        if self.options.debug_dataset:
            logger.info("epoch %d batch %d: dataset %d bucket %s, %s", epoch, index, d + 1,
                        self.items[self._samples[d][members[0]]].bucket, batch["image_paths"])
        return batch

    def _sample(self, d: int, m: int, epoch: int, step: int) -> dict:
        """One sample of dataset ``d`` (sample index ``m``) for ``epoch``/``step``."""
        index = self._samples[d][m]
        item = self.items[index]
        sub = self.configs[d].subsets[item.subset_index]
        rng = random.Random(f"sample:{self.options.seed}:{epoch}:{d}:{m}")
        flip = bool(sub.flip_aug and rng.random() < 0.5)
        plan = crop_for(item.original_size, item.bucket, sub.random_crop, rng,
                        resized=item.resized_size)
        shown = plan.flip() if flip else plan  # offsets in the image the model sees
        out = {"item": item, "flip": flip, "top_left": shown.crop_top_left,
               "is_reg": item.is_reg, "custom": dict(sub.custom_attributes)}
        te = self.te_cache.get(index)
        if te is not None:
            out["caption"], out["te"] = te
        else:
            opts = self._caption_opts[d][item.subset_index]
            out["caption"] = process_caption(item.caption, opts, rng, epoch + 1, step)
        interp = sub.resize_interpolation or self.options.resize_interpolation
        latents = self.latent_cache.get(index, flip)
        if latents is not None:
            out["latents"], out["mask"] = latents
            if self._alpha and sub.alpha_mask and out["mask"] is None:
                raise UserError(f"{item.path}: the latent cache has no alpha mask; re-cache latents")
        else:
            out["pixels"], out["mask"] = load_sample_pixels(
                item, (plan.left, plan.top), flip, interp, alpha_mask=self._alpha and sub.alpha_mask,
                color_rng=rng if sub.color_aug else None, max_pixels=self.options.max_pixels)
        if item.conditioning_path:
            out["cond"] = load_conditioning_image(item, (plan.left, plan.top), flip, interp,
                                                  self.options.max_pixels)
        return out

    def _collate(self, d: int, samples: list[dict]) -> dict:
        items = [s["item"] for s in samples]
        batch: dict = {}
        if all("latents" in s for s in samples):
            batch["latents"] = torch.stack([s["latents"] for s in samples])
        else:
            batch["images"] = torch.stack([s["pixels"] for s in samples])
        batch["captions"] = [s["caption"] for s in samples]
        if all("te" in s for s in samples):
            batch["te_outputs"] = tuple(torch.stack([s["te"][k] for s in samples]) for k in range(3))
        if self._tokenize_fn is not None:
            batch["input_ids1"], batch["input_ids2"] = self._tokenize_fn(batch["captions"])
        batch["original_sizes_hw"] = torch.tensor([[i.original_size[1], i.original_size[0]]
                                                   for i in items], dtype=torch.long)
        batch["crop_top_lefts"] = torch.tensor([list(s["top_left"]) for s in samples], dtype=torch.long)
        batch["target_sizes_hw"] = torch.tensor([[i.bucket[1], i.bucket[0]] for i in items],
                                                dtype=torch.long)
        batch["loss_weights"] = torch.tensor(
            [self.options.prior_loss_weight if s["is_reg"] else 1.0 for s in samples])
        batch["network_multipliers"] = torch.full((len(samples),),
                                                  float(self.configs[d].network_multiplier))
        batch["flipped"] = torch.tensor([s["flip"] for s in samples], dtype=torch.bool)
        if any("cond" in s for s in samples):
            batch["conditioning_images"] = torch.stack([s["cond"] for s in samples])
        if self._alpha:
            bw, bh = items[0].bucket
            batch["alpha_masks"] = torch.stack([s["mask"] if s["mask"] is not None
                                                else torch.ones(bh, bw) for s in samples])
        batch["image_paths"] = [i.path for i in items]
        batch["custom_attributes"] = [s["custom"] for s in samples]
        return batch

    # --- caching ----------------------------------------------------------------------------------

    def verify_text_encoder_cache_compat(self) -> None:
        """UserError if a subset's captions change between steps (see the module function)."""
        verify_text_encoder_cache_compat(self.configs, self.source)

    def verify_latent_cache_compat(self) -> None:
        """UserError if a subset uses color_aug or random_crop (see the module function)."""
        verify_latent_cache_compat(self.configs, self.source)

    def cache_latents(self, encode_fn: Callable, vae_id: str,
                      options: Optional[LatentCacheOptions] = None, *, process_index: int = 0,
                      num_processes: int = 1) -> CacheRunReport:
        """Encode every image once with ``encode_fn`` (pixels [B,3,H,W] in [-1,1] -> latents
        [B,C,H/8,W/8]); afterwards batches carry ``latents`` instead of ``images``.

        ``options.to_disk``: write ``<stem>_<W>x<H>_sdxl.npz`` files and load them per batch
        (valid files are reused, stale ones recomputed); with several processes each caches its
        own shard (``process_index`` of ``num_processes``) and entries of other shards are checked
        when first used, so synchronise the processes before training. In memory every process
        caches everything. ``flip_aug``/``alpha_mask``/interpolation come from the subsets.
        """
        self.verify_latent_cache_compat()
        return self.latent_cache.run(self, encode_fn, vae_id, options or LatentCacheOptions(),
                                     process_index, num_processes)

    def cache_text_encoder_outputs(self, encode_fn: Callable, te_id: str,
                                   options: Optional[TextEncoderCacheOptions] = None, *,
                                   process_index: int = 0, num_processes: int = 1) -> CacheRunReport:
        """Encode every caption once with ``encode_fn`` (captions -> (h1, h2, pool2)); batches
        then carry ``te_outputs``. Disk files are ``<stem>_te_outputs.npz``; sharding as for
        :meth:`cache_latents`. ``max_token_length`` comes from :class:`DataOptions`."""
        self.verify_text_encoder_cache_compat()
        options = replace(options or TextEncoderCacheOptions(),
                          max_token_length=self.options.max_token_length)
        return self.te_cache.run(self, encode_fn, te_id, options, process_index, num_processes)

    def cache_caption(self, index: int) -> str:
        """The fixed caption of item ``index`` as its text-encoder output is cached."""
        item = self.items[index]
        opts = self._caption_opts[item.dataset_index][item.subset_index]
        rng = random.Random(f"te-cache:{self.options.seed}:{item.path}")
        return process_caption(item.caption, opts, rng, 1, 0)

    def interpolation(self, index: int) -> Optional[str]:
        """The resize filter name used for item ``index`` (None: the default rule)."""
        item = self.items[index]
        sub = self.configs[item.dataset_index].subsets[item.subset_index]
        return sub.resize_interpolation or self.options.resize_interpolation

    def subset_of(self, index: int) -> Any:
        """The :class:`SubsetConfig` of item ``index``."""
        item = self.items[index]
        return self.configs[item.dataset_index].subsets[item.subset_index]

    # --- metadata (ss_* keys) ---------------------------------------------------------------------

    @property
    def num_train_images(self) -> int:
        """Training images times their repeats (``ss_num_train_images``), without held-out
        validation images."""
        return sum(it.num_repeats for i, it in enumerate(self.items)
                   if not it.is_reg and i not in self._held_out)

    @property
    def num_validation_images(self) -> int:
        """Images held out by ``validation_split`` (``ss_num_validation_images``)."""
        return len(self._held_out)

    @property
    def num_reg_images(self) -> int:
        """Regularisation images times their repeats, before balancing (``ss_num_reg_images``)."""
        return sum(i.num_repeats for i in self.items if i.is_reg)

    def bucket_info(self, dataset_index: Optional[int] = None) -> dict:
        """``ss_bucket_info``: samples per bucket and the mean aspect-ratio error, for one dataset
        or (None) all datasets together."""
        ds = range(len(self.configs)) if dataset_index is None else [dataset_index]
        return bucket_summary([BucketAssignment(self.items[i].bucket, self.items[i].resized_size,
                                                self.items[i].ar_error)
                               for d in ds for i in self._samples[d]])

    def tag_frequency(self, dataset_index: Optional[int] = None) -> dict:
        """``ss_tag_frequency``: ``{folder or metadata file name: {tag: count}}``."""
        out: dict = {}
        for d, ds in enumerate(self.configs):
            if dataset_index is not None and d != dataset_index:
                continue
            for s, sub in enumerate(ds.subsets):
                captions = [i.caption for i in self.items if (i.dataset_index, i.subset_index) == (d, s)]
                out[subset_label(sub)] = count_tags(captions, sub.caption_separator)
        return out

    def dataset_dirs(self, reg: bool = False) -> dict:
        """``ss_dataset_dirs`` (or, ``reg=True``, ``ss_reg_dataset_dirs``):
        ``{folder name: {"n_repeats": r, "img_count": n}}``."""
        out: dict = {}
        for d, ds in enumerate(self.configs):
            for s, sub in enumerate(ds.subsets):
                if bool(sub.is_reg) != reg:
                    continue
                count = sum(1 for i in self.items if (i.dataset_index, i.subset_index) == (d, s))
                out[subset_label(sub)] = {"n_repeats": sub.num_repeats, "img_count": count}
        return out

    def datasets_metadata(self) -> list[dict]:
        """``ss_datasets``: one JSON-ready dict per dataset, with its subsets (sd-scripts' layout;
        folders and metadata files by name only)."""
        return [self._dataset_metadata(d, ds) for d, ds in enumerate(self.configs)]

    def _dataset_metadata(self, d: int, ds: DatasetConfig) -> dict:
        items = [it for i, it in enumerate(self.items) if it.dataset_index == d and i not in self._held_out]
        subsets = []
        for s, sub in enumerate(ds.subsets):
            entry = {"img_count": sum(1 for i in items if i.subset_index == s)}
            for key in ("num_repeats", "color_aug", "flip_aug", "random_crop", "shuffle_caption",
                        "keep_tokens", "keep_tokens_separator", "secondary_separator",
                        "enable_wildcard", "caption_prefix", "caption_suffix", "resize_interpolation"):
                entry[key] = getattr(sub, key)
            if sub.kind == FINETUNE:
                entry["metadata_file"] = subset_label(sub)
            else:
                entry.update(image_dir=subset_label(sub), class_tokens=sub.class_tokens,
                             is_reg=sub.is_reg)
            subsets.append(entry)
        return {
            "is_dreambooth": ds.kind != FINETUNE, "is_controlnet": ds.kind == CONTROLNET,
            "batch_size_per_device": ds.batch_size,
            "num_train_images": sum(i.num_repeats for i in items if not i.is_reg),
            "num_reg_images": sum(i.num_repeats for i in items if i.is_reg),
            "resolution": list(ds.resolution), "enable_bucket": ds.enable_bucket,
            "min_bucket_reso": ds.min_bucket_reso, "max_bucket_reso": ds.max_bucket_reso,
            "bucket_no_upscale": ds.bucket_no_upscale,
            "tag_frequency": self.tag_frequency(d), "bucket_info": self.bucket_info(d),
            "resize_interpolation": ds.resize_interpolation, "subsets": subsets,
        }


# --- loader helpers -------------------------------------------------------------------------------


def collate_single(batch_list: list) -> dict:
    """Collate for a DataLoader with ``batch_size=1`` over a :class:`DatasetGroup`: the one
    batch dict itself."""
    if len(batch_list) != 1:
        raise ValueError("a DatasetGroup item is already a whole batch: use batch_size=1")
    return batch_list[0]


def make_dataloader(group: DatasetGroup, num_workers: int = 0, persistent_workers: bool = False,
                    pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader serving ``group``'s batches in the group's (seeded, per-epoch) order.

    Call ``group.set_epoch(e)`` (0-based) before iterating each epoch; it reaches the workers.
    """
    return torch.utils.data.DataLoader(
        group, batch_size=1, shuffle=False, collate_fn=collate_single, num_workers=num_workers,
        persistent_workers=bool(persistent_workers and num_workers > 0), pin_memory=pin_memory)


class PairTokenizer:
    """Picklable ``captions -> (ids1, ids2)`` for :meth:`DatasetGroup.set_tokenize_fn`: the two
    CLIP tokenizers cut into 75-token windows, (B, n, 77) each."""

    def __init__(self, tokenizer1: Any, tokenizer2: Any, max_token_length: Optional[int] = None):
        self.tokenizer1, self.tokenizer2 = tokenizer1, tokenizer2
        self.max_token_length = max_token_length

    def __call__(self, captions: Sequence[str]) -> tuple:
        from library.diffusion.conditioning import tokenize

        return (tokenize(self.tokenizer1, captions, self.max_token_length),
                tokenize(self.tokenizer2, captions, self.max_token_length))


def build_dataset_group(values: Mapping[str, Any], *,
                        allowed_kinds: Optional[Sequence[str]] = None,
                        configs: Optional[tuple[list[DatasetConfig], str]] = None) -> DatasetGroup:
    """The :class:`DatasetGroup` a script's options describe (``values``: plain option values,
    e.g. ``vars(args)``, argparse names).

    ``--dataset_config`` if given, else ``--train_data_dir``/``--reg_data_dir``/``--in_json``
    (see :func:`~library.config.dataset_cli.dataset_configs_from_values`, which also checks cache
    compatibility before any image is read). ``configs``: the ``(configs, source)`` that function
    already returned, so a script can check its dataset config before the heavy imports.
    """
    configs, source = configs or dataset_configs_from_values(values, allowed_kinds=allowed_kinds)
    return DatasetGroup(configs, DataOptions.from_values(values), source=source)
