"""Which samples are served for each batch request, and which epoch a request belongs to.

Keras never tells a dataset which epoch it serves. :class:`EpochCursor` works it out from what
the dataset sees: batch requests (``request``) and the end-of-epoch hook (``epoch_end``). It is
Keras-free, so its rules are tested against recorded Keras call patterns without a framework
(``tests/test_order.py``); the Keras adapter only forwards calls to it.

What Keras 3.15 does, and so what the rules are built around (docs/design.md, "How Keras runs a
PyDataset"; pinned under real ``fit`` by ``tests/test_sequence.py``):

- ``on_epoch_end`` runs once more than there are epochs (once before the first), and
  ``on_epoch_begin`` races with Keras's process workers, so neither counts epochs by itself.
- Before the first epoch, the TensorFlow backend asks for batches 0 and 1 to build its tensor
  signature, and throws them away.
- With TensorFlow's prefetch and no workers, the next epoch's first batches may be asked for
  before ``on_epoch_end`` of the one before.

The rules, when requests are seen by the process that owns the cursor (every mode but Keras's
own process pool): the epoch advances when an index is asked for a second time after every
index of the epoch has been served, or at ``epoch_end`` once they all have, whichever comes
first (so early prefetches land in the right epoch and extra hook calls change nothing); batches
asked for before an epoch and thrown away are forgotten at the next ``epoch_end``. In Keras's
process pool, batches are built in processes that Keras forks anew for every epoch from the
owner's state after ``on_epoch_end``: there the owner counts the hook calls (the first comes
before epoch 0), and each copy serves the epoch it was forked with.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shardfit.read._epoch import batch_count, epoch_order

__all__ = ["EpochCursor", "Request"]


@dataclass(frozen=True)
class Request:
    """One batch to serve: batch ``index`` of ``epoch`` holds ``samples``; ``ahead`` are the
    samples of the plan's next batch (worth reading ahead)."""

    epoch: int
    index: int
    samples: npt.NDArray[np.int64]
    ahead: npt.NDArray[np.int64]


class EpochCursor:
    """The epoch plan of one split and the bookkeeping of which epoch requests belong to.

    Args:
        num_samples: samples in the split.
        shard_size: samples per shard (the plan shuffles shards, then within windows).
        batch_size, drop_remainder, seed, shuffle, window: as :class:`SequenceOptions`
            (``window`` is its ``shuffle_window``).
        initial_epoch: the epoch of the first requests.
        count_hooks: count epochs by ``epoch_end`` calls (Keras's own process pool builds the
            batches, so requests are not seen here).

    Thread-safe. Pickles to a few numbers: the plan is recomputed where it is needed.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        shard_size: int,
        batch_size: int,
        drop_remainder: bool,
        seed: int,
        shuffle: bool,
        window: int,
        initial_epoch: int = 0,
        count_hooks: bool = False,
    ) -> None:
        self.num_samples = num_samples
        self.shard_size = shard_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.window = window
        self.count_hooks = count_hooks
        self.length = batch_count(num_samples, batch_size, drop_remainder)
        self._epoch = initial_epoch
        self._hook_calls = 0
        self._served: set[int] = set()
        self._early = False  # the current epoch began before the hook that ends the last one
        self._plan: tuple[int, npt.NDArray[np.int64]] | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()  # the process whose requests count

    @property
    def epoch(self) -> int:
        """The epoch the next requests belong to (as this process sees it)."""
        return self._epoch

    def order(self, epoch: int) -> npt.NDArray[np.int64]:
        """Every sample index, in the order epoch ``epoch`` visits them."""
        plan = self._plan
        if plan is not None and plan[0] == epoch:
            return plan[1]
        order = epoch_order(
            self.num_samples,
            self.shard_size,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            window=self.window,
        )
        self._plan = (epoch, order)
        return order

    def samples(self, index: int, epoch: int) -> npt.NDArray[np.int64]:
        """The samples of batch ``index`` of epoch ``epoch``."""
        bs = self.batch_size
        return self.order(epoch)[index * bs : (index + 1) * bs]

    def request(self, index: int) -> Request:
        """What to serve for batch ``index`` asked for now; counts the request.

        Raises:
            IndexError: ``index`` is not in ``[0, length)``.
        """
        if not isinstance(index, int | np.integer) or not 0 <= index < self.length:
            raise IndexError(f"batch index must be in [0, {self.length}). Received: {index!r}")
        index = int(index)
        epoch = self._count(index)
        order = self.order(epoch)
        bs = self.batch_size
        return Request(
            epoch,
            index,
            order[index * bs : (index + 1) * bs],
            order[(index + 1) * bs : (index + 2) * bs],
        )

    def epoch_end(self) -> None:
        """The consumer's end-of-epoch hook ran (Keras's ``on_epoch_end``)."""
        with self._lock:
            self._hook_calls += 1
            if self.count_hooks:
                if self._hook_calls > 1:  # the first call comes before epoch 0
                    self._next_epoch()
            elif len(self._served) == self.length:
                self._next_epoch()
            elif not self._early:
                # batches asked for and thrown away before an epoch (Keras builds its tensor
                # signature from batches 0 and 1): they must not count towards one
                self._served.clear()
            self._early = False

    def _next_epoch(self) -> None:
        self._epoch += 1
        self._served.clear()

    def _count(self, index: int) -> int:
        if os.getpid() != self._pid:
            return self._epoch  # a copy in Keras's pool worker: the owner set it before the fork
        with self._lock:
            if index in self._served and len(self._served) == self.length:
                self._next_epoch()  # a new pass began before epoch_end said so
                self._early = True
            self._served.add(index)
            return self._epoch

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        state["_plan"] = None  # recomputed where needed; it grows with the dataset
        state["_served"] = set()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
