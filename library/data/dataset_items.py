"""The parts of :mod:`library.data.dataset`: the items of each subset and how they are counted.

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
regularisation samples as training samples. :mod:`library.data.sample_pixels` turns an item and
its crop into tensors; :mod:`library.data.cache_state` maps each item to its cached entry.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence


from library.config.dataset_toml import CONTROLNET, FINETUNE, SubsetConfig
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
