"""Caption files and per-sample caption processing.

Reading: :func:`read_caption` finds ``<image stem><caption_extension>`` next to an image.
Processing: :func:`process_caption` applies, in sd-scripts' order, prefix/suffix, whole-caption
dropout, wildcards (``{a|b}``, one random line of a multi-line caption), then the tag operations
(keep_tokens / keep_tokens_separator, token warm-up, shuffle, tag dropout) and finally the
secondary separator. Every random decision draws from the ``random.Random`` passed in, so a
caption is a pure function of (text, options, rng state, epoch, step).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from library.errors import UserError


@dataclass(frozen=True)
class CaptionOptions:
    """The caption options of one subset (names and defaults as in the dataset TOML).

    ``token_warmup_step`` must already be an absolute step count here; use
    :func:`resolve_token_warmup_step` for the "fraction of max_train_steps" form.
    """

    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    enable_wildcard: bool = False
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: Optional[str] = None
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: int = 0

    @classmethod
    def from_subset(cls, subset: Any, max_train_steps: Optional[int] = None) -> "CaptionOptions":
        """Build from any object with the subset attributes (e.g. a ``SubsetConfig``)."""
        values = {name: getattr(subset, name) for name in cls.__dataclass_fields__
                  if getattr(subset, name, None) is not None}
        if "token_warmup_step" in values:
            values["token_warmup_step"] = resolve_token_warmup_step(
                values["token_warmup_step"], max_train_steps)
        return cls(**values)

    @property
    def uses_tag_ops(self) -> bool:
        """True when the caption is split into tags (shuffle, tag dropout or token warm-up)."""
        return bool(self.shuffle_caption or self.caption_tag_dropout_rate > 0
                    or self.token_warmup_step > 0)

    @property
    def is_random(self) -> bool:
        """True when the same caption can come out differently between epochs or steps.

        Captions that change cannot be served from a text-encoder output cache.
        """
        return bool(self.uses_tag_ops or self.caption_dropout_rate > 0
                    or self.caption_dropout_every_n_epochs > 0 or self.enable_wildcard)


def resolve_token_warmup_step(value: float, max_train_steps: Optional[int]) -> int:
    """``token_warmup_step`` as steps: values below 1 are a fraction of ``max_train_steps``."""
    if value <= 0:
        return 0
    if value < 1:
        if max_train_steps is None:
            raise ValueError("a fractional token_warmup_step needs max_train_steps")
        return math.floor(value * max_train_steps)
    return int(value)


def caption_path_candidates(image_path: str | Path, extension: str = ".caption") -> list[Path]:
    """Caption files that may belong to ``image_path``, in the order they are tried.

    ``<stem><extension>`` first; for a face-crop output named ``<stem>_<4 numbers>`` also
    ``<stem><extension>``. An extension without a leading ``.`` is also tried with one.
    """
    image_path = Path(image_path)
    stems = [image_path.stem]
    parts = image_path.stem.split("_")
    if len(parts) >= 5:
        stems.append("_".join(parts[:-4]))
    extensions = [extension]
    if not extension.startswith("."):
        extensions.append("." + extension)
    return [image_path.with_name(stem + ext) for ext in extensions for stem in stems]


def read_caption(image_path: str | Path, extension: str = ".caption", *,
                 enable_wildcard: bool = False,
                 rng: Optional[random.Random] = None) -> Optional[str]:
    """Read the caption of an image, or return None when it has no caption file.

    Only the first non-empty line is used; with ``enable_wildcard`` all non-empty lines are
    kept (joined by ``\\n``) so that :func:`process_caption` picks one at random per sample, or,
    if ``rng`` is given, one random line is picked here. A file that is not UTF-8 raises
    :class:`UserError` naming it. An empty file gives ``""``.
    """
    for candidate in caption_path_candidates(image_path, extension):
        if candidate.is_file():
            return _read_caption_file(candidate, enable_wildcard, rng)
    return None


def _read_caption_file(path: Path, enable_wildcard: bool, rng: Optional[random.Random]) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"caption file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); re-save it with UTF-8 encoding"
        ) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    if not enable_wildcard:
        return lines[0]
    if rng is not None:
        return rng.choice(lines)
    return "\n".join(lines)


def expand_wildcards(text: str, rng: random.Random) -> str:
    """Replace each ``{a|b|c}`` with one option chosen by ``rng``; ``{{``/``}}`` give ``{``/``}``.

    A ``{`` without a matching ``}`` (or with a ``{`` inside) is kept literally.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char in "{}" and text.startswith(char * 2, i):
            out.append(char)
            i += 2
            continue
        if char == "{":
            end = text.find("}", i + 1)
            inner = text[i + 1:end] if end != -1 else ""
            if end != -1 and "{" not in inner:
                out.append(rng.choice(inner.split("|")))
                i = end + 1
                continue
        out.append(char)
        i += 1
    return "".join(out)


def _split_tags(text: str, separator: str) -> list[str]:
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def _split_fixed_flexible(caption: str,
                          opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """Split a caption into (fixed prefix tags, flexible tags, fixed suffix tags)."""
    sep = opts.caption_separator
    keep_sep = opts.keep_tokens_separator
    if keep_sep and keep_sep in caption:
        fixed_part, flex_part = caption.split(keep_sep, 1)
        suffix_part = ""
        if keep_sep in flex_part:
            flex_part, suffix_part = flex_part.split(keep_sep, 1)
        return (_split_tags(fixed_part, sep), _split_tags(flex_part, sep),
                _split_tags(suffix_part, sep))
    tags = _split_tags(caption, sep)
    keep = max(0, opts.keep_tokens)
    return tags[:keep], tags[keep:], []


def _apply_tag_ops(caption: str, opts: CaptionOptions, rng: random.Random, step: int) -> str:
    fixed, flexible, fixed_suffix = _split_fixed_flexible(caption, opts)
    if opts.token_warmup_step > 0 and step < opts.token_warmup_step:
        # Grow the flexible part linearly from token_warmup_min tags to all of them.
        span = len(flexible) - opts.token_warmup_min
        count = math.floor(step * span / opts.token_warmup_step) + opts.token_warmup_min
        flexible = flexible[:max(0, count)]
    if opts.shuffle_caption:
        rng.shuffle(flexible)
    if opts.caption_tag_dropout_rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= opts.caption_tag_dropout_rate]
    return ", ".join(fixed + flexible + fixed_suffix)


def _add_prefix_suffix(caption: str, opts: CaptionOptions) -> str:
    if opts.caption_prefix:
        caption = f"{opts.caption_prefix} {caption}"
    if opts.caption_suffix:
        caption = f"{caption} {opts.caption_suffix}"
    return caption


def is_caption_dropped(opts: CaptionOptions, rng: random.Random, epoch: int) -> bool:
    """Whole-caption dropout: by rate (draws from ``rng`` only when the rate is > 0) or on every
    ``caption_dropout_every_n_epochs``-th epoch (``epoch`` is 1-based)."""
    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    every = opts.caption_dropout_every_n_epochs
    return dropped or (every > 0 and epoch % every == 0)


def process_caption(text: str, opts: CaptionOptions, rng: random.Random, epoch: int = 1,
                    step: int = 0) -> str:
    """Turn a raw caption into the text the model sees for one sample.

    Order: prefix/suffix (added to every line of a multi-line caption) -> whole-caption dropout
    (returns ``""``) -> with ``enable_wildcard`` one random line and ``{a|b}`` choices -> tag
    operations when shuffling, tag dropout or token warm-up is on, or when the caption contains
    ``keep_tokens_separator`` -> ``secondary_separator`` replaced by ``caption_separator``.
    ``epoch`` is 1-based (as sd-scripts counts), ``step`` the global step (0-based) used by token
    warm-up. Tags are rejoined with ``", "`` (as sd-scripts does).
    """
    lines = text.split("\n") if "\n" in text else [text]
    lines = [_add_prefix_suffix(line, opts) for line in lines]
    if is_caption_dropped(opts, rng, epoch):
        return ""
    if opts.enable_wildcard:
        caption = rng.choice(lines) if len(lines) > 1 else lines[0]
        caption = expand_wildcards(caption, rng)
    else:
        caption = lines[0]
    if opts.uses_tag_ops or (opts.keep_tokens_separator and opts.keep_tokens_separator in caption):
        caption = _apply_tag_ops(caption, opts, rng, step)
    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption
