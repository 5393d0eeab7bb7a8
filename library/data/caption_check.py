"""Say when images of a folder are trained without their caption files.

An image without ``<stem><caption_extension>`` silently falls back to its folder's class tokens
(``10_sks dog`` -> "sks dog"), or to an empty caption in a ControlNet subset. The usual cause is a
caption extension that does not match the files (the default is ``.caption``, most captioning
tools write ``.txt``), so the warning names the extension actually found next to those images.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Optional, Sequence

from library.data.images import is_image_path

logger = logging.getLogger(__name__)

# Files that sit next to images but are never captions (our caches, sd-scripts' caches, metadata).
_NOT_CAPTIONS = (".npz", ".json", ".jsonl", ".toml", ".safetensors", ".ckpt", ".pt", ".py")


def sibling_extensions(image_paths: Sequence[str]) -> Counter:
    """How many of ``image_paths`` have a non-image file ``<stem>.<ext>`` beside them, per ``ext``.

    Each folder is listed once; cache files (``.npz``) and metadata files are not counted.
    """
    by_folder: dict[str, dict[str, set[str]]] = {}
    found: Counter = Counter()
    for path in image_paths:
        folder, name = os.path.split(path)
        index = by_folder.get(folder)
        if index is None:
            index = {}
            try:
                names = os.listdir(folder or ".")
            except OSError:
                names = []
            for other in names:
                stem, ext = os.path.splitext(other)
                if ext and not is_image_path(other) and ext.lower() not in _NOT_CAPTIONS:
                    index.setdefault(stem, set()).add(ext)
            by_folder[folder] = index
        for ext in index.get(os.path.splitext(name)[0], ()):
            found[ext] += 1
    return found


def caption_fallback_message(folder: str, caption_extension: str, fallback: Sequence[str], total: int,
                             class_tokens: Optional[str]) -> Optional[str]:
    """The warning for ``fallback`` images of ``folder`` (out of ``total``) that have no caption file.

    ``class_tokens`` is what they are trained with instead (None or "" for an empty caption).
    Returns None when every image has its caption file.
    """
    if not fallback:
        return None
    instead = f"their folder's class tokens '{class_tokens}'" if class_tokens else "an empty caption"
    msg = (f"{len(fallback)} of {total} images in {folder} have no '{caption_extension}' caption file and are "
           f"trained with {instead}")
    others = sibling_extensions(fallback)
    if others:
        ext, count = others.most_common(1)[0]
        msg += (f"; {count} of them have a '{ext}' file next to them: if those are the captions, set "
                f"caption_extension = \"{ext}\" (--caption_extension {ext})")
    else:
        msg += "; no other caption-like file was found next to them"
    return msg


def warn_caption_fallbacks(folder: str, caption_extension: str, fallback: Sequence[str], total: int,
                           class_tokens: Optional[str]) -> None:
    """Log :func:`caption_fallback_message` as one warning (nothing when there is no fallback)."""
    msg = caption_fallback_message(folder, caption_extension, fallback, total, class_tokens)
    if msg:
        logger.warning(msg)
