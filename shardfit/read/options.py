"""Options of a :class:`~shardfit.Sequence`: one frozen, keyword-only dataclass that validates
itself, and the one place where they decide where batches are built (:func:`build_mode`).

Keras-free: packing, tests and tools can make and check these without importing Keras.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shardfit.errors import InvalidOptionError

__all__ = [
    "IO_CHOICES",
    "MODES",
    "VERIFY_CHOICES",
    "IoChoice",
    "LabelMode",
    "Mode",
    "SequenceOptions",
    "VerifyChoice",
    "build_mode",
]

LabelMode = Literal["int", "categorical"] | None
#: Where batches are built: in the consumer's thread, in Keras's threads, in shardfit's own
#: worker processes (through shared memory), or in Keras's own process pool (pickled).
Mode = Literal["in-process", "threads", "processes", "keras-processes"]
MODES: tuple[str, ...] = ("in-process", "threads", "processes", "keras-processes")
#: How samples are read from disk (see ``SequenceOptions.io``).
IoChoice = Literal["auto", "mmap", "pread", "stream"]
IO_CHOICES: tuple[str, ...] = ("auto", "mmap", "pread", "stream")
#: When samples are checked against their checksums (see ``SequenceOptions.verify``).
VerifyChoice = Literal["once", "always", "off"]
VERIFY_CHOICES: tuple[str, ...] = ("once", "always", "off")


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidOptionError(f"{name} must be an int >= {minimum}. Received: {value!r}")


@dataclass(frozen=True, kw_only=True)
class SequenceOptions:
    """How a :class:`~shardfit.Sequence` cuts a split into batches and where it builds them;
    validated on construction. A Sequence keeps them as passed (``seq.options``).

    Attributes:
        batch_size: samples per batch.
        shuffle: a new order every epoch (shard order, then samples within a window of shards);
            ``None`` (the default): for the ``"train"`` split only, so that ``predict`` and
            ``evaluate`` on another split see the store's order.
        seed: seed of the shuffle; the order of epoch ``e`` is a function of ``(seed, e)``.
        shuffle_window: shards whose samples are mixed together; more mixes better, fewer keeps
            the set of shards read at a time (and the page cache they need) smaller.
        label_mode: ``"int"`` (int32 class indices), ``"categorical"`` (float32 one-hot) or
            ``None`` (images only), as in ``keras.utils.image_dataset_from_directory``.
        drop_remainder: leave out the last, smaller batch.
        initial_epoch: the epoch the first batches belong to. ``fit(initial_epoch=k)`` sets it
            by itself; for loops of your own.
        workers: as Keras's ``PyDataset`` argument: shardfit's read-ahead threads
            (``workers > 1``), or with ``use_multiprocessing`` its worker processes.
        use_multiprocessing: build batches in worker processes.
        max_queue_size: batches of the plan read ahead of the one being trained on.
        shared_memory: with ``use_multiprocessing=True``, build batches in shardfit's own
            worker processes, which send them through shared memory (the default); ``False``
            leaves the processes to Keras's own pool, which pickles every batch through a pipe
            (many times slower, rebuilt every epoch, and it hangs ``fit`` if a worker is
            killed); kept for comparison.
        io: how samples come from disk. ``"mmap"``: shard files memory-mapped (fastest when
            the store stays in the page cache). ``"pread"``: each sample read where it lies,
            the kernel told which bytes the next batches need (the least memory).
            ``"stream"``: whole shards read ahead along the plan, several at once in long
            sequential reads, into about ``shuffle_window + 5`` shard-sized buffers of this
            process (the fastest when the store is larger than the page cache can hold; not
            with worker processes, which cannot share those buffers). ``"auto"`` (the default):
            ``"mmap"`` when the store's shards fit in half of the memory (RAM, or the cgroup
            limit); otherwise ``"stream"`` when its buffers fit in a third of it and batches
            are built in this process, else ``"pread"``.
        verify: when a sample's bytes are checked against the crc32c its chunk ends with:
            ``"once"`` (the default: the first time each process reads it), ``"always"`` (every
            read) or ``"off"``. Unless ``"off"``, every read also checks that the chunk is the
            one packed at that position of the pack this Sequence opened (4 bytes compared), so
            a swapped or replaced shard, or a store re-packed under a running job, stops
            training with an error naming the file instead of feeding it other data.
        num_shards: workers training one model data-parallel, each with a Sequence of its
            own (a worker's share of the data; the store's shard files are another thing).
            ``batch_size`` is each worker's batch; the global batch, ``batch_size *
            num_shards`` samples, is the same set at every step whatever ``num_shards`` is, for
            the same seed and global batch size (see :func:`~shardfit.batch_slice`).
        shard_index: this worker's place among them, ``0 .. num_shards - 1``.
    """

    batch_size: int = 32
    shuffle: bool | None = None
    seed: int = 0
    shuffle_window: int = 4
    label_mode: LabelMode = "int"
    drop_remainder: bool = False
    initial_epoch: int = 0
    workers: int = 1
    use_multiprocessing: bool = False
    max_queue_size: int = 10
    shared_memory: bool = True
    io: IoChoice = "auto"
    verify: VerifyChoice = "once"
    num_shards: int = 1
    shard_index: int = 0

    def __post_init__(self) -> None:
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)
        _check_int("shuffle_window", self.shuffle_window, 1)
        _check_int("initial_epoch", self.initial_epoch, 0)
        _check_int("workers", self.workers, 0)
        _check_int("max_queue_size", self.max_queue_size, 1)
        _check_int("num_shards", self.num_shards, 1)
        _check_int("shard_index", self.shard_index, 0)
        if self.shard_index >= self.num_shards:
            raise InvalidOptionError(
                f"shard_index must be in [0, num_shards). Received: shard_index="
                f"{self.shard_index} with num_shards={self.num_shards}"
            )
        if self.label_mode not in ("int", "categorical", None):
            raise InvalidOptionError(
                f"label_mode must be one of 'int', 'categorical', None. "
                f"Received: {self.label_mode!r}"
            )
        if self.shuffle is not None and not isinstance(self.shuffle, bool):
            raise InvalidOptionError(f"shuffle must be a bool or None. Received: {self.shuffle!r}")
        for name in ("drop_remainder", "use_multiprocessing", "shared_memory"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidOptionError(
                    f"{name} must be a bool. Received: {getattr(self, name)!r}"
                )
        if not isinstance(self.io, str) or self.io not in IO_CHOICES:
            raise InvalidOptionError(
                f"io must be one of {', '.join(repr(c) for c in IO_CHOICES)}. Received: {self.io!r}"
            )
        if not isinstance(self.verify, str) or self.verify not in VERIFY_CHOICES:
            raise InvalidOptionError(
                f"verify must be one of {', '.join(repr(c) for c in VERIFY_CHOICES)}. "
                f"Received: {self.verify!r}"
            )
        if self.io == "stream" and build_mode(self) in ("processes", "keras-processes"):
            raise InvalidOptionError(
                "io='stream' reads whole shards into the memory of the process that serves the "
                "batches, which worker processes cannot share: with use_multiprocessing=True use "
                "io='auto', 'pread' or 'mmap'. Received: io='stream'"
            )
        if self.io == "stream" and self.num_shards > 1:
            raise InvalidOptionError(
                "io='stream' reads whole shard files, and with num_shards > 1 each worker needs "
                "only its part of each: use io='auto', 'pread' or 'mmap'. Received: io='stream' "
                f"with num_shards={self.num_shards}"
            )


def build_mode(options: SequenceOptions) -> Mode:
    """Where batches are built under these options, by Keras's own rule for ``PyDataset``
    (workers are used only when ``workers > 1``, or ``workers > 0`` with
    ``use_multiprocessing``)."""
    if options.use_multiprocessing and options.workers > 0:
        return "processes" if options.shared_memory else "keras-processes"
    if options.workers > 1:
        return "threads"
    return "in-process"
