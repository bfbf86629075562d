"""``shardfit.Sequence``: a Keras ``PyDataset`` that streams a packed split into ``model.fit``.

Importing this module imports Keras; ``import shardfit`` alone does not (``shardfit.Sequence``
is loaded on first use).

Epoch bookkeeping, designed around what Keras 3.15 does (DESIGN.md, pinned by tests under
``fit`` with no workers, threads and processes):

- Keras never tells a dataset which epoch it serves, its ``on_epoch_begin`` races with the
  workers, and ``on_epoch_end`` runs once more than there are epochs (once before the first).
  With TensorFlow's prefetch and no workers, the next epoch's first batches may even be fetched
  before ``on_epoch_end`` runs.
- In this process (no workers, or threads), the epoch advances when a batch index is asked for a
  second time after every index of the epoch has been served, or at ``on_epoch_end`` once they
  all have, whichever comes first; so early prefetches land in the right epoch and extra hook
  calls change nothing. Batches asked for and discarded before an epoch (Keras builds its
  tensor signature from batches 0 and 1) are forgotten at the next ``on_epoch_end``.
- With worker processes, batches are built in the workers, which Keras starts anew for every
  epoch from the parent's state after ``on_epoch_end``; there the parent counts the hook calls
  (the first one comes before epoch 0).

With worker processes, batches travel through a ring of shared-memory slots (``_shm``) instead
of being pickled through Keras's pipes, and a watch thread turns a dead worker into an error
instead of a hang (``_watch``).
"""

from __future__ import annotations

import os
import pickle
import threading
from dataclasses import dataclass
from multiprocessing import context
from typing import Any, Literal

import keras
import numpy as np
import numpy.typing as npt

from shardfit._buffers import BufferPool
from shardfit._epoch import batch_count, epoch_order
from shardfit._reader import ShardReader
from shardfit._shm import PickledBatch, SlotRing
from shardfit._watch import watch_keras_pools
from shardfit.errors import InvalidOptionError, TransformError
from shardfit.transforms import Transform

__all__ = ["Sequence", "SequenceOptions"]

LabelMode = Literal["int", "categorical"] | None

