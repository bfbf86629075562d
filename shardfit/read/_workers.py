"""shardfit's own worker processes: they build batches into shared memory for the consumer.

Keras's process pool pickles every batch through a pipe, is rebuilt at every epoch (re-importing
TensorFlow in each worker under forkserver), and waits forever for a batch whose worker died.
Here a :class:`WorkerPool` starts its processes once and keeps them for the life of the
``Sequence``. Any thread of the consumer asks for a batch with :meth:`WorkerPool.images`: it
takes an idle worker and a free slot of the ring, sends the worker the sample indices (a few
hundred bytes), and waits; the worker reads the samples into the slot, applies the transform,
and answers with the batch's shape. Keras's own thread enqueuer, in front of the pool, keeps
``workers`` such requests in flight in whatever order ``fit`` wants.

A worker that dies closes its end of the pipe: the request waiting on it fails at once with
:class:`~shardfit.errors.WorkerCrashedError` (so ``fit`` stops with that error instead of
hanging), the pool ends its other workers, and later requests fail the same way until
:meth:`WorkerPool.close`. Workers ignore SIGINT (Ctrl-C is the consumer's to handle) and exit
when the consumer closes the pool, exits, or dies.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import traceback
import weakref
from collections import deque
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import numpy.typing as npt

from shardfit.errors import WorkerCrashedError
from shardfit.read._batch import BatchMaker
from shardfit.read._shm import RingHandle, SlotRing

__all__ = ["WorkerPool", "alive", "worker_context"]

log = logging.getLogger("shardfit")

#: How long a request waits for a free slot before its batch comes back pickled instead.
_SLOT_WAIT_S = 0.2
#: How often an idle worker checks that the consumer still lives.
_PARENT_CHECK_S = 1.0
#: How long close() lets workers finish their batch and exit before killing them.
_EXIT_WAIT_S = 2.0


@dataclass
class _Worker:
    proc: BaseProcess
    conn: Connection
    #: requests sent and not yet answered, in the order sent (the worker answers in that order)
    waiting: deque[object] = field(default_factory=deque)
    turn: threading.Condition = field(default_factory=threading.Condition)


def worker_context(reader: Any) -> multiprocessing.context.BaseContext | None:
    """The start method for workers reading ``reader``: the default, except that workers of an
    object store are not forked from this process (which has used obstore, whose runtime
    threads a fork does not copy: a forked worker would hang on its first fetch) but from a
    fresh fork server."""
    if getattr(reader, "url", None) is None:
        return None
    if multiprocessing.get_start_method(allow_none=False) != "fork":
        return None
    return multiprocessing.get_context("forkserver")


class WorkerPool:
    """``workers`` processes that build batches with ``maker`` into a ring of ``slots``
    shared-memory slots of ``slot_bytes`` each, which the pool owns.

    Start it in the process that consumes the batches. Under spawn and forkserver, ``maker``
    (and so the transform) must pickle.

    Raises:
        InvalidOptionError: the transform does not pickle and the start method needs it to.
        SharedMemoryError: the ring cannot be made (see :class:`SlotRing`).
    """

    def __init__(
        self,
        maker: BatchMaker,
        workers: int,
        *,
        slots: int,
        slot_bytes: int,
        ctx: multiprocessing.context.BaseContext | None = None,
    ) -> None:
        ctx = ctx or multiprocessing.get_context()
        method = ctx.get_start_method()
        if method != "fork":
            maker.check_picklable(f"{method} worker processes")
        #: the batches' shared memory: this pool's own, given back by :meth:`close`
        self.ring = SlotRing(slots, slot_bytes)
        self._all: list[_Worker] = []
        self._broken: BaseException | None = None
        self._lock = threading.Lock()
        try:
            for _ in range(workers):
                parent_conn, child_conn = ctx.Pipe(duplex=True)
                proc = ctx.Process(  # type: ignore[attr-defined]
                    target=_serve,
                    args=(child_conn, maker, self.ring.handle, os.getpid(), method == "fork"),
                    name="shardfit-worker",
                    daemon=True,
                )
                proc.start()
                child_conn.close()  # the worker's end: a dead worker then reads as EOF here
                w = _Worker(proc, parent_conn)
                self._all.append(w)
        except BaseException:
            _shutdown(self._all)
            self.ring.close()
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self._all)

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers."""
        return [w.proc.pid for w in self._all if w.proc.pid is not None]

    @property
    def broken(self) -> bool:
        """Whether a worker died (every request fails since)."""
        return self._broken is not None

    def images(
        self,
        samples: npt.NDArray[np.int64],
        epoch: int,
        index: int,
    ) -> npt.NDArray[Any]:
        """Batch ``index`` of ``epoch`` (the images of ``samples``), built by a worker: an array
        viewing a ring slot, or a plain array when no slot came free in time.

        Raises:
            WorkerCrashedError: a worker died (this one's or an earlier request's).
            Whatever the transform or the reader raised in the worker.
        """
        if self._broken is not None:
            raise self._broken
        # The least busy worker; it may be busy: the request waits in its pipe, so that the
        # worker starts on it the moment it has answered the one before (the round trip of
        # an answer would otherwise leave it idle every batch).
        w = min(self._all, key=lambda w: len(w.waiting))
        slot = self.ring.claim(_SLOT_WAIT_S)
        ticket = object()
        try:
            answer = self._ask(w, ticket, (-1 if slot is None else slot, samples, epoch, index))
        except (EOFError, OSError):
            if slot is not None:
                self.ring.give_back(slot)
            raise self._crashed(w) from None
        except BaseException as err:
            if slot is not None:
                self.ring.give_back(slot)
            if not isinstance(err, WorkerCrashedError):  # interrupted: end the pool
                self._fail(w, WorkerCrashedError("shardfit's worker pool was interrupted"))
            raise
        try:
            reply = pickle.loads(answer)
        except Exception as unreadable:  # an error type the worker knows, this process not
            if slot is not None:
                self.ring.give_back(slot)
            raise RuntimeError(f"a worker's answer could not be read: {unreadable!r}") from None
        kind = reply[0]
        if kind == "slot" and slot is not None:
            return self.ring.take(slot, reply[1], reply[2])
        if slot is not None:
            self.ring.give_back(slot)
        if kind == "array":
            self.ring.count(shared=False)
            out: npt.NDArray[Any] = reply[1]
            return out
        raise reply[1] from _RemoteTraceback(reply[2])

    def _ask(self, w: _Worker, ticket: object, task: tuple[Any, ...]) -> bytes:
        """Send ``task`` to ``w`` and wait for its answer, which comes after the answers to
        the requests sent to ``w`` before it."""
        with w.turn:
            if self._broken is not None:
                raise self._broken
            w.conn.send(task)
            w.waiting.append(ticket)
            try:
                while w.waiting[0] is not ticket:
                    if self._broken is not None:
                        raise self._broken
                    w.turn.wait(_PARENT_CHECK_S)
            except BaseException:
                self._break(WorkerCrashedError("shardfit's worker pool was interrupted"))
                w.waiting.remove(ticket)
                w.turn.notify_all()
                raise
        try:
            answer = w.conn.recv_bytes()  # only the first in line reads
        except (EOFError, OSError):  # the worker died: no answer will come after this
            self._next_in_line(w)
            raise
        except BaseException:
            # an answer left unread would be taken for the next request's: from now on every
            # answer is refused
            self._break(WorkerCrashedError("shardfit's worker pool was interrupted"))
            self._next_in_line(w)
            raise
        self._next_in_line(w)
        if self._broken is not None:
            raise self._broken
        return answer

    @staticmethod
    def _next_in_line(w: _Worker) -> None:
        with w.turn:
            w.waiting.popleft()
            w.turn.notify_all()

    def _break(self, err: BaseException) -> None:
        with self._lock:
            if self._broken is None:
                self._broken = err

    def close(self) -> None:
        """End the workers (each finishes the batch it builds first, for a moment) and give
        back the ring (its memory stays mapped while batches still view it)."""
        with self._lock:
            if self._broken is None:
                self._broken = WorkerCrashedError("shardfit's worker pool is closed")
        self._finalizer()
        self.ring.close()

    # -- a worker died ----------------------------------------------------------------------

    def _crashed(self, w: _Worker) -> BaseException:
        if self._broken is not None:  # closed, or another worker's death ended this one
            return self._broken
        w.proc.join(timeout=1.0)
        err = WorkerCrashedError(
            f"data worker process {w.proc.pid} {_how(w.proc.exitcode)} while building a batch; "
            "the batch is lost, so fit stops. If the OOM killer ended it, lower workers, "
            "max_queue_size or batch_size"
        )
        log.error("%s", err)
        return self._fail(w, err)

    def _fail(self, w: _Worker, err: BaseException) -> BaseException:
        with self._lock:
            if self._broken is None:
                self._broken = err
            err = self._broken
        self._finalizer()
        return err


