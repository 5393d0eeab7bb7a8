"""Writing generated images while the GPU makes the next ones.

A 1024² PNG takes the host 0.1-0.2 s to compress (zlib, which releases the GIL): done inline, the GPU
waits for it after every batch. :class:`ImageWriter` runs the writes on one worker thread, in the
order they were handed over, and keeps at most a few batches waiting (their images are in host
memory). The first write error is raised in the caller's thread, at its next call.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

#: batches handed over but not yet written before :meth:`ImageWriter.submit` waits for the oldest
MAX_PENDING = 2


class ImageWriter:
    """Run write jobs (each returning a list) on one background thread; :meth:`close` gathers their results.

    Use as a context manager: leaving the block waits for every write, also when the block raised
    (the block's error then wins over a write error).
    """

    def __init__(self, max_pending: int = MAX_PENDING):
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-writer")
        self._pending: list[Future] = []
        self._results: list = []

    def submit(self, write: Callable[..., Sequence[T]], *args) -> None:
        """Queue ``write(*args)``; raises the error of an earlier write that failed."""
        self._collect(block=len(self._pending) >= self.max_pending)
        self._pending.append(self._pool.submit(write, *args))

    def _collect(self, block: bool) -> None:
        """Move finished writes' results into place (the oldest waited for when ``block``), in order."""
        while self._pending and (block or self._pending[0].done()):
            self._results.extend(self._pending.pop(0).result())
            block = False

    def close(self) -> list:
        """Wait for every write; the results of all writes, in submission order (:attr:`results`)."""
        try:
            while self._pending:
                self._collect(block=True)
        finally:
            self._pool.shutdown(wait=True)
        return self._results

    @property
    def results(self) -> list:
        """The results of the writes finished so far, in submission order."""
        return self._results

    def __enter__(self) -> "ImageWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the block's own error is the one to report
            pass
