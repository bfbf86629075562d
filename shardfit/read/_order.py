"""Which samples are served for each batch request, and which epoch a request belongs to.

Keras never tells a dataset which epoch it serves, and ``fit(shuffle=True)`` (its default) asks
for a finite ``PyDataset``'s batches in an order drawn from Python's global, unseeded ``random``.
:class:`EpochCursor` makes the order shardfit's own: while an epoch is under way (between
``epoch_begin`` and ``epoch_end``), the n-th request is served the n-th batch of the epoch plan,
whatever index Keras asked for; after the last batch of a pass, the next request is the first
batch of the next epoch's plan. So ``fit`` trains on the plan in order, the same with
``shuffle=True`` or ``False``, in any run with the same seed, and what is read ahead is what is
served next. Requests made outside an epoch (Keras's probes, a user's ``seq[i]``) are served
batch ``index`` of the current epoch and move nothing.

The cursor is Keras-free, so its rules are tested against recorded Keras call patterns without
a framework (``tests/test_order.py``); the Keras adapter only forwards calls to it.

What Keras 3.15 does, and so what the rules are built around (docs/design.md, "How Keras runs a
PyDataset"; pinned under real ``fit`` by ``tests/test_sequence.py``):

- Before the first epoch, the TensorFlow backend asks for batches 0 and 1 to build its tensor
  signature, and throws them away; ``fit`` and ``evaluate`` then call ``on_epoch_end`` once
  before the first ``on_epoch_begin``.
- Every batch trained on is asked for between ``on_epoch_begin`` and ``on_epoch_end``, in the
  order it is trained on: Keras's own iterator (and TensorFlow's prefetch behind it) asks for
  one batch at a time. shardfit shows Keras no workers of its own (see
  ``shardfit.keras._sequence``), so no Keras thread pool can reorder requests.

A loop that asks for batches without ``on_epoch_begin`` (``train_on_batch`` with a hand-written
loop) is served by index: there the epoch advances when an index is asked for a second time after
every index of the epoch has been served, or at ``epoch_end`` once they all have. In Keras's own
process pool (``shared_memory=False``), batches are built in processes that Keras forks anew for
every epoch; there the owner counts the hook calls (the first comes before epoch 0), each copy
serves the epoch it was forked with, and the batch order is Keras's.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shardfit.read._epoch import batch_count, batch_slice, epoch_order

__all__ = ["EpochCursor", "Request"]


@dataclass(frozen=True)
class Request:
    """One batch to serve: batch ``index`` of epoch ``epoch`` holds ``samples``.

    Attributes:
        streamed: the batch was taken from the epoch's stream (the cursor moved on); ``False``
            for a request outside an epoch, which moves nothing.
    """

    epoch: int
    index: int
    samples: npt.NDArray[np.int64]
    streamed: bool = False

    @property
    def key(self) -> tuple[int, int]:
        """``(epoch, index)``: where the batch lies in the stream of epochs."""
        return self.epoch, self.index


class EpochCursor:
    """The epoch plans of one split, and where the stream of batches stands.

    Args:
        num_samples: samples in the split.
        shard_size: samples per shard (the plan shuffles shards, then within windows).
        batch_size, drop_remainder, seed, shuffle, window: as :class:`SequenceOptions`
            (``window`` is its ``shuffle_window``).
        initial_epoch: the epoch of the first requests.
        count_hooks: count epochs by ``epoch_end`` calls (Keras's own process pool builds the
            batches, so requests are not seen here).
        num_shards, shard_index: serve worker ``shard_index``'s part of each global batch of
            ``batch_size * num_shards`` samples (data-parallel training; see ``_epoch``).

    Thread-safe. Pickles to a few numbers: plans are recomputed where they are needed.
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
        num_shards: int = 1,
        shard_index: int = 0,
    ) -> None:
        self.num_samples = num_samples
        self.shard_size = shard_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.window = window
        self.count_hooks = count_hooks
        self.num_shards = num_shards
        self.shard_index = shard_index
        self.length = batch_count(num_samples, batch_size, drop_remainder, num_shards)
        self._epoch = initial_epoch
        self._position = 0  # the next batch of the epoch's stream
        self._inside = False  # between epoch_begin and epoch_end
        self._hook_calls = 0
        self._served: set[int] = set()  # requests by index outside an epoch, this epoch
        self._early = False  # an index loop began this epoch before the hook ending the last
        self._resumed = False  # resume() set the stream mid-epoch; its next pass is shorter
        self._inference: int | None = None  # in an inference pass: the next batch of it
        self.endless = False  # the consumer takes batches past the epoch's end, hooks or not
        self._plans: dict[int, npt.NDArray[np.int64]] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()  # the process whose requests count

    @property
    def epoch(self) -> int:
        """The epoch the next requests belong to (as this process sees it)."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many batches of the current epoch have been taken from the stream."""
        return self._position

    def resume(self, epoch: int, position: int) -> None:
        """Go on from batch ``position`` of epoch ``epoch``: the next epoch begun serves the rest
        of that epoch (:meth:`batches_left` of them), then the epochs after it in full.

        Raises:
            ValueError: ``epoch`` or ``position`` is out of range.
        """
        if epoch < 0 or not 0 <= position <= self.length:
            raise ValueError(
                f"cannot resume at batch {position} of epoch {epoch}: an epoch has "
                f"{self.length} batches"
            )
        with self._lock:
            if position == self.length:
                epoch, position = epoch + 1, 0
            self._epoch, self._position = epoch, position
            self._served.clear()
            self._resumed = position > 0

    def batches_left(self) -> int:
        """Batches the next pass through the data holds: the rest of a resumed epoch, until its
        first batch is served; else every batch of an epoch."""
        return self.length - self._position if self._resumed else self.length

    def order(self, epoch: int) -> npt.NDArray[np.int64]:
        """Every sample index, in the order epoch ``epoch`` visits them."""
        order = self._plans.get(epoch)
        if order is None:
            order = epoch_order(
                self.num_samples,
                self.shard_size,
                seed=self.seed,
                epoch=epoch,
                shuffle=self.shuffle,
                window=self.window,
            )
            # the stream needs the current epoch's plan and the next one's (read-ahead crosses
            # into it): keep those two
            for old in [e for e in self._plans if e < epoch - 1]:
                self._plans.pop(old, None)
            self._plans[epoch] = order
        return order

    def samples(self, index: int, epoch: int) -> npt.NDArray[np.int64]:
        """The samples of batch ``index`` of epoch ``epoch`` (this worker's part of it)."""
        where = batch_slice(
            self.num_samples,
            self.batch_size,
            index,
            num_shards=self.num_shards,
            shard_index=self.shard_index,
        )
        return self.order(epoch)[where]

    def epoch_samples(self, epoch: int) -> npt.NDArray[np.int64]:
        """Every sample this worker serves in epoch ``epoch``, in order."""
        return np.concatenate(
            [self.samples(b, epoch) for b in range(self.length)] or [np.empty(0, np.int64)]
        )

    def request(self, index: int) -> Request:
        """What to serve for a request of batch ``index`` now; counts the request.

        Inside an epoch the index is not used (any int >= 0 is taken: an endless stream asks
        for 0, 1, 2, ... past the epoch's length).

        Raises:
            IndexError: ``index`` is not in ``[0, length)`` outside an epoch, or negative.
        """
        if not isinstance(index, int | np.integer) or index < 0:
            raise IndexError(f"batch index must be in [0, {self.length}). Received: {index!r}")
        index = int(index)
        streaming = self._inside and not self.count_hooks and os.getpid() == self._pid
        if not streaming and index >= self.length:
            raise IndexError(f"batch index must be in [0, {self.length}). Received: {index!r}")
        if os.getpid() != self._pid:
            # a copy in Keras's pool worker: the owner set the epoch before the fork
            return Request(self._epoch, index, self.samples(index, self._epoch))
        with self._lock:
            if self._inside and not self.count_hooks:
                if self._inference is not None:  # the current epoch's plan, the stream stays
                    position = self._inference
                    self._inference = (position + 1) % self.length
                    return Request(
                        self._epoch, position, self.samples(position, self._epoch), streamed=True
                    )
                epoch, position = self._epoch, self._position
                self._resumed = False
                self._position += 1
                if self._position == self.length:
                    self._epoch += 1
                    self._position = 0
                return Request(epoch, position, self.samples(position, epoch), streamed=True)
            epoch = self._count_by_index(index)
        return Request(epoch, index, self.samples(index, epoch))

    def upcoming(self, count: int) -> list[Request]:
        """The next ``count`` batches the stream will serve, in order (crossing into the next
        epoch's plan); none outside an epoch."""
        with self._lock:
            if not self._inside or self.count_hooks:
                return []
            epoch, position = self._epoch, self._position
            inference = self._inference
        out = []
        if inference is not None:  # the same epoch's plan, round again
            for k in range(min(count, self.length)):
                p = (inference + k) % self.length
                out.append(Request(epoch, p, self.samples(p, epoch), streamed=True))
            return out
        for _ in range(min(count, self.length)):
            out.append(Request(epoch, position, self.samples(position, epoch), streamed=True))
            position += 1
            if position == self.length:
                epoch, position = epoch + 1, 0
        return out

    def epoch_begin(self, *, inference: bool = False) -> None:
        """The consumer's start-of-epoch hook ran (Keras's ``on_epoch_begin``).

        With ``inference`` (``predict``, ``evaluate``), the pass serves the current epoch's
        plan from its first batch, and leaves the training stream where it stands.
        """
        with self._lock:
            self._inside = True
            self._inference = 0 if inference else None
            self._served.clear()  # probes asked for before the epoch do not count
            self._early = False

    def epoch_end(self, *, by_user: bool = False) -> None:
        """The consumer's end-of-epoch hook ran (Keras's ``on_epoch_end``).

        ``by_user``: called by the user's own loop, not by Keras; an epoch ended early there
        (after some of its batches) is over: the next batches come from the next epoch's plan.
        Under Keras the stream goes on where it stands (``fit(steps_per_epoch=...)`` walks on
        through the plan), and batches asked for before an epoch (Keras's probes) do not count.
        """
        with self._lock:
            self._hook_calls += 1
            if self.count_hooks:
                if self._hook_calls > 1:  # the first call comes before epoch 0
                    self._next_epoch()
            elif self._inside:
                if self._inference is not None:
                    self._inside = False
                    self._inference = None  # the training stream stays where it stood
                elif by_user:
                    self._inside = False
                    if self._position > 0:
                        self._next_epoch()
                elif not self.endless:
                    self._inside = False
                # endless: the stream stays open between Keras's epochs (its batch generator
                # runs on, ahead of the hooks) until the consumer's next call begins
            elif len(self._served) == self.length or (by_user and self._served):
                self._next_epoch()
            elif not self._early:
                # batches asked for and thrown away before an epoch (Keras builds its tensor
                # signature from batches 0 and 1): they must not count towards one
                self._served.clear()
            self._early = False

    def begin_call(self, *, endless: bool) -> None:
        """A new pass of the consumer begins (Keras makes a new iterator): any stream of the
        last one is left; ``endless``: this one asks for batches past the epoch's end."""
        with self._lock:
            self.endless = endless
            self._inside = False
            self._inference = None

    def _next_epoch(self) -> None:
        self._epoch += 1
        self._position = 0
        self._resumed = False
        self._served.clear()

    def start_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the next to serve, from its first batch (``fit(initial_epoch=k)``).

        Raises:
            ValueError: the stream stands inside another epoch (a batch of it was served, or
                :meth:`resume` set it there).
        """
        with self._lock:
            if epoch == self._epoch:
                return
            if self._position > 0:
                raise ValueError(
                    f"the Sequence stands at batch {self._position} of epoch {self._epoch}, "
                    f"not at the start of epoch {epoch}"
                )
            self._epoch = epoch
            self._served.clear()

    def _count_by_index(self, index: int) -> int:
        if index in self._served and len(self._served) == self.length:
            self._next_epoch()  # a new pass began before epoch_end said so
            self._early = True
        self._served.add(index)
        return self._epoch

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        state["_plans"] = {}  # recomputed where needed; they grow with the dataset
        state["_served"] = set()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
