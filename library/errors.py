"""The one exception type that reaches a user.

Library code raises :class:`UserError` for anything the user can fix (a bad option, a missing or
malformed file, an incompatible combination). Scripts catch it at the top level, print its message
on one line prefixed with ``error:`` and exit with status 2, so nobody sees a bare traceback for a
mistake in their own input.
"""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


def first_error(exc: BaseException) -> str:
    """``Type: first line`` of the error that started ``exc``'s chain, for a one-line log.

    Some failures (the end of a CUDA graph capture, say) raise a follow-up error whose context holds
    the one that matters.
    """
    while exc.__context__ is not None:
        exc = exc.__context__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def run_cli(main: Callable[[], T]) -> T:
    """Run a script's ``main`` and turn a :class:`UserError` into one line on stderr and exit 2.

    First, before anything starts CUDA, the allocator setting every script runs with
    (:func:`library.cuda_allocator.prefer_expandable_segments`).
    """
    from library.cuda_allocator import prefer_expandable_segments

    prefer_expandable_segments()
    try:
        return main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
