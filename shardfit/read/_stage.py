"""Whole shards read ahead along the epoch plan into memory: the read path for data larger than
the page cache can hold.

Under a memory limit smaller than the store, every epoch reads every byte from disk, and the disk
gives most to a few long sequential reads in flight at once; reading sample by sample in the
plan's shuffled order gets much less (docs/design.md, "Random vs sequential reads"). The plan
shuffles shards, then samples within a window of ``window`` shards, so what an epoch reads next
is known: the shards of the plan, in its order. :class:`ShardStager` reads them whole, each by
one thread in large sequential reads, ``streams`` at a time, into buffers that are reused
(mapping fresh memory for every shard costs more CPU than the reads themselves: page faults and
zeroing), and batches copy their samples out of those buffers.

Shards are keyed by where they lie in the stream of epochs: ``(epoch, position in that epoch's
shard order)``. The shards from the window of the next batch to serve (the low-water mark, moved
by :meth:`ShardStager.advance`) up to ``ahead`` shards later are kept read or being read; a
batch being built holds the shards it copies from, so no buffer is reused under it. Memory: about
``window + streams + 1`` buffers of one shard file each.

The page cache is told to drop each shard file once it is read (``POSIX_FADV_DONTNEED``): the
bytes are in our buffer now, and a page cache left to fill up under a cgroup limit is reclaimed
at a CPU cost, with the limit's failure counter climbing, while this process waits on it.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import numpy as np
import numpy.typing as npt

from shardfit.errors import DatasetFormatError
from shardfit.read._epoch import shard_order
from shardfit.read._reader import ShardGetter, ShardView, SplitReader, _choose_io, memory_bytes
from shardfit.read.options import IoChoice, Mode
from shardfit.store._format import shard_path

__all__ = ["STREAMS", "ShardStager", "drops_cache", "read_path"]

#: Shard files read at once by a stager. Measured on the 12 GB store under a 3.7 GiB limit
#: (docs/design.md, "Reading whole shards ahead"): 4 streams 3,116 img/s, 8 streams 3,174, the
#: benchmark's 8-thread parallel-read ceiling 2,875 in the same run.
STREAMS = 4

#: Bytes per read call: large enough that a sequential stream keeps the disk busy (the kernel
#: reads ahead of it as well), small enough that a stream hands over its shard soon after the
#: last byte arrives.
_READ_BYTES = 8 << 20
_ALIGN = 1 << 20

Key = tuple[int, int]  # (epoch, position in the epoch's shard order)
_Plan = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]


class _Slot:
    """One shard of the stream: its buffer, the read in flight or done, and who holds it."""

    __slots__ = ("buffer", "evicted", "future", "holders", "shard")

    def __init__(self, shard: int, buffer: mmap.mmap) -> None:
        self.shard = shard
        self.buffer = buffer
        self.future: Future[ShardView] | None = None
        self.holders = 0
        self.evicted = False


class ShardStager:
    """Reads the shards of the epoch plans ahead, whole, into reused buffers.

    Args:
        reader: the split's reader (whose files are read and whose index checks apply).
        seed, shuffle, window: the plan's (as :class:`~shardfit.SequenceOptions`).
        batch_size, drop_remainder: how the plan is cut into batches.
        streams: shard files read at once, each by one thread sequentially.
        drop_cache: tell the kernel to drop each file from the page cache once read.

    Thread-safe. Not picklable (threads and buffers): its owner makes one per process.
    """

    def __init__(
        self,
        reader: SplitReader,
        *,
        seed: int,
        shuffle: bool,
        window: int,
        batch_size: int,
        drop_remainder: bool,
        streams: int = STREAMS,
        drop_cache: bool = True,
    ) -> None:
        self._reader = reader
        self._seed = seed
        self._shuffle = shuffle
        self._window = window
        self._batch = batch_size
        self._drop_remainder = drop_remainder
        self._drop_cache = drop_cache
        self._num_shards = reader.num_shards
        self.ahead = window + streams  # shards kept read or in flight from the low-water mark
        self._pool = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="shardfit-stage")
        self._slots: dict[Key, _Slot] = {}
        self._free: list[mmap.mmap] = []
        self._low: Key | None = None
        self._plans: dict[int, _Plan] = {}
        self._plan_lock = threading.Lock()
        # reentrant: a read that ends just as its buffer is given back runs the give-back at once
        self._lock = threading.RLock()
        self._closed = False
        self.shards_read = 0  # reads started, for tests and reports

    # -- the plan ----------------------------------------------------------------------------

    def _plan(self, epoch: int) -> _Plan:
        """Epoch ``epoch``'s shard order, each shard's position in it, and the sample position
        at which each window ends (cumulative)."""
        with self._plan_lock:
            got = self._plans.get(epoch)
            if got is None:
                got = self._plans[epoch] = self._make_plan(epoch)
                for old in [e for e in self._plans if e < epoch - 1]:
                    del self._plans[old]
            return got

    def _make_plan(self, epoch: int) -> _Plan:
        order = shard_order(self._num_shards, seed=self._seed, epoch=epoch, shuffle=self._shuffle)
        position = np.empty_like(order)
        position[order] = np.arange(order.size)
        r = self._reader
        sizes = np.minimum(r.shard_size, r.count - order * r.shard_size)
        ends = np.cumsum(sizes)[self._window - 1 :: self._window]
        if ends.size == 0 or ends[-1] != r.count:
            ends = np.append(ends, r.count)
        return order, position, ends

    def _next(self, key: Key) -> Key:
        epoch, t = key
        return (epoch, t + 1) if t + 1 < self._num_shards else (epoch + 1, 0)

    def _shard_at(self, key: Key) -> int:
        epoch, t = key
        return int(self._plan(epoch)[0][t])

    # -- what the consumer calls -------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self, epoch: int, samples: npt.NDArray[np.int64]) -> Iterator[ShardGetter]:
        """The shards that ``samples`` (of a batch of epoch ``epoch``) lie in, kept while the
        block runs: ``get(k)`` waits for shard ``k``'s read and gives its bytes.

        Raises (from ``get``): DatasetFormatError naming a shard file that cannot be read.
        """
        _, position, _ = self._plan(epoch)
        shards = np.unique(np.asarray(samples, dtype=np.int64) // self._reader.shard_size)
        held: dict[int, _Slot] = {}
        with self._lock:
            for k in shards.tolist():
                slot = self._slot((epoch, int(position[k])), k)
                slot.holders += 1
                held[k] = slot
            self._top_up()

        def get(k: int) -> ShardView:
            slot = held.get(k)
            if slot is None or slot.future is None:
                raise KeyError(f"shard {k} was not held for this batch")
            return slot.future.result()

        try:
            yield get
        finally:
            with self._lock:
                for slot in held.values():
                    slot.holders -= 1
                    if slot.evicted and slot.holders == 0:
                        self._recycle(slot)

    def advance(self, epoch: int, next_index: int) -> None:
        """Batches before ``next_index`` of ``epoch`` have been served: shards of earlier
        windows are let go, and the reads ahead go on from the next batch's window."""
        _, _, ends = self._plan(epoch)
        first = next_index * self._batch
        left = self._reader.count - first
        if left <= 0 or (self._drop_remainder and left < self._batch):
            low: Key = (epoch + 1, 0)
        else:
            w = int(np.searchsorted(ends, first, side="right"))
            low = (epoch, w * self._window)
        with self._lock:
            if self._low is not None and low == self._low:
                return
            self._low = low
            for key in [k for k in self._slots if k < low]:
                slot = self._slots.pop(key)
                slot.evicted = True
                if slot.holders == 0:
                    self._recycle(slot)
            self._top_up()

    def close(self) -> None:
        """Stop reading ahead; buffers go when the last batch using them is built."""
        with self._lock:
            self._closed = True
            for slot in self._slots.values():
                slot.evicted = True
                if slot.future is not None:
                    slot.future.cancel()
            self._slots.clear()
            self._free.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- internals (called with the lock held) ----------------------------------------------

    def _top_up(self) -> None:
        """Start the reads of the ``ahead`` shards from the low-water mark not yet started."""
        if self._low is None or self._closed:
            return
        key = self._low
        for _ in range(self.ahead):
            if key not in self._slots:
                self._slot(key, self._shard_at(key))
            key = self._next(key)

    def _slot(self, key: Key, shard: int) -> _Slot:
        slot = self._slots.get(key)
        if slot is not None and slot.future is not None:
            failed = slot.future.done() and slot.future.exception() is not None
            if not failed:
                return slot
        size = _file_size(self._reader, shard)
        buffer = self._buffer(size)
        slot = _Slot(shard, buffer)
        slot.future = self._pool.submit(self._read, shard, buffer)
        self.shards_read += 1
        self._slots[key] = slot
        return slot

    def _buffer(self, size: int) -> mmap.mmap:
        for i, buf in enumerate(self._free):
            if len(buf) >= size:
                return self._free.pop(i)
        return mmap.mmap(-1, -(-max(size, 1) // _ALIGN) * _ALIGN)

    def _recycle(self, slot: _Slot) -> None:
        future = slot.future
        if future is not None and not future.done():
            # still being read: give the buffer back once the read ends
            future.add_done_callback(functools.partial(self._recycle_done, slot))
            return
        if not self._closed and len(self._free) < self.ahead + 1:
            self._free.append(slot.buffer)

    def _recycle_done(self, slot: _Slot, _future: object = None) -> None:
        with self._lock:
            self._recycle(slot)

    # -- reading (in the pool's threads) -----------------------------------------------------

    def _read(self, shard: int, buffer: mmap.mmap) -> ShardView:
        path = self._reader.shard_name(shard)
        fd = self._reader.open_shard(shard)
        try:
            size = os.fstat(fd).st_size
            if size > self._reader.max_shard_bytes(shard):
                raise DatasetFormatError(
                    f"shard file {path} is {size} bytes, more than a shard of this store can "
                    "be: the store is damaged; re-pack the dataset"
                )
            if size > len(buffer):
                raise DatasetFormatError(
                    f"shard file {path} changed size while being read: re-pack the dataset"
                )
            view = memoryview(buffer)
            checker = self._reader.piece_checker(shard, buffer)
            # checked as it arrives, in pieces small enough to be still in the CPU's cache
            piece = _READ_BYTES if checker is None else checker.PIECE
            got = 0
            while got < size:
                n = os.preadv(fd, [view[got : min(size, got + piece)]], got)
                if n == 0:
                    raise DatasetFormatError(f"shard file {path} is truncated: re-pack the dataset")
                if checker is not None:
                    checker.feed(got, got + n)
                got += n
            if self._drop_cache and hasattr(os, "posix_fadvise"):
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return self._reader.shard_of_bytes(shard, view[:size], checker)


def drops_cache(reader: SplitReader) -> bool:
    """Whether a stager should drop shard files from the page cache once read: only when the
    split cannot stay cached anyway (more than half of the memory this process may use), so
    that forcing ``io="stream"`` on a store that fits leaves its cache to others."""
    return _choose_io(reader.data_bytes(), memory_bytes()) == "pread"


def read_path(
    io: IoChoice,
    reader: SplitReader,
    mode: Mode,
    window: int,
    memory: int | None = None,
    *,
    num_shards: int = 1,
) -> Literal["mmap", "pread", "stream"]:
    """How a Sequence in ``mode`` with option ``io`` reads: ``io`` itself unless ``"auto"``;
    then the reader's own choice (``"mmap"`` when the shards fit in half of ``memory``, the
    memory this process may use, by default read from the system), upgraded from ``"pread"``
    to ``"stream"`` when batches are built in this process, the stager's buffers fit in a
    third of ``memory``, and one worker trains alone (``num_shards == 1``: a worker of several
    needs only its part of each shard file)."""
    if io != "auto":
        return io
    if reader.io_mode == "mmap" or mode not in ("in-process", "threads") or num_shards > 1:
        return reader.io_mode
    memory = memory_bytes() if memory is None else memory
    shard_bytes = -(-reader.data_bytes() // max(reader.num_shards, 1))
    buffers = (window + STREAMS + 1) * shard_bytes
    if memory is not None and buffers * 3 > memory:
        return "pread"
    return "stream"


def _file_size(reader: SplitReader, shard: int) -> int:
    """Bytes to hold shard ``shard``'s file: its size, if no larger than such a shard can be (a
    buffer is made for it before it is read: a damaged store must not make a huge one)."""
    if reader.url is not None:
        return reader.max_shard_bytes(shard)  # not fetched yet, perhaps: the largest it can be
    try:
        size = os.stat(shard_path(reader.path, reader.split, shard)).st_size
    except FileNotFoundError:
        return 0  # the read reports it, naming the file
    return min(size, reader.max_shard_bytes(shard))
