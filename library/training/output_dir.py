"""Preparing the folders a run writes to, before anything heavy loads.

* :func:`check_writable_dir`: the folder exists or can be created, is a folder (not a file) and
  accepts a new file (a probe is written and removed), so a finished run is never lost at its
  final save because ``--output_dir`` is read-only or names an existing file.
* :class:`OutputLock`: a lock file held while a run writes to an output folder; a second run
  writing to the same folder at the same time stops with one line. The lock is an ``flock`` on
  ``.sdxl_trainer.lock`` (removed at the end of the run), so the kernel releases it when the holder
  dies (kill -9 included) and a stale file never blocks a later run.
* :func:`remove_orphaned_temp_files`: our own temporary files and folders left behind by a killed
  save are removed at the next start in that folder, while the lock is held (so they cannot belong
  to a run that is still writing). Only names that match our temp-name patterns exactly are
  touched (:func:`is_our_temp_name`); a user's file is never deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from library.errors import UserError

logger = logging.getLogger(__name__)

LOCK_NAME = ".sdxl_trainer.lock"

# Names our writers give temporaries (see library.models.atomic, checkpoint_io, state_io):
#   ".{target}.{8 random chars from mkstemp/mkdtemp}.tmp"   files (atomic_path) and state folders
#   "{target}.tmp-saving", "{target}.tmp-old"               diffusers folders being replaced
_MKSTEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_DIR_SUFFIXES = (".tmp-saving", ".tmp-old")
_PROBE_PREFIX = ".sdxl_trainer_write_probe."


def is_our_temp_name(name: str) -> bool:
    """True when ``name`` is a temporary name one of our writers gives (never a user's file name)."""
    if _MKSTEMP_NAME.match(name):
        return True
    if name.startswith(_PROBE_PREFIX) and name.endswith(".tmp"):
        return True
    return any(name.endswith(s) and len(name) > len(s) for s in _DIR_SUFFIXES)


def check_writable_dir(path: str | os.PathLike, option: str, create: bool = True) -> Path:
    """Make sure ``path`` is (or can become) a folder we can write to; raise a one-line UserError.

    ``option`` names the option in the message (e.g. ``--output_dir``). With ``create`` the
    folder is created (with its parents) so the probe can be written.
    """
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder} is an existing file, not a folder; give a folder path")
    if not folder.exists():
        parent = _nearest_existing(folder)
        if not parent.is_dir():
            raise UserError(f"{option} {folder}: {parent} is a file, so the folder cannot be created")
        if not create:
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{option} {folder} cannot be created: {parent} is not writable")
            return folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{option} {folder} cannot be created: {exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{option} {folder} is not writable ({exc.strerror or exc}); fix its permissions "
                        "or choose another folder") from None
    return folder


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class OutputLock:
    """An exclusive lock on an output folder for the lifetime of a run (``with`` or acquire/release)."""

    def __init__(self, folder: str | os.PathLike, option: str = "--output_dir"):
        self.folder = Path(folder)
        self.option = option
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        """Take the lock or raise a UserError naming the run that holds it."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(f"{self.option} {self.folder} is in use by another run{holder}; wait for it to "
                            "finish or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock back and remove the lock file (a leftover file, e.g. after a kill, is unlocked
        and means nothing: the next run takes it)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # still holding the lock, so no other run is between open and flock
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip() or "0")
        if pid:
            return f" (process {pid})"
    return ""


def remove_orphaned_temp_files(folder: str | os.PathLike, subfolders: tuple[str, ...] = ("sample",)) -> list[Path]:
    """Delete our temporaries in ``folder`` (and the given subfolders); returns what was removed.

    Call only while holding the folder's :class:`OutputLock`.
    """
    removed: list[Path] = []
    roots = [Path(folder)] + [Path(folder) / s for s in subfolders]
    for root in roots:
        if not root.is_dir():
            continue
        for entry in os.scandir(root):
            if not is_our_temp_name(entry.name) or entry.is_symlink():
                continue
            path = Path(entry.path)
            try:
                if entry.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError as exc:
                logger.warning("could not remove the leftover temporary %s: %s", path, exc)
                continue
            removed.append(path)
    if removed:
        logger.info("removed %d leftover temporary file(s) of an interrupted save in %s: %s", len(removed),
                    folder, ", ".join(p.name for p in removed))
    return removed


def is_main_launch_process() -> bool:
    """True in a plain run and in the global rank-0 process of ``accelerate launch`` (before the
    accelerator exists: read from the launcher's environment)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def prepare_output_dirs(output_dir: str, logging_dir: str | None = None) -> OutputLock | None:
    """Check ``--output_dir`` (and its ``sample`` folder) and ``--logging_dir``; in the main
    process lock the output folder and remove leftover temporaries. Returns the held lock."""
    if not output_dir:
        raise UserError("--output_dir is required: the folder the trained model is saved to")
    out = check_writable_dir(output_dir, "--output_dir")
    sample = out / "sample"
    if sample.exists() and not sample.is_dir():
        raise UserError(f"{sample} is a file; sample images are written to this folder: move the file away")
    if logging_dir:
        check_writable_dir(logging_dir, "--logging_dir")
    if not is_main_launch_process():
        return None
    lock = OutputLock(out).acquire()
    remove_orphaned_temp_files(out)
    return lock
