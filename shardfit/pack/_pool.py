"""Decode files in worker processes, results in submission order, surviving crashed decoders.

Built on plain ``multiprocessing`` processes and pipes rather than a pool class because the
parent must know which file a dead worker was decoding: ``multiprocessing.Pool`` hangs and
``ProcessPoolExecutor`` fails every pending task when a worker dies. Here each worker holds at
most ``per_worker`` tasks and answers them in order, so the first unanswered task of a dead worker
is the file that killed it; it is reported as failed, the worker's other tasks are re-sent, and a
new worker takes its place.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import mmap
import multiprocessing as mp
import os
import signal
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from typing import Any

import numpy as np
import numpy.typing as npt

from shardfit.pack._decode import DecodeSpec, decode_image, describe_error
from shardfit.store._shardio import ChunkEncoder

__all__ = ["DecodePool", "DecodeResult"]


@dataclass(frozen=True, slots=True)
class DecodeResult:
    """The outcome of one task: ``chunk`` (encoded bytes) on success, else ``error``."""

    index: int
    chunk: bytes | memoryview | None
    error: str | None


def _decode_one(
    index: int,
    path: str,
    spec: DecodeSpec,
    encoder: ChunkEncoder,
    out: npt.NDArray[Any] | None = None,
) -> DecodeResult:
    try:
        return DecodeResult(index, encoder.encode(decode_image(path, spec, out)), None)
    except Exception as err:  # every decoder failure becomes a skip reason, never a crash
        # Pillow repeats the path in some messages; the report names the file already
        return DecodeResult(index, None, describe_error(err).replace(f" '{path}'", ""))


def _keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of returning it to the OS.

    Decoding allocates and frees image-sized buffers for every file; by default glibc maps
    buffers over 128 KiB afresh and trims the heap, so every image pays ~100 page faults, and a
    first touch of a page is costly on VMs (measured: worker sys time halved, faults per image
    106 -> 6). The heap then stays as large as the largest image decoded, per worker.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl, ...): keep the defaults
        pass


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int | None) -> None:
    """Make the kernel kill this worker when the packer dies, however it dies.

    A worker blocked in ``recv`` never sees its pipe close, because forked siblings hold copies
    of the parent's ends; and ``kill -9``, the OOM killer or an unhandled SIGTERM of the packer
    runs none of its cleanup. Without this, workers would live on, reparented to init, forever.
    ``PR_SET_PDEATHSIG`` is Linux's; elsewhere the pipe's end is the only signal.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    # the parent may have died between the fork and the prctl: then no signal will come
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def _worker_main(
    conn: Connection,
    spec: DecodeSpec,
    compression: str,
    mute_stderr: bool,
    slots: mmap.mmap | None,
    slot_bytes: int,
    parent_pid: int | None = None,
) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    # the packer's CLI turns SIGTERM into a clean stop; here it must keep its default (close()
    # ends a stuck worker with it)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if mute_stderr:
        # libtiff and other C decoders print diagnostics straight to fd 2, scrambling the
        # progress bar; every failure still reaches the parent as a skip reason.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    _keep_freed_memory()
    encoder = ChunkEncoder(compression)
    shape = (spec.height, spec.width, 3)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, path, slot = msg
        out: npt.NDArray[Any] | None = None
        if slots is not None and slot is not None and compression == "none":
            # decode straight into the slot: no image-sized array, no copy
            out = np.ndarray(shape, dtype=spec.dtype, buffer=slots, offset=slot * slot_bytes)
        result = _decode_one(index, path, spec, encoder, out)
        if result.chunk is None:
            conn.send((index, None, result.error))
            continue
        n = len(result.chunk)
        if slots is not None and slot is not None and n <= slot_bytes:
            # the bytes are in shared memory; only their length crosses the pipe
            if out is None:
                slots[slot * slot_bytes : slot * slot_bytes + n] = result.chunk
            conn.send((index, n, False))
        else:  # no shared memory (spawn, forkserver) or an oversized compressed chunk
            conn.send((index, n, True))
            conn.send_bytes(result.chunk)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass(eq=False)
class _Worker:
    proc: Any
    conn: Connection
    assigned: deque[int] = field(default_factory=deque)


def _default_context() -> BaseContext:
    # fork lets workers inherit the anonymous shared memory of the result slots; elsewhere
    # (macOS, Windows) the platform's default is the safe choice and results go through pipes
    if sys.platform == "linux":
        return mp.get_context("fork")
    return mp.get_context()


