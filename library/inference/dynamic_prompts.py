"""Dynamic prompts: ``{a|b}`` picks one alternative, ``{e$$a|b}`` enumerates every combination.

Also ``{n$$...}``, ``{n-m$$...}`` (pick n, or n to m, distinct alternatives) and a custom separator
``{n$$ and $$...}``; groups nest, and ``\\{`` ``\\}`` are literal braces.
"""

from __future__ import annotations

import itertools
import math
import random
import re

from library.errors import UserError

_DYNAMIC = re.compile(r"(?<!\\)\{([^{}]*)(?<!\\)\}")
_MAX_DYNAMIC_PROMPTS = 10000
_MAX_NESTING = 16


def _too_many_prompts(text: str) -> UserError:
    return UserError(f"dynamic prompt expands to more than {_MAX_DYNAMIC_PROMPTS} prompts; "
                     f"use fewer {{e$$...}} groups: {text[:80]!r}")


def _choice_count(spec: str, n_options: int, body: str) -> tuple[int, int]:
    """Parse the ``n``, ``n-m``, ``-m`` or ``n-`` count of ``{count$$...}``, clamped."""
    match = re.fullmatch(r"\s*(\d*)\s*(-?)\s*(\d*)\s*", spec)
    if not match or not (match.group(1) or match.group(3)):
        raise UserError(
            f"dynamic prompt {{{body}}}: {spec!r} is not a count; "
            "use {e$$a|b} to enumerate, {2$$a|b|c}, {1-3$$a|b|c} or {2$$ and $$a|b|c}"
        )
    low_text, dash, high_text = match.groups()
    low = int(low_text) if low_text else 1
    high = (int(high_text) if high_text else n_options) if dash else low
    low, high = min(low, n_options), min(high, n_options)
    return min(low, high), max(low, high)


def _alternatives(body: str, rng: random.Random) -> list[str]:
    """The replacements for one ``{...}`` group: every option for ``e$$``, else one random pick."""
    parts = body.split("$$")
    if len(parts) == 1:
        return [rng.choice(body.split("|"))]
    count_spec = parts[0]
    separator = parts[1] if len(parts) >= 3 else ", "
    options = "$$".join(parts[2:] if len(parts) >= 3 else parts[1:]).split("|")
    if count_spec.strip().lower() == "e":
        return options
    low, high = _choice_count(count_spec, len(options), body)
    count = rng.randint(low, high)
    return [separator.join(rng.sample(options, count))]


def _expand_once(text: str, rng: random.Random) -> list[str]:
    """Expand every innermost ``{...}`` group of ``text`` once (all enumeration combinations)."""
    matches = list(_DYNAMIC.finditer(text))
    choices = [_alternatives(m.group(1), rng) for m in matches]
    if math.prod(len(options) for options in choices) > _MAX_DYNAMIC_PROMPTS:
        raise _too_many_prompts(text)
    results = []
    for combination in itertools.product(*choices):
        pieces, last = [], 0
        for match, replacement in zip(matches, combination):
            pieces.append(text[last:match.start()])
            pieces.append(replacement)
            last = match.end()
        pieces.append(text[last:])
        results.append("".join(pieces))
    return results


def expand_dynamic_prompts(text: str, rng: random.Random) -> list[str]:
    """Expand dynamic-prompt groups and return the resulting prompts.

    ``{a|b|c}`` picks one option with ``rng``; ``{2$$a|b|c}`` picks two distinct options joined with
    ``", "``; ``{1-3$$...}`` picks between one and three; ``{2$$ and $$a|b|c}`` joins with
    ``" and "``; ``{e$$a|b}`` enumerates: the result holds one prompt per option, and several
    enumeration groups give every combination (first group varies slowest). Random picks of
    un-nested groups are made once per call and shared by all enumerated prompts; groups may nest
    (inner groups are resolved first, outer ones then per resulting prompt). ``\\{`` and ``\\}``
    are literal braces. A text without groups comes back as ``[text]``.
    """
    results = [text]
    for _ in range(_MAX_NESTING):
        if not any(_DYNAMIC.search(t) for t in results):
            break
        expanded: list[str] = []
        for item in results:
            expanded.extend(_expand_once(item, rng) if _DYNAMIC.search(item) else [item])
            if len(expanded) > _MAX_DYNAMIC_PROMPTS:
                raise _too_many_prompts(text)
        results = expanded
    return [item.replace("\\{", "{").replace("\\}", "}") for item in results]
