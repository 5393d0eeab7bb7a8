"""ImageWriter: background writes keep their order, bound the queue and never lose an error."""

from __future__ import annotations

import threading
import time

import pytest

from library.inference.image_writer import ImageWriter


def test_results_in_submission_order_and_written_off_the_callers_thread():
    threads = []

    def write(name: str, delay: float) -> list[str]:
        time.sleep(delay)
        threads.append(threading.current_thread().name)
        return [name]

    with ImageWriter() as writer:
        for name, delay in (("a", 0.05), ("b", 0.0), ("c", 0.02)):
            writer.submit(write, name, delay)
    assert writer.results == ["a", "b", "c"]
    assert all(t.startswith("image-writer") for t in threads)


def test_at_most_max_pending_batches_wait():
    release = threading.Event()
    started = []

    def write(i: int) -> list[int]:
        started.append(i)
        release.wait(5)
        return [i]

    writer = ImageWriter(max_pending=2)
    writer.submit(write, 0)
    writer.submit(write, 1)
    blocked = threading.Thread(target=writer.submit, args=(write, 2))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # the third batch waits for the first write
    release.set()
    blocked.join(5)
    assert writer.close() == [0, 1, 2]


def test_a_failed_write_raises_at_the_next_call():
    def fail() -> list:
        raise OSError("No space left on device")

    writer = ImageWriter()
    writer.submit(fail)
    time.sleep(0.1)
    with pytest.raises(OSError, match="No space"):
        writer.submit(lambda: ["never"])
    writer = ImageWriter()
    writer.submit(fail)
    with pytest.raises(OSError, match="No space"):
        writer.close()


def test_leaving_on_an_error_waits_for_the_writes_and_keeps_that_error():
    done = []

    def slow() -> list[str]:
        time.sleep(0.1)
        done.append(True)
        return ["x"]

    with pytest.raises(KeyboardInterrupt):
        with ImageWriter() as writer:
            writer.submit(slow)
            raise KeyboardInterrupt
    assert done == [True]  # the queued image was still written
