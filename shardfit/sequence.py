"""``shardfit.Sequence``: a Keras ``PyDataset`` that streams a packed split into ``model.fit``.

Importing this module imports Keras; ``import shardfit`` alone does not (``shardfit.Sequence``
is loaded on first use).

Where batches are built:

- no workers, or ``workers`` threads (Keras's thread enqueuer): in this process, into reused
  buffers (``_buffers``);
- ``use_multiprocessing=True``: in shardfit's own worker processes (``_workers``), started
  once and kept across epochs, which write each batch into a slot of a shared-memory ring
  (``_shm``); Keras is told to use ``2 * workers`` threads, each of which hands its requests to
  the processes and gets back an array viewing the slot. Keras's own process pool (which pickles
  every batch) is used only with ``shared_memory=False``.

Epoch bookkeeping, designed around what Keras 3.15 does (DESIGN.md, pinned by tests under
``fit`` with no workers, threads and processes):

- Keras never tells a dataset which epoch it serves, its ``on_epoch_begin`` races with its
  process workers, and ``on_epoch_end`` runs once more than there are epochs (once before the
  first). With TensorFlow's prefetch and no workers, the next epoch's first batches may even be
  fetched before ``on_epoch_end`` runs.
- When batches are asked for in this process (all modes but Keras's process pool), the epoch
  advances when a batch index is asked for a second time after every index of the epoch has
  been served, or at ``on_epoch_end`` once they all have, whichever comes first; so early
  prefetches land in the right epoch and extra hook calls change nothing. Batches asked for and
  discarded before an epoch (Keras builds its tensor signature from batches 0 and 1) are
  forgotten at the next ``on_epoch_end``. The epoch travels to shardfit's workers with each
  request.
- In Keras's process pool, batches are built in workers that Keras starts anew for every epoch
  from the parent's state after ``on_epoch_end``; there the parent counts the hook calls (the
  first one comes before epoch 0).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from multiprocessing import context
from typing import Any, Literal

import keras
import numpy as np
import numpy.typing as npt

from shardfit._batch import BatchMaker
from shardfit._buffers import BufferPool
from shardfit._epoch import batch_count, epoch_order
from shardfit._reader import ShardReader
from shardfit._shm import SlotRing
from shardfit._workers import WorkerPool, check_picklable
from shardfit.errors import InvalidOptionError
from shardfit.transforms import Transform

__all__ = ["Sequence", "SequenceOptions"]

LabelMode = Literal["int", "categorical"] | None


@dataclass(frozen=True, kw_only=True)
class SequenceOptions:
    """How a :class:`Sequence` cuts a split into batches; validated on construction.

    Attributes:
        batch_size: samples per batch.
        shuffle: a new order every epoch (shard order, then samples within a window of shards).
        seed: seed of the shuffle; the order of epoch ``e`` is a function of ``(seed, e)``.
        shuffle_window: shards whose samples are mixed together; more mixes better, fewer keeps
            the set of shards read at a time (and the page cache they need) smaller.
        label_mode: ``"int"`` (int32 class indices), ``"categorical"`` (float32 one-hot) or
            ``None`` (images only), as in ``keras.utils.image_dataset_from_directory``.
        drop_remainder: leave out the last, smaller batch.
        initial_epoch: the epoch the first ``fit`` epoch is; pass the same as
            ``fit(initial_epoch=...)`` when resuming.
        shared_memory: with ``use_multiprocessing=True``, build batches in shardfit's own
            worker processes, which send them through shared memory (the default); ``False``
            leaves the processes to Keras's own pool, which pickles every batch through a pipe
            (many times slower, rebuilt every epoch, and it hangs ``fit`` if a worker is
            killed); kept for comparison.
    """

    batch_size: int = 32
    shuffle: bool = True
    seed: int = 0
    shuffle_window: int = 4
    label_mode: LabelMode = "int"
    drop_remainder: bool = False
    initial_epoch: int = 0
    shared_memory: bool = True

    def __post_init__(self) -> None:
        def positive(name: str, value: object, minimum: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise InvalidOptionError(f"{name} must be an int >= {minimum}. Received: {value!r}")

        positive("batch_size", self.batch_size, 1)
        positive("seed", self.seed, 0)
        positive("shuffle_window", self.shuffle_window, 1)
        positive("initial_epoch", self.initial_epoch, 0)
        if self.label_mode not in ("int", "categorical", None):
            raise InvalidOptionError(
                f"label_mode must be one of 'int', 'categorical', None. "
                f"Received: {self.label_mode!r}"
            )
        for name in ("shuffle", "drop_remainder", "shared_memory"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidOptionError(
                    f"{name} must be a bool. Received: {getattr(self, name)!r}"
                )


class Sequence(keras.utils.PyDataset):  # type: ignore[misc]
    """Batches of one split of a packed store, for ``model.fit`` and friends.

    ``seq[i]`` is ``(images, labels)``: images ``(n, H, W, 3)`` float32 in [0, 1] (uint8 stores
    are converted), labels as ``label_mode`` says. Any index may be asked for in any order.

    Args:
        path: the store written by ``pack_images``.
        split: ``"train"`` or ``"val"``.
        batch_size, shuffle, seed, shuffle_window, label_mode, drop_remainder, initial_epoch,
        shared_memory: see :class:`SequenceOptions`.
        transform: ``fn(images, rng) -> images`` applied to every batch where it is built (in
            the worker processes, with ``use_multiprocessing=True``), ``rng`` seeded from
            ``(seed, epoch, batch index)``: see :mod:`shardfit.transforms`.
        workers, use_multiprocessing, max_queue_size: Keras's own ``PyDataset`` arguments.
            With ``use_multiprocessing=True`` (and ``shared_memory=True``), ``workers`` is the
            number of shardfit worker processes, and Keras sees a dataset fed by twice as many
            threads (``seq.workers`` reads ``2 * workers``, ``seq.use_multiprocessing``
            ``False``, ``seq.processes`` ``True``).

    The object pickles to a few KB whatever the dataset's size; files are opened lazily in each
    process that reads.

    With worker processes, the first batch asked for starts them and reserves
    ``max_queue_size + workers + 2`` batch-sized slots of shared memory in ``/dev/shm`` (or
    ``$SHARDFIT_SHM_DIR``); both are held until :meth:`close`, or until the Sequence is
    garbage. A worker that dies (killed, out of memory) makes the batch request fail with
    :class:`~shardfit.errors.WorkerCrashedError`, so ``fit`` stops instead of hanging; the next
    epoch begun (a new ``fit``) starts new workers.

    Raises:
        InvalidOptionError: an option breaks its rule.
        DatasetFormatError, IncompleteDatasetError: the store cannot be read.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str = "train",
        batch_size: int = 32,
        *,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_window: int = 4,
        label_mode: LabelMode = "int",
        drop_remainder: bool = False,
        initial_epoch: int = 0,
        shared_memory: bool = True,
        transform: Transform | None = None,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
    ) -> None:
        self.options = SequenceOptions(
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            shuffle_window=shuffle_window,
            label_mode=label_mode,
            drop_remainder=drop_remainder,
            initial_epoch=initial_epoch,
            shared_memory=shared_memory,
        )
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
            raise InvalidOptionError(f"workers must be an int >= 0. Received: {workers!r}")
        if transform is not None and not callable(transform):
            raise InvalidOptionError(
                f"transform must be a callable fn(images, rng) -> images. Received: {transform!r}"
            )
        own = bool(use_multiprocessing) and shared_memory and workers > 0
        super().__init__(
            # two of Keras's threads per process: each process has its next request waiting
            # while it answers the one before
            workers=2 * workers if own else workers,
            use_multiprocessing=bool(use_multiprocessing) and not own,
            max_queue_size=max_queue_size,
        )
        self._processes = workers if own else 0  # shardfit's own worker processes
        self.transform = transform
        self._reader = ShardReader(path, split)
        self._maker = BatchMaker(self._reader, transform, seed)
        self._length = batch_count(self._reader.count, batch_size, drop_remainder)
        self._epoch = initial_epoch
        self._hook_calls = 0
        self._served: set[int] = set()
        self._early = False  # the current epoch began before the hook that ends the last one
        self._plan: tuple[int, npt.NDArray[np.int64]] | None = None
        self._pool: tuple[int, BufferPool] | None = None
        self._ring: SlotRing | None = None
        self._procs: WorkerPool | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()  # the process that owns the epoch bookkeeping

    # -- what Keras and users see ------------------------------------------------------------

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in label order."""
        return self._reader.class_names

    @property
    def num_samples(self) -> int:
        """Samples in the split."""
        return self._reader.count

    @property
    def epoch(self) -> int:
        """The epoch the next batches belong to (as this process sees it)."""
        return self._epoch

    @property
    def processes(self) -> bool:
        """Whether batches are built in shardfit's own worker processes."""
        return self._processes > 0

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of shardfit's worker processes now running (none before the first
        batch, or after :meth:`close`)."""
        pool = self._procs
        return [] if pool is None or pool.broken else pool.pids

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Any:
        if not isinstance(index, int | np.integer) or not 0 <= index < self._length:
            raise IndexError(f"batch index must be in [0, {self._length}). Received: {index!r}")
        index = int(index)
        epoch = self._epoch_serving(index)
        bs = self.options.batch_size
        order = self._order(epoch)
        samples = order[index * bs : (index + 1) * bs]
        ahead = order[(index + 1) * bs : (index + 2) * bs]  # the plan's next batch
        workers = self._worker_pool()
        if workers is not None:
            images = workers.images(samples, epoch, index, ahead)
        else:
            images = self._maker.images(samples, epoch, index, self._buffer, ahead)
        return (images, *self._labels(samples))

    def close(self) -> None:
        """End the worker processes and give back the shared-memory ring now (both also go
        when the Sequence is garbage). Batches still held keep their memory until dropped.
        Batches asked for after this fail, until a new epoch begins (a new ``fit``)."""
        with self._lock:
            workers = self._procs  # stays, closed, so that late requests fail, not restart it
            ring, self._ring = self._ring, None
        if workers is not None:
            workers.close()
        if ring is not None:
            ring.close()

    @property
    def transport_stats(self) -> tuple[int, int] | None:
        """Batches received from worker processes so far, as ``(through shared memory,
        pickled whole)``; ``None`` when no ring is in use."""
        ring = self._ring
        if ring is None:
            return None
        return ring.stats.shared, ring.stats.pickled

    def sample_indices(self, index: int, epoch: int | None = None) -> npt.NDArray[np.int64]:
        """Which stored samples batch ``index`` of ``epoch`` (default: the current) holds."""
        order = self._order(self._epoch if epoch is None else epoch)
        bs = self.options.batch_size
        return order[index * bs : (index + 1) * bs]

    def on_epoch_begin(self) -> None:
        # a fit that failed on a dead worker, or a close(), left the pool broken: the next
        # fit starts anew
        workers = self._procs
        if workers is not None and workers.broken:
            with self._lock:
                if self._procs is workers:
                    self._procs = None
            workers.close()

    def on_epoch_end(self) -> None:
        with self._lock:
            self._hook_calls += 1
            if self._keras_processes():
                if self._hook_calls > 1:  # the first call comes before epoch 0
                    self._epoch += 1
                    self._served.clear()
            elif len(self._served) == self._length:
                self._epoch += 1
                self._served.clear()
            elif not self._early:
                # batches Keras asked for and threw away (it builds its tensor signature from
                # batches 0 and 1 before the first epoch): they must not count towards one
                self._served.clear()
            self._early = False

    # -- internals ---------------------------------------------------------------------------

    def _buffer(self, shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
        pool = self._pool
        if pool is None or pool[0] != os.getpid():
            # enough for every batch Keras can hold at once: its queue, its workers, and the
            # batch being trained on; a batch still referenced anywhere is never reused
            capacity = self.max_queue_size + max(self.workers, 1) + 2
            pool = self._pool = (os.getpid(), BufferPool(capacity))
        return pool[1].array(shape, np.float32)

    def _keras_processes(self) -> bool:
        """Whether Keras's own process pool builds the batches (``shared_memory=False``)."""
        return bool(self.use_multiprocessing) and self.workers > 0

    def _worker_pool(self) -> WorkerPool | None:
        """shardfit's worker processes, started on first use; ``None`` when batches are built
        in this process."""
        if not self._processes or os.getpid() != self._pid:
            return None
        workers = self._procs
        if workers is not None:
            return workers
        with self._lock:
            if self._procs is None:
                if self._ring is None:
                    per_image = int(np.prod(self._reader.image_shape)) * 4  # float32 out
                    # Keras holds at most max_queue_size + 1 batches (its queue, and one more
                    # submitted while it waits for room), the model one or two
                    self._ring = SlotRing(
                        self.max_queue_size + self._processes + 2,
                        self.options.batch_size * per_image,
                    )
                self._procs = WorkerPool(self._maker, self._ring, self._processes)
            return self._procs

    def _labels(self, samples: npt.NDArray[np.int64]) -> tuple[Any, ...]:
        mode = self.options.label_mode
        if mode is None:
            return ()
        labels = self._reader.labels()[samples]
        if mode == "categorical":
            onehot = np.zeros((samples.size, len(self.class_names)), dtype=np.float32)
            onehot[np.arange(samples.size), labels] = 1.0
            return (onehot,)
        return (labels,)

    def _epoch_serving(self, index: int) -> int:
        if os.getpid() != self._pid:
            return self._epoch  # a Keras pool worker: the parent set it before forking it
        with self._lock:
            if index in self._served and len(self._served) == self._length:
                self._epoch += 1  # a new pass began before on_epoch_end said so
                self._served.clear()
                self._early = True
            self._served.add(index)
            return self._epoch

    def _order(self, epoch: int) -> npt.NDArray[np.int64]:
        plan = self._plan
        if plan is not None and plan[0] == epoch:
            return plan[1]
        r = self._reader
        order = epoch_order(
            r.count,
            r.shard_size,
            seed=self.options.seed,
            epoch=epoch,
            shuffle=self.options.shuffle,
            window=self.options.shuffle_window,
        )
        self._plan = (epoch, order)
        return order

    def __getstate__(self) -> dict[str, Any]:
        if self.transform is not None:
            # a Sequence that arrived without its transform would silently train without it
            spawning = context.get_spawning_popen() is not None
            check_picklable(
                self.transform,
                "spawn or forkserver worker processes" if spawning else "another process",
            )
        state = self.__dict__.copy()
        del state["_lock"]
        state["_plan"] = None  # recomputed where needed; it grows with the dataset
        state["_pool"] = None
        state["_ring"] = None  # processes and shared memory stay with their owner
        state["_procs"] = None
        state["_served"] = set()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