def _shutdown(workers: list[_Worker]) -> None:
    """Ask each worker to exit, wait a little, then kill what is left; close the pipes."""
    for w in workers:
        with contextlib.suppress(OSError, ValueError):
            w.conn.send(None)
    for w in workers:
        w.proc.join(timeout=_EXIT_WAIT_S)
        if w.proc.is_alive():
            with contextlib.suppress(OSError):
                w.proc.kill()
            w.proc.join(timeout=_EXIT_WAIT_S)
    for w in workers:
        w.conn.close()


# -- the worker process -------------------------------------------------------------------------


def _serve(
    conn: Connection, maker: BatchMaker, ring: RingHandle, consumer: int, forked: bool
) -> None:
    """A worker's life: build each batch asked for, until told to stop or the consumer is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the consumer to handle
    if forked:
        # A lock another thread of the consumer held at the fork stays held here forever: take
        # a reader of our own (a reader pickles to its path and a few numbers).
        maker = replace(maker, reader=pickle.loads(pickle.dumps(maker.reader)))
        # The garbage collector would walk (and so copy, page by page) the whole heap inherited
        # from the consumer, TensorFlow included: keep it to the worker's own objects.
        gc.freeze()
    while True:
        try:
            while not conn.poll(_PARENT_CHECK_S):
                if not alive(consumer):
                    return
            task = conn.recv()
        except (EOFError, OSError):
            return  # the consumer closed the pipe or died
        if task is None:
            return
        try:
            reply = _build(maker, ring, *task)
        except Exception as err:
            reply = ("error", _portable(err), traceback.format_exc())
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return


def _build(
    maker: BatchMaker,
    ring: RingHandle,
    slot: int,
    samples: npt.NDArray[np.int64],
    epoch: int,
    index: int,
) -> tuple[Any, ...]:
    if slot < 0:
        return ("array", maker.images(samples, epoch, index, _fresh))
    images = maker.images(samples, epoch, index, lambda shape: ring.array(slot, shape, np.float32))
    if not ring.fits(images.nbytes):
        return ("array", images)  # a transform made it larger than a slot
    dst = ring.array(slot, images.shape, images.dtype)
    if dst.ctypes.data != images.ctypes.data or not images.flags.c_contiguous:
        if np.may_share_memory(dst, images):
            images = images.copy()  # a rearranged view of the slot itself
        dst[...] = images
    return ("slot", images.shape, images.dtype.str)


def _fresh(shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
    return np.empty(shape, np.float32)


def _portable(err: BaseException) -> BaseException:
    """``err`` if it pickles (the consumer re-raises the same type), else a stand-in."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err


class _RemoteTraceback(Exception):
    """The traceback of an error raised in a worker, shown as the cause of its re-raise."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def _how(code: int | None) -> str:
    if code is None:
        return "died"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
