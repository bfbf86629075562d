"""Read ahead mapped shard files: tell the kernel, from a background thread, to start reading
the whole files of the shards the epoch plan reads next.

A mapped shard that is not in the page cache (the first epoch after packing or a reboot, or a
store larger than what stays cached) is read by page faults, one fault-around at a time, by
the thread that needs the sample: one stream of small reads, where the disk gives its best to
many large ones in flight. ``posix_fadvise(POSIX_FADV_WILLNEED)`` over a whole file makes the
kernel queue its reads at once; the shards of the next batches are then read while the current
ones are served. Shards already in the page cache are seen as such (a one-byte ``preadv`` with
``RWF_NOWAIT`` at a few offsets, which fails rather than waits for a page not cached) and
skipped, so a warm epoch pays a few system calls per shard.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

_HAVE = hasattr(os, "posix_fadvise") and hasattr(os, "RWF_NOWAIT")
#: Offsets probed for residency, as fractions of the file (its start, middle and end).
_PROBES = (0.0, 0.5, 0.999)


def cached(fd: int, size: int) -> bool:
    """Whether the file's pages at a few offsets are in the page cache (a hint: a file partly
    cached may read as cached, then its missing pages are faulted in as without read-ahead)."""
    buf = bytearray(1)
    for frac in _PROBES:
        try:
            if os.preadv(fd, [buf], int(size * frac), os.RWF_NOWAIT) != 1:
                return False
        except BlockingIOError:
            return False
        except OSError:  # RWF_NOWAIT refused by this file system: cannot tell, read ahead
            return False
    return True


def will_need(path: str) -> None:
    """Ask the kernel to start reading ``path`` whole, unless it is cached already."""
    with contextlib.suppress(OSError):  # only a hint: a file gone or refused is read as before
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size and not cached(fd, size):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


class ShardReadAhead:
    """One daemon thread asking the kernel to read shard files ahead, in the order given.

    ``path_of(k)`` gives shard ``k``'s file. :meth:`want` queues shards not yet asked for in
    that epoch; a shard asked for in one epoch is asked again in the next (it may have been
    evicted meanwhile). Holds no file open between calls.
    """

    def __init__(self, path_of: Callable[[int], str]) -> None:
        self._path_of = path_of
        self._asked: tuple[int, set[int]] = (-1, set())
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def want(self, epoch: int, shards: Iterable[int]) -> None:
        if not _HAVE:
            return
        with self._lock:
            if self._asked[0] != epoch:
                self._asked = (epoch, set())
            asked = self._asked[1]
            new = [k for k in shards if k not in asked]
            asked.update(new)
            if new and self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="shardfit-readahead", daemon=True
                )
                self._thread.start()
        for k in new:
            self._queue.put(self._path_of(k))

    def _run(self) -> None:
        while (path := self._queue.get()) is not None:
            will_need(path)

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            self._asked = (-1, set())
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=5)
