"""``shardfit.Sequence``: a Keras ``PyDataset`` that streams a packed split into ``model.fit``.

A thin adapter: which samples each request gets and which epoch it belongs to is decided by the
Keras-free :class:`~shardfit.read._order.EpochCursor`; batches are built by
:class:`~shardfit.read._batch.BatchMaker`, in this process into reused buffers
(``shardfit.read._buffers``) or in shardfit's own worker processes
(:class:`~shardfit.read._workers.WorkerPool`, which owns its shared-memory ring). This module only
turns Keras's calls into those, and shows Keras the values it must see (``_keras_arguments``).

Importing this module imports Keras; ``import shardfit`` alone does not (``shardfit.Sequence``
is loaded on first use).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import warnings
import weakref
from multiprocessing import context
from typing import Any

import keras
import numpy as np
import numpy.typing as npt

from shardfit._options import merge_options
from shardfit.errors import InvalidOptionError
from shardfit.keras import _tf_pipeline
from shardfit.keras._calls import keras_call
from shardfit.read._batch import BatchMaker
from shardfit.read._buffers import BufferPool
from shardfit.read._epoch import next_use
from shardfit.read._order import EpochCursor, Request
from shardfit.read._prefetch import Prefetcher
from shardfit.read._readahead import ShardReadAhead
from shardfit.read._reader import SplitReader
from shardfit.read._stage import ShardStager, drops_cache, read_path
from shardfit.read._workers import WorkerPool, worker_context
from shardfit.read.options import Mode, SequenceOptions, build_mode
from shardfit.transforms import Transform

__all__ = ["Sequence"]

log = logging.getLogger("shardfit")

#: Sequences alive in this process, for :func:`_before_exit`.
_LIVE: weakref.WeakSet[Sequence] = weakref.WeakSet()
#: How long the interpreter's exit waits for batch requests under way to leave.
_EXIT_WAIT_S = 10.0
#: How long no batch request must have come before the interpreter's exit goes on.
_QUIET_S = 0.5
#: When the last batch request came or left, by ``time.monotonic()`` (any Sequence).
_LAST_CALL = [0.0]


def _before_exit() -> None:
    """Stop serving and let the batch requests under way leave before Python finalizes.

    After a ``fit`` that stopped early (``stop_training``, ``EarlyStopping``), TensorFlow's
    batch-generator thread may still be inside ``__getitem__``, reading ahead. If it is there
    when the interpreter starts finalizing, it can never take the GIL back, and TensorFlow,
    destroying its iterator at exit, waits for it forever: the process hangs (seen in 1 run of
    6 of ``benchmarks/bench_resume.py`` under a memory limit). ``atexit`` runs while other
    threads still run normally: requests now fail at once, and those under way are waited for.
    Then, if a request came within the last ``_QUIET_S``, it waits until none has for that
    long: TensorFlow's thread asks once more after a failed request (a generator's
    ``StopIteration``, Python code again, outside ``__getitem__``); asked during finalization,
    that call never returns and the exit hangs just the same (1 run in 10 of
    ``tests/_exit_child.py`` with the wait for requests under way alone; gdb: the prefetch
    thread inside ``GeneratorDataset``'s function, the main thread destroying its iterator).
    """
    live = list(_LIVE)
    for seq in live:
        with seq._lock:
            seq._exiting = True
    for seq in live:
        seq.close()
    deadline = time.monotonic() + _EXIT_WAIT_S
    while any(seq._active for seq in live) and time.monotonic() < deadline:
        time.sleep(0.01)
    while time.monotonic() - _LAST_CALL[0] < _QUIET_S and time.monotonic() < deadline:
        time.sleep(0.01)


atexit.register(_before_exit)


def _keras_arguments(options: SequenceOptions, mode: Mode) -> dict[str, Any]:
    """What Keras's ``PyDataset`` is told (and so what ``seq.workers`` and
    ``seq.use_multiprocessing`` read), the one place where it differs from what was passed.

    shardfit serves its epoch plan in order and reads ahead along it with threads and processes
    of its own, so Keras is shown a dataset without workers: Keras's thread pool would call
    ``__getitem__`` from several threads in an order that varies from run to run, and its process
    pool would pickle every batch. Only ``shared_memory=False`` hands the batches to Keras's own
    process pool, as it asks.
    """
    if mode == "keras-processes":
        return {
            "workers": options.workers,
            "use_multiprocessing": True,
            "max_queue_size": options.max_queue_size,
        }
    return {"workers": 1, "use_multiprocessing": False, "max_queue_size": options.max_queue_size}


class Sequence(keras.utils.PyDataset):  # type: ignore[misc]
    """Batches of one split of a packed store, for ``model.fit`` and friends.

    ``seq[i]`` is ``(images, labels)``: images ``(n, H, W, 3)`` float32 in [0, 1] (uint8 stores
    are converted), labels as ``label_mode`` says. Any index may be asked for in any order.

    Args:
        path: the store written by ``pack_images``: a local path, or an object store URL
            (``s3://bucket/data.zarr``, ``gs://``, ``az://``) read through a local cache of
            whole shards (README, "Beyond one machine").
        split: ``"train"`` or ``"val"``.
        batch_size: samples per batch (default: ``options.batch_size``, 32).
        options: a :class:`~shardfit.SequenceOptions`; or give its fields as keyword arguments
            (``shuffle``, ``seed``, ``shuffle_window``, ``label_mode``, ``drop_remainder``,
            ``initial_epoch``, ``workers``, ``use_multiprocessing``, ``max_queue_size``,
            ``shared_memory``, ``io``), which replace those of ``options``.
        transform: ``fn(images, rng) -> images`` applied to every batch where it is built (in
            the worker processes, with ``use_multiprocessing=True``), ``rng`` seeded from
            ``(seed, epoch, batch index)``: see :mod:`shardfit.transforms`.
        storage_options, cache_dir, cache_limit: for an object store URL, as
            :class:`~shardfit.SplitReader` takes them: client options (obstore's, or the s3fs
            names xarray and zarr use), where shards are cached, and the cache's byte bound.

    ``seq.options`` reads back what was passed and ``seq.mode`` says where batches are built:
    ``"in-process"``, ``"threads"`` (``workers > 1``: shardfit's own threads), ``"processes"``
    (shardfit's own ``workers`` processes, with ``use_multiprocessing=True``) or
    ``"keras-processes"`` (``shared_memory=False``). Keras's own attributes (``seq.workers``,
    ``seq.use_multiprocessing``) read what Keras is told: no workers, but with
    ``shared_memory=False``. ``seq.io`` says how samples are read (``"mmap"``, ``"pread"`` or
    ``"stream"``, ``io="auto"`` resolved) and ``seq.shuffle`` whether epochs are shuffled.

    Under ``fit``, batches are served in the order of shardfit's epoch plan, whatever order
    Keras asks for them in (``fit(shuffle=True)``, Keras's default, changes nothing), and the
    next ``max_queue_size`` batches of the plan are read ahead: by shardfit's threads or
    processes, or in-process by telling the kernel which bytes come next (or, with
    ``io="stream"``, by reading whole shards ahead). ``fit(steps_per_epoch=k)`` walks on through
    the plan; ``fit(initial_epoch=k)`` serves epoch ``k``'s. ``predict`` and ``evaluate`` serve
    the current epoch's plan and leave the training stream where it stands; ``seq.labels``
    gives the labels in that order. ``seq[i]`` outside Keras gives batch ``i`` of the current
    epoch; ``seq.on_epoch_end()`` from your own loop starts the next. README, "How shardfit
    orders samples", has every rule.

    The object pickles to a few KB whatever the dataset's size; files are opened lazily in each
    process that reads.

    With worker processes, the first batch asked for starts them and reserves
    ``max_queue_size + 2 x workers + 2`` batch-sized slots of shared memory in ``/dev/shm`` (or
    ``$SHARDFIT_SHM_DIR``); both are held until :meth:`close`, or until the Sequence is
    garbage. A worker that dies (killed, out of memory) makes the batch request fail with
    :class:`~shardfit.errors.WorkerCrashedError`, so ``fit`` stops instead of hanging; the next
    Keras call (``fit``, ``evaluate``, ``predict``), or epoch begun, starts new workers, after
    a crash or a :meth:`close` alike.

    Raises:
        InvalidOptionError: an option breaks its rule.
        DatasetFormatError, IncompleteDatasetError: the store cannot be read.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str = "train",
        batch_size: int | None = None,
        *,
        options: SequenceOptions | None = None,
        transform: Transform | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_limit: int | None = None,
        **option_kwargs: Any,
    ) -> None:
        if batch_size is not None:
            option_kwargs["batch_size"] = batch_size
        opts = merge_options(SequenceOptions, options, option_kwargs)
        if transform is not None and not callable(transform):
            raise InvalidOptionError(
                f"transform must be a callable fn(images, rng) -> images. Received: {transform!r}"
            )
        self.options = opts
        self.mode: Mode = build_mode(opts)
        super().__init__(**_keras_arguments(opts, self.mode))
        self.transform = transform
        self._reader = SplitReader(
            path,
            split,
            io="pread" if opts.io == "stream" else opts.io,
            verify=opts.verify,
            storage_options=storage_options,
            cache_dir=cache_dir,
            cache_limit=cache_limit,
        )
        if self._reader.url is not None and self.mode == "keras-processes":
            raise InvalidOptionError(
                "shared_memory=False leaves worker processes to Keras, which forks them, and an "
                "object store's client cannot run in a forked copy of a process that used it: "
                f"use shared_memory=True for {self._reader.url}. Received: shared_memory=False"
            )
        #: whether epochs are shuffled: ``options.shuffle``, or by default for "train" only
        self.shuffle: bool = split == "train" if opts.shuffle is None else opts.shuffle
        #: how samples are read: "mmap", "pread" or "stream" (whole shards read ahead)
        self.io = read_path(
            opts.io, self._reader, self.mode, opts.shuffle_window, num_shards=opts.num_shards
        )
        self._maker = BatchMaker(self._reader, transform, opts.seed)
        self._cursor = EpochCursor(
            num_samples=self._reader.count,
            shard_size=self._reader.shard_size,
            batch_size=opts.batch_size,
            drop_remainder=opts.drop_remainder,
            seed=opts.seed,
            shuffle=self.shuffle,
            window=opts.shuffle_window,
            initial_epoch=opts.initial_epoch,
            count_hooks=self.mode == "keras-processes",
            num_shards=opts.num_shards,
            shard_index=opts.shard_index,
        )
        self._buffers: tuple[int, BufferPool] | None = None
        self._procs: WorkerPool | None = None
        self._prefetch: Prefetcher | None = None
        self._stage: ShardStager | None = None
        self._ahead: ShardReadAhead | None = None
        self._hinted: set[tuple[int, int]] = set()  # upcoming batches whose reads were asked
        self._endless = False  # the running Keras call takes more or fewer steps than an epoch
        self._active = 0  # calls of __getitem__ under way
        self._exiting = False
        self._warned_predict = False
        self._lock = threading.Lock()
        self._pid = os.getpid()  # the process that may start threads and worker processes
        _LIVE.add(self)  # last: the exit hook needs the lock

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
        return self._cursor.epoch

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of shardfit's worker processes now running (none before the first
        batch, or after :meth:`close`)."""
        pool = self._procs
        return [] if pool is None or pool.broken else pool.pids

    def __len__(self) -> int:
        # the whole epoch, except right after resume_at(): then Keras's next iterator is to
        # ask for the rest of the resumed epoch only (Keras reads the length when it starts
        # one; no other read comes between)
        return self._cursor.batches_left()

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one epoch (``len(seq)``, except just after :meth:`resume_at`)."""
        return self._cursor.length

    @property
    def position(self) -> int:
        """Batches of the current epoch served so far under ``fit`` (read ahead included)."""
        return self._cursor.position

    def resume_at(self, epoch: int, batch: int) -> None:
        """Serve batch ``batch`` of epoch ``epoch`` next: the next epoch Keras runs is the rest
        of that epoch (``len(seq)`` reads what is left of it until its first batch is asked
        for), then the epochs after it in full. :class:`shardfit.BackupAndRestore` calls this
        when it restores a run interrupted mid-epoch.

        Raises:
            InvalidOptionError: ``epoch`` or ``batch`` is out of range.
        """
        try:
            self._cursor.resume(epoch, batch)
        except ValueError as err:
            raise InvalidOptionError(str(err)) from None
        self._hinted = set()

    def __getitem__(self, index: int) -> Any:
        with self._lock:
            _LAST_CALL[0] = time.monotonic()
            if self._exiting:
                raise RuntimeError("shardfit.Sequence: the interpreter is exiting")
            self._active += 1
        try:
            return self._serve(index)
        finally:
            with self._lock:
                self._active -= 1
                _LAST_CALL[0] = time.monotonic()

    def _serve(self, index: int) -> Any:
        req = self._cursor.request(index)  # streamed only in the process that owns the cursor
        stager = self._stager()
        if not req.streamed:
            if stager is not None:
                # Keras's probes come before the epoch, and the model is compiled after them:
                # start reading the stream's next shards now
                stager.advance(self._cursor.epoch, self._cursor.position)
            return self._build(req)
        if stager is not None:
            stager.advance(req.epoch, req.index)  # reads ahead from this batch's window on
        if self._reader.url is not None:
            self._fetch_ahead(req, fetch=stager is None)
        elif self.io == "mmap":
            self._map_ahead(req)
        prefetch = self._prefetcher()
        if prefetch is None and self.io != "pread":
            return self._build(req)  # no threads, and nothing to hint: the kernel or the
            # stager reads ahead
        upcoming = self._cursor.upcoming(self.options.max_queue_size)
        self._hint(upcoming)
        return self._build(req) if prefetch is None else prefetch.get(req, upcoming)

    def _build(self, req: Request) -> tuple[Any, ...]:
        """The batch of ``req``: by a worker process (with processes), or here."""
        workers = self._worker_pool()
        stager = self._stager() if req.streamed else None
        if workers is not None:
            images = workers.images(req.samples, req.epoch, req.index)
        elif stager is not None:
            with stager.hold(req.epoch, req.samples) as shards:
                images = self._maker.images(
                    req.samples, req.epoch, req.index, self._buffer, shards=shards
                )
        else:
            images = self._maker.images(req.samples, req.epoch, req.index, self._buffer)
        return (images, *self._labels(req.samples))

    def _stager(self) -> ShardStager | None:
        """The reads of whole shards ahead (``io == "stream"``), started on first use in the
        process that owns the Sequence; ``None`` otherwise."""
        if self.io != "stream" or os.getpid() != self._pid:
            return None
        stager = self._stage
        if stager is None:
            with self._lock:
                if self._stage is None:
                    o = self.options
                    self._stage = ShardStager(
                        self._reader,
                        seed=o.seed,
                        shuffle=self.shuffle,
                        window=o.shuffle_window,
                        batch_size=o.batch_size,
                        drop_remainder=o.drop_remainder,
                        drop_cache=drops_cache(self._reader),
                    )
                stager = self._stage
        return stager

    def _fetch_ahead(self, req: Request, *, fetch: bool) -> None:
        """An object store: key the cache by the plan (the shard read furthest ahead is evicted
        first) and, if ``fetch`` (no stager, which fetches its own shards as it reads them),
        start fetching in plan order the shards of the batches that come next, two shuffle
        windows' worth. Done every ``ahead // 4`` batches only: listing the next batches'
        samples for every batch is wasted work once the shards are cached (a warm mapped epoch
        from the cache went from 0.83-0.87 of the local store's speed to 0.87-0.90, one run
        each)."""
        o = self.options
        size = self._reader.shard_size
        ahead = self._lookahead()
        if req.index % max(1, ahead // 4):
            return
        self._reader.key_cache(
            next_use(
                self._cursor.order(req.epoch),
                self._cursor.order(req.epoch + 1),
                req.index * o.batch_size * o.num_shards,
                size,
                self._reader.num_shards,
            )
        )
        if not fetch:
            return
        shards = self._upcoming_shards(ahead)
        if shards:
            self._reader.prefetch(shards)

    def _lookahead(self) -> int:
        """Batches whose shards are fetched or read ahead: two shuffle windows' worth."""
        o = self.options
        return max(
            o.max_queue_size, -(-2 * o.shuffle_window * self._reader.shard_size // o.batch_size)
        )

    def _upcoming_shards(self, ahead: int) -> list[int]:
        """The shards of the next ``ahead`` batches of the plan, each once, in plan order."""
        size = self._reader.shard_size
        shards: dict[int, None] = {}
        for later in self._cursor.upcoming(ahead):
            shards.update(dict.fromkeys((later.samples // size).tolist()))
        return list(shards)

    def _map_ahead(self, req: Request) -> None:
        """A local store read through mappings: every ``ahead // 4`` batches, have the kernel
        start reading the whole files of the shards of the next ``ahead`` batches (two shuffle
        windows' worth), in plan order, unless cached. Without it a cold mapped shard is read
        by the page faults of the thread that needs it, one small read at a time."""
        ahead = self._lookahead()
        if req.index % max(1, ahead // 4):
            return
        shards = self._upcoming_shards(ahead)
        readahead = self._ahead
        if readahead is None:
            files = self._reader.shard_files()
            readahead = self._ahead = ShardReadAhead(files.__getitem__)
        readahead.want(req.epoch, shards)

    def _hint(self, upcoming: list[Request]) -> None:
        """Ask the kernel to start reading the batches that will be asked for next, each once
        (only with ``pread`` I/O: mapped shards are read ahead by the kernel itself)."""
        if self.io != "pread":
            return
        for req in upcoming:
            if req.key not in self._hinted:
                self._reader.will_need(req.samples)
        self._hinted = {req.key for req in upcoming}

    def _prefetcher(self) -> Prefetcher | None:
        """shardfit's read-ahead threads, started on first use: ``workers`` threads building
        batches here, or two per worker process handing them to the processes (so that each
        process has its next batch waiting while it builds one); none in-process."""
        if self.mode not in ("threads", "processes"):
            return None
        prefetch = self._prefetch
        if prefetch is None:
            with self._lock:
                if self._prefetch is None:
                    threads = self.options.workers * (2 if self.mode == "processes" else 1)
                    self._prefetch = Prefetcher(self._build, threads, self.options.max_queue_size)
                prefetch = self._prefetch
        return prefetch

    def close(self) -> None:
        """End the read-ahead threads and worker processes and give back the shared-memory ring
        now (all also go when the Sequence is garbage). Batches still held keep their memory
        until dropped. Batches asked for after this fail, until a new Keras call (a new
        ``fit``) or epoch begins, which starts new workers."""
        with self._lock:
            prefetch, self._prefetch = self._prefetch, None
            stager, self._stage = self._stage, None
            ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.close()
        if prefetch is not None:
            prefetch.close()
        if stager is not None:
            stager.close()
        workers = self._procs  # stays, closed, so that late requests fail, not restart it
        if workers is not None:
            workers.close()
        self._reader.close()

    @property
    def cache_stats(self) -> dict[str, float] | None:
        """For an object store: what this process's shard cache did (see
        :meth:`shardfit.SplitReader.cache_stats`); ``None`` for a local store."""
        return self._reader.cache_stats()

    @property
    def transport_stats(self) -> tuple[int, int] | None:
        """Batches received from worker processes so far, as ``(through shared memory,
        pickled whole)``; ``None`` when no worker pool is in use."""
        pool = self._procs
        if pool is None:
            return None
        return pool.ring.stats.shared, pool.ring.stats.pickled

    def sample_indices(self, index: int, epoch: int | None = None) -> npt.NDArray[np.int64]:
        """Which stored samples batch ``index`` of ``epoch`` (default: the current) holds."""
        return self._cursor.samples(index, self._cursor.epoch if epoch is None else epoch)

    @property
    def num_batches(self) -> int | None:
        """What Keras reads as the length: ``len(seq)``, or ``None`` (endless) under a Keras
        call with ``steps_per_epoch`` (or ``steps``) other than ``len(seq)``: the stream then
        walks on through the plan into the next epoch's, one sample once per pass, as a
        repeated tf.data dataset does; Keras stops after the steps asked for."""
        call = keras_call()
        if call is not None and call.new_iterator:
            # read first where Keras makes the call's iterator, on the thread that runs the
            # call; its batch generator (another thread, under TensorFlow) reads it again and
            # must get the same answer
            self._endless = (
                call.steps is not None
                and call.steps != len(self)
                and self.mode != "keras-processes"
            )
            self._cursor.begin_call(endless=self._endless)
            self._renew_broken_pool()
            if sys._getframe(1).f_code.co_name == "get_data_adapter":
                # Keras asks here only to warn that an endless dataset is not shuffled by
                # fit(shuffle=True): shardfit's is, by its own plan
                return len(self)
        return None if self._endless else len(self)

    @property
    def labels(self) -> npt.NDArray[np.int32]:
        """The labels (int class indices) of the samples in the order the next pass serves
        them: the current epoch's plan (the store's order without shuffling). ``predict`` and
        ``evaluate`` serve that plan and leave the epoch where it stands, so
        ``seq.labels`` read before or after ``model.predict(seq)`` scores its rows."""
        return self._reader.labels()[self._cursor.epoch_samples(self._cursor.epoch)]

    def on_epoch_begin(self) -> None:
        call = keras_call()
        if call is not None and call.building:
            # Keras takes a batch to build the model, then ends this "epoch" at once: those
            # requests are probes, served by index (JAX and PyTorch backends)
            return
        self._renew_broken_pool()
        inference = call is not None and call.kind in ("predict", "evaluate")
        if call is not None and call.kind == "predict" and self.shuffle:
            self._warn_shuffled_predict()
        if call is not None and call.kind == "fit":
            self._follow_initial_epoch(call.epoch, call.initial_epoch, call.steps)
        self._cursor.epoch_begin(inference=inference)

    def on_epoch_end(self) -> None:
        self._cursor.epoch_end(by_user=keras_call() is None)

    def _renew_broken_pool(self) -> None:
        """A fit that failed on a dead worker, or a :meth:`close`, left the pool broken: a new
        Keras call (or epoch) starts new workers on its first request. Done where Keras makes
        the call's iterator, before it asks for any batch (it asks before ``on_epoch_begin``),
        and at each epoch's start for loops of one's own."""
        workers = self._procs
        if workers is None or not workers.broken:
            return
        prefetch = None
        with self._lock:
            if self._procs is workers:
                self._procs = None
                # its read-ahead holds the broken pool's failures for the batches it had asked
                # for: those batches are asked for again, from the new workers
                prefetch, self._prefetch = self._prefetch, None
        workers.close()
        if prefetch is not None:
            prefetch.close()

    def _follow_initial_epoch(
        self, epoch: int | None, initial_epoch: int | None, steps: int | None
    ) -> None:
        """At the first epoch of ``fit(initial_epoch=k)``, serve epoch ``k``'s plan (whole
        epochs only: with ``steps_per_epoch`` Keras's epochs are not the plan's)."""
        if not initial_epoch or epoch != initial_epoch or steps not in (None, len(self)):
            return
        if self._cursor.epoch == initial_epoch:
            return
        try:
            self._cursor.start_epoch(initial_epoch)
        except ValueError as err:
            raise InvalidOptionError(
                f"fit(initial_epoch={initial_epoch}) but {err}: pass the same initial_epoch to "
                "the Sequence, or resume with shardfit.BackupAndRestore"
            ) from None
        log.info(
            "shardfit: serving epoch %d's plan, as fit(initial_epoch=%d) asks",
            initial_epoch,
            initial_epoch,
        )

    def _warn_shuffled_predict(self) -> None:
        if self._warned_predict:
            return
        self._warned_predict = True
        warnings.warn(
            "predict on a shuffled shardfit.Sequence returns its rows in this epoch's shuffled "
            "order: score them against seq.labels, or pass shuffle=False for the store's order",
            UserWarning,
            stacklevel=3,
        )

    # -- internals ---------------------------------------------------------------------------

    def _buffer(self, shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
        pool = self._buffers
        if pool is None or pool[0] != os.getpid():
            # enough for the batches read ahead, those being built, and the one trained on; a
            # batch still referenced anywhere (TensorFlow's own prefetch) is never reused
            capacity = self.options.max_queue_size + self.options.workers + 2
            pool = self._buffers = (os.getpid(), BufferPool(capacity))
        return pool[1].array(shape, np.float32)

    def _worker_pool(self) -> WorkerPool | None:
        """shardfit's worker processes, started on first use; ``None`` when batches are built
        in this process."""
        if self.mode != "processes" or os.getpid() != self._pid:
            return None
        workers = self._procs
        if workers is not None:
            return workers
        with self._lock:
            if self._procs is None:
                per_image = int(np.prod(self._reader.image_shape)) * 4  # float32 out
                self._procs = WorkerPool(
                    self._maker,
                    self.options.workers,
                    # the batches read ahead, one being built by each worker and one waiting
                    # for each, the model's one or two
                    slots=self.options.max_queue_size + 2 * self.options.workers + 2,
                    slot_bytes=self.options.batch_size * per_image,
                    ctx=worker_context(self._reader),
                )
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

    def __getstate__(self) -> dict[str, Any]:
        spawning = context.get_spawning_popen() is not None
        self._maker.check_picklable(
            "spawn or forkserver worker processes" if spawning else "another process"
        )
        state = self.__dict__.copy()
        del state["_lock"]
        state["_buffers"] = None
        state["_procs"] = None  # threads, processes and shared memory stay with their owner
        state["_prefetch"] = None
        state["_stage"] = None
        state["_ahead"] = None
        state["_hinted"] = set()
        state["_active"] = 0
        state["_exiting"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        _LIVE.add(self)


# tf.data's autotuning thread stalls fit for seconds between epochs (see _tf_pipeline)
_tf_pipeline.install(lambda dataset: isinstance(dataset, Sequence))
