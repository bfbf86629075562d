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
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Literal

import keras
import numpy as np
import numpy.typing as npt

from shardfit._buffers import BufferPool
from shardfit._epoch import batch_count, epoch_order
from shardfit._reader import ShardReader
from shardfit.errors import InvalidOptionError

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
    """

    batch_size: int = 32
    shuffle: bool = True
    seed: int = 0
    shuffle_window: int = 4
    label_mode: LabelMode = "int"
    drop_remainder: bool = False
    initial_epoch: int = 0

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
        for name in ("shuffle", "drop_remainder"):
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
        batch_size, shuffle, seed, shuffle_window, label_mode, drop_remainder, initial_epoch:
            see :class:`SequenceOptions`.
        workers, use_multiprocessing, max_queue_size: Keras's own ``PyDataset`` arguments.

    The object pickles to a few KB whatever the dataset's size; files are opened lazily in each
    process that reads.
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
        )
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
        return self._length

    def __getitem__(self, index: int) -> Any:
        if not isinstance(index, int | np.integer) or not 0 <= index < self._length:
            raise IndexError(f"batch index must be in [0, {self._length}). Received: {index!r}")
        index = int(index)
        epoch = self._epoch_serving(index)
        order = self._order(epoch)
        bs = self.options.batch_size
        samples = order[index * bs : (index + 1) * bs]
        images = self._buffers().array((samples.size, *self._reader.image_shape), np.float32)
        self._reader.read_into(samples, images)
        mode = self.options.label_mode
        if mode is None:
            return (images,)
        labels = self._reader.labels()[samples]
        if mode == "categorical":
            onehot = np.zeros((samples.size, len(self.class_names)), dtype=np.float32)
            onehot[np.arange(samples.size), labels] = 1.0
            return images, onehot
        return images, labels

    def sample_indices(self, index: int, epoch: int | None = None) -> npt.NDArray[np.int64]:
        """Which stored samples batch ``index`` of ``epoch`` (default: the current) holds."""
        order = self._order(self._epoch if epoch is None else epoch)
        bs = self.options.batch_size
        return order[index * bs : (index + 1) * bs]

    def on_epoch_end(self) -> None:
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
        state = self.__dict__.copy()
        del state["_lock"]
        state["_plan"] = None  # recomputed where needed; it grows with the dataset
        state["_pool"] = None
        state["_served"] = set()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
