"""A1111 attention weights in prompt text: ``(word)``, ``[word]``, ``(word:1.3)``, ``BREAK``.

Pure text handling, below both training (``--weighted_captions``) and generation: the prompt is cut
into ``(text, weight)`` runs (:func:`parse_prompt_attention`) and tokenised run by run so every
token carries its run's weight (:func:`tokenize_weighted`). :mod:`library.text.weighting` turns those
weights into weighted text-encoder outputs.
"""

from __future__ import annotations

import logging
import re
from typing import Any

logger = logging.getLogger(__name__)

BREAK_WEIGHT = -1.0
"""Weight of the ``("BREAK", BREAK_WEIGHT)`` marker :func:`parse_prompt_attention` emits."""

_EMPHASIS = 1.1
_ATTENTION_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]                                  # escaped bracket or backslash
    | :\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)     # explicit weight closing a round bracket
    | [()\[\]]                                    # bracket
    | [^\\()\[\]:]+                               # plain text
    | [\\:]                                       # a lone backslash or colon
    """,
    re.X,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")


def _append_text(result: list[list], text: str) -> None:
    """Append plain text to ``result``, turning each standalone ``BREAK`` into a marker."""
    pieces = _BREAK_SPLIT.split(text)
    for index, piece in enumerate(pieces):
        if index > 0:
            result.append(["BREAK", BREAK_WEIGHT, True])
        if piece:
            result.append([piece, 1.0, False])


def _scale_from(result: list[list], start: int, factor: float) -> None:
    for entry in result[start:]:
        if not entry[2]:
            entry[1] *= factor


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` runs using the A1111 emphasis syntax.

    ``(a)`` multiplies by 1.1, ``((a))`` by 1.21, ``[a]`` divides by 1.1, ``(a:1.3)`` sets 1.3
    (times any enclosing brackets). ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters.
    Unbalanced brackets are tolerated: an unclosed bracket applies to the rest of the prompt and
    an unmatched closing bracket is kept as text. A standalone ``BREAK`` gives a
    ``("BREAK", BREAK_WEIGHT)`` marker. Adjacent runs with equal weight are merged.

    >>> parse_prompt_attention("a (cat:1.5) [dog]")
    [('a ', 1.0), ('cat', 1.5), (' ', 1.0), ('dog', 0.9090909090909091)]
    """
    result: list[list] = []  # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []
    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if len(token) == 2 and token[0] == "\\":
            result.append([token[1], 1.0, False])
        elif token == "(":
            round_open.append(len(result))
        elif token == "[":
            square_open.append(len(result))
        elif weight is not None and round_open:
            _scale_from(result, round_open.pop(), float(weight))
        elif token == ")" and round_open:
            _scale_from(result, round_open.pop(), _EMPHASIS)
        elif token == "]" and square_open:
            _scale_from(result, square_open.pop(), 1.0 / _EMPHASIS)
        else:
            _append_text(result, token)
    for start in round_open:
        _scale_from(result, start, _EMPHASIS)
    for start in square_open:
        _scale_from(result, start, 1.0 / _EMPHASIS)

    merged: list[list] = []
    for entry in result:
        if merged and not entry[2] and not merged[-1][2] and merged[-1][1] == entry[1]:
            merged[-1][0] += entry[0]
        else:
            merged.append(entry)
    if not merged:
        return [("", 1.0)]
    return [(entry[0], entry[1]) for entry in merged]


def tokenize_weighted(tokenizer: Any, text: str,
                      max_length_windows: int) -> tuple[list[int], list[float]]:
    """Tokenize a weighted prompt: token ids WITHOUT BOS/EOS and one weight per token.

    ``tokenizer`` is a Hugging Face CLIP tokenizer; each weighted run is tokenized on its own with
    ``add_special_tokens=False``. ``BREAK`` pads with the tokenizer's pad id (else EOS) to the next
    75-token window boundary. The result is cut to ``75 * max_length_windows`` tokens (a warning
    is logged); the caller wraps each 75-token window in BOS ... EOS/PAD.
    """
    if max_length_windows < 1:
        raise ValueError("max_length_windows must be at least 1")
    window = 75
    limit = window * max_length_windows
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_prompt_attention(text):
        if weight == BREAK_WEIGHT and piece == "BREAK":
            fill = (-len(ids)) % window
            ids.extend([pad_id] * fill)
            weights.extend([1.0] * fill)
            continue
        if not piece:
            continue
        piece_ids = list(tokenizer(piece, add_special_tokens=False).input_ids)
        ids.extend(piece_ids)
        weights.extend([float(weight)] * len(piece_ids))
    if len(ids) > limit:
        logger.warning(
            "prompt is %d tokens, longer than %d (%d windows of 75); the rest is ignored: %r",
            len(ids), limit, max_length_windows, text[:80],
        )
        ids, weights = ids[:limit], weights[:limit]
    return ids, weights