#: Stream id of the transform generators (see _epoch for the others).
_TRANSFORM_STREAM = 0x5348_0003


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
        shared_memory: with worker processes, send batches through shared-memory slots (the
            default); ``False`` lets Keras pickle each batch through a pipe (much slower).
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
            the workers, with processes), ``rng`` seeded from ``(seed, epoch, batch index)``:
            see :mod:`shardfit.transforms`.
        workers, use_multiprocessing, max_queue_size: Keras's own ``PyDataset`` arguments.

    The object pickles to a few KB whatever the dataset's size; files are opened lazily in each
    process that reads.

    With ``use_multiprocessing=True``, the first ``len()`` (Keras asks it before starting its
    workers) reserves ``max_queue_size + workers + 4`` batch-sized slots of shared memory in
    ``/dev/shm`` (or ``$SHARDFIT_SHM_DIR``), held until the Sequence is garbage or closed.
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
        super().__init__(
            workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size
        )
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
        if transform is not None and not callable(transform):
            raise InvalidOptionError(
                f"transform must be a callable fn(images, rng) -> images. Received: {transform!r}"
            )
        self.transform = transform
        self._ring: SlotRing | None = None
        self._reader = ShardReader(path, split)
        self._length = batch_count(self._reader.count, batch_size, drop_remainder)
        self._epoch = initial_epoch
        self._hook_calls = 0
        self._served: set[int] = set()
        self._early = False  # the current epoch began before the hook that ends the last one
        self._plan: tuple[int, npt.NDArray[np.int64]] | None = None
        self._pool: tuple[int, BufferPool] | None = None
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

    def __len__(self) -> int:
        # Keras asks for the length in this process just before it starts its workers
        self._prepare_processes()
        return self._length

    def __getitem__(self, index: int) -> Any:
        if not isinstance(index, int | np.integer) or not 0 <= index < self._length:
            raise IndexError(f"batch index must be in [0, {self._length}). Received: {index!r}")
        index = int(index)
        epoch = self._epoch_serving(index)
        order = self._order(epoch)
        bs = self.options.batch_size
        samples = order[index * bs : (index + 1) * bs]
        shape = (samples.size, *self._reader.image_shape)
        ring = self._ring if self._in_worker() else None
        slot = ring.claim() if ring is not None else None
        try:
            if ring is not None and slot is not None:
                images = ring.array(slot, shape, np.float32)
            else:
                images = self._buffers().array(shape, np.float32)
            self._reader.read_into(samples, images)
            if self.transform is not None:
                images = self._transformed(self.transform, images, epoch, index)
            batch = (images, *self._labels(samples))
            if ring is None:
                return batch
            if slot is not None:
                out = self._into_slot(ring, slot, images)
                if out is not None:
                    return ring.send(slot, out, batch[1:])
                ring.abandon(slot)
                slot = None
            return PickledBatch(ring.token, batch)
        except BaseException:
            if ring is not None and slot is not None:
                ring.abandon(slot)
            raise

    def close(self) -> None:
        """Give back the shared-memory ring now (it is also given back when the Sequence is
        garbage). Batches still held keep their memory until they are dropped."""
        ring, self._ring = self._ring, None
        if ring is not None and os.getpid() == self._pid:
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

    def on_epoch_end(self) -> None:
        self._prepare_processes()
        with self._lock:
            self._hook_calls += 1
            if self._uses_processes():
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

    def _buffers(self) -> BufferPool:
        pool = self._pool
        if pool is None or pool[0] != os.getpid():
            # enough for every batch Keras can hold at once: its queue, its workers, and the
            # batch being trained on; a batch still referenced anywhere is never reused
            capacity = self.max_queue_size + max(self.workers, 1) + 2
            pool = self._pool = (os.getpid(), BufferPool(capacity))
        return pool[1]

    def _uses_processes(self) -> bool:
        return bool(self.use_multiprocessing) and self.workers > 0

    def _in_worker(self) -> bool:
        return self._uses_processes() and os.getpid() != self._pid

    def _prepare_processes(self) -> None:
        """In the parent, before workers start: the watch thread, and the ring they write to."""
        if not self._uses_processes() or os.getpid() != self._pid:
            return
        watch_keras_pools()
        if self._ring is None and self.options.shared_memory:
            with self._lock:
                if self._ring is None:
                    per_image = int(np.prod(self._reader.image_shape)) * 4  # float32 out
                    self._ring = SlotRing(
                        self.max_queue_size + self.workers + 4,
                        self.options.batch_size * per_image,
                    )

    def _transformed(
        self, transform: Transform, images: npt.NDArray[np.float32], epoch: int, index: int
    ) -> npt.NDArray[Any]:
        rng = np.random.default_rng([self.options.seed, _TRANSFORM_STREAM, epoch, index])
        out = transform(images, rng)
        if not isinstance(out, np.ndarray) or out.ndim < 1 or out.shape[0] != images.shape[0]:
            got = getattr(out, "shape", type(out).__name__)
            raise TransformError(
                f"transform must return a numpy array with the batch's {images.shape[0]} "
                f"images first. Received: {got} from {transform!r}"
            )
        return out

    @staticmethod
    def _into_slot(ring: SlotRing, slot: int, images: npt.NDArray[Any]) -> npt.NDArray[Any] | None:
        """``images`` as an array in ``slot`` (copied there unless it already is), or ``None``
        when it does not fit."""
        if not ring.fits(images.nbytes):
            return None
        dst = ring.array(slot, images.shape, images.dtype)
        if dst.ctypes.data == images.ctypes.data and images.flags.c_contiguous:
            return dst  # written in place
        if np.may_share_memory(dst, images):
            images = images.copy()  # a transform returned a rearranged view of the slot
        dst[...] = images
        return dst

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
        if self._uses_processes() and os.getpid() != self._pid:
            return self._epoch  # a worker: the parent set the epoch before forking it
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
        spawning = context.get_spawning_popen() is not None
        if spawning:
            # multiprocessing is starting a worker (spawn/forkserver): it needs the ring and a
            # transform that pickles
            self._prepare_processes()
            if self.transform is not None:
                try:
                    pickle.dumps(self.transform)
                except Exception as err:
                    raise InvalidOptionError(
                        "transform must pickle to run in spawn or forkserver worker processes "
                        "(define it at module level, or use shardfit.transforms). "
                        f"Received: {self.transform!r} ({err})"
                    ) from None
        state = self.__dict__.copy()
        state["_ring"] = self._ring if spawning else None  # the ring travels only to workers
        del state["_lock"]
        state["_plan"] = None  # recomputed where needed; it grows with the dataset
        state["_pool"] = None
        state["_served"] = set()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
