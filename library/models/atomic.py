"""Write outputs so that a crash never leaves a half-written file in place of a good one."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from library.errors import UserError

# errno values meaning "no room for this file": disk full, quota exceeded, file-size limit.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def is_no_space(exc: BaseException) -> bool:
    """True for "no room for this file" errors: an OSError with such an errno, or a writer's own
    error that wraps one (safetensors raises ``SafetensorError('... (os error 28)')``)."""
    if isinstance(exc, OSError):
        return exc.errno in NO_SPACE_ERRNOS
    text = str(exc)
    return any(f"os error {n})" in text for n in NO_SPACE_ERRNOS) or "No space left on device" in text


def no_space_error(target: Path, needed: int | None, exc: OSError) -> UserError:
    """The one line for a save that found no room: the file, the space it needs and what is free."""
    try:
        free = _size(shutil.disk_usage(target.parent).free)
    except OSError:
        free = "unknown"
    need = f"about {_size(needed)} needed, " if needed else ""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).split(": ")[-1]
    kept = f"; the previous {target.name} is intact" if target.exists() else ""
    return UserError(f"cannot write {target}: no space ({reason}; {need}{free} free on its "
                     f"disk){kept}. Free some space or choose another output folder")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``.

    The temporary file lives in the same folder (same filesystem) so ``os.replace`` is atomic.
    On any exception it is removed and ``target`` is left as it was; running out of space
    becomes a one-line :class:`UserError` naming the file and ``size_hint`` (bytes it needs).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if size_hint and shutil.disk_usage(target.parent).free < size_hint:  # fail before writing anything
        raise no_space_error(target, size_hint, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, Exception) and is_no_space(exc):
            raise no_space_error(target, size_hint, exc) from None
        raise


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` in place of ``target`` (renames; the old one is removed after).

    ``target`` is never missing for longer than between two renames, and never half-written.
    """
    old = target.with_name(target.name + ".tmp-old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