class DecodePool:
    """Decodes and encodes images in ``workers`` processes (``0``: in this process).

    Use as a context manager; :meth:`imap` yields one :class:`DecodeResult` per path, in order.
    At most ``window`` results are decoded ahead of the consumer, which bounds memory. With the
    fork start method, workers write results into a ring of shared-memory slots and send only
    their length; a yielded ``chunk`` is then a view of its slot, valid until the next result is
    taken from :meth:`imap`.
    """

    def __init__(
        self,
        workers: int,
        spec: DecodeSpec,
        compression: str,
        *,
        per_worker: int = 4,
        window: int | None = None,
        mute_stderr: bool = True,
        context: BaseContext | None = None,
    ) -> None:
        self._spec = spec
        self._compression = compression
        self._nworkers = workers
        self._per_worker = per_worker
        self._window = window if window is not None else max(8, 8 * workers)
        self._mute = mute_stderr
        self._ctx = context if context is not None else _default_context()
        self._workers: list[_Worker] = []
        raw = spec.height * spec.width * 3 * (4 if spec.dtype == "float32" else 1)
        # compressed chunks can exceed the raw size a little; larger ones fall back to the pipe
        self._slot_bytes = raw if compression == "none" else raw + raw // 16 + 4096
        self._slots: mmap.mmap | None = None
        self._free: deque[int] = deque()
        self._slot_of: dict[int, int] = {}
        self.crashes = 0

    def __enter__(self) -> DecodePool:
        if self._nworkers and self._ctx.get_start_method() == "fork":
            nslots = self._window + 1  # every task in the window, plus the one being consumed
            self._slots = mmap.mmap(-1, nslots * self._slot_bytes)  # MAP_SHARED | MAP_ANONYMOUS
            self._free = deque(range(nslots))
        self._workers = [self._start_worker() for _ in range(self._nworkers)]
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(graceful=exc_type is None)

    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        # a forkserver's workers are the server's children, not ours: no parent check there
        method = self._ctx.get_start_method()
        parent_pid = os.getpid() if method in ("fork", "spawn") else None
        proc = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker_main,
            args=(
                child,
                self._spec,
                self._compression,
                self._mute,
                self._slots,
                self._slot_bytes,
                parent_pid,
            ),
            name="shardfit-decode",
            daemon=True,
        )
        # A forked worker's garbage collector would touch, and so copy, every inherited
        # object; frozen objects it leaves alone. The parent unfreezes at once.
        gc.freeze()
        try:
            proc.start()
        finally:
            gc.unfreeze()
        child.close()
        return _Worker(proc, parent)

    def close(self, graceful: bool = True) -> None:
        """Stop every worker; after an error, without waiting for their current file."""
        for w in self._workers:
            if graceful:
                with contextlib.suppress(OSError):
                    w.conn.send(None)
            else:
                w.proc.terminate()
        for w in self._workers:
            w.proc.join(timeout=5 if graceful else 1)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.conn.close()
        self._workers = []
        self._slots = None  # unmapped once the last view of it is gone

    def imap(self, paths: Sequence[str]) -> Iterator[DecodeResult]:
        """Decode ``paths``; yield their results in the same order."""
        if self._nworkers == 0:
            encoder = ChunkEncoder(self._compression)
            for i, path in enumerate(paths):
                yield _decode_one(i, path, self._spec, encoder)
            return
        todo: deque[int] = deque(range(len(paths)))
        done: dict[int, DecodeResult] = {}
        next_out = 0
        while next_out < len(paths):
            for w in self._workers:
                while (
                    len(w.assigned) < self._per_worker
                    and todo
                    and todo[0] < next_out + self._window
                ):
                    i = todo.popleft()
                    slot = None
                    if self._slots is not None:
                        slot = self._slot_of[i] = self._free.popleft()
                    w.conn.send((i, paths[i], slot))
                    w.assigned.append(i)
            if next_out in done:
                result = done.pop(next_out)
                yield result
                self._release(next_out)  # the consumer is done with its view
                next_out += 1
                continue
            by_handle: dict[Any, _Worker] = {}
            for w in self._workers:
                by_handle[w.conn] = w
                by_handle[w.proc.sentinel] = w
            dead: list[_Worker] = []
            for handle in wait(list(by_handle)):
                w = by_handle[handle]
                if handle is w.conn:
                    if not self._receive(w, done):
                        dead.append(w)
                elif w not in dead:
                    dead.append(w)
            for w in dead:
                self._replace(w, todo, done)

    def _release(self, index: int) -> None:
        slot = self._slot_of.pop(index, None)
        if slot is not None:
            self._free.append(slot)

    def _receive(self, w: _Worker, done: dict[int, DecodeResult]) -> bool:
        # a header (index, nbytes, inline) for a chunk, or (index, None, error) for a failure
        try:
            index, nbytes, inline_or_error = w.conn.recv()
            if nbytes is None:
                result = DecodeResult(index, None, inline_or_error)
            elif inline_or_error or self._slots is None:
                result = DecodeResult(index, w.conn.recv_bytes(), None)
            else:
                start = self._slot_of[index] * self._slot_bytes
                result = DecodeResult(index, memoryview(self._slots)[start : start + nbytes], None)
        except (EOFError, OSError):
            return False
        w.assigned.popleft()
        done[index] = result
        return True

    def _replace(self, w: _Worker, todo: deque[int], done: dict[int, DecodeResult]) -> None:
        while w.assigned and w.conn.poll() and self._receive(w, done):
            pass  # keep the answers it sent before dying
        w.proc.join(timeout=5)
        if w.proc.is_alive():  # the pipe broke but the process lives on: end it
            w.proc.kill()
            w.proc.join()
        w.conn.close()
        if not w.assigned:
            raise RuntimeError(
                f"a decode worker exited without a task ({_exit_text(w.proc.exitcode)})"
            )
        culprit = w.assigned.popleft()
        self.crashes += 1
        done[culprit] = DecodeResult(
            culprit, None, f"decoder crashed its worker process ({_exit_text(w.proc.exitcode)})"
        )
        for i in w.assigned:  # re-sent later, each with a fresh slot
            self._release(i)
        todo.extendleft(sorted(w.assigned, reverse=True))
        self._workers[self._workers.index(w)] = self._start_worker()
