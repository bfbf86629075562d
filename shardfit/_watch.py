"""Turn a dead Keras data worker into an error instead of a hang.

Keras 3.15's enqueuer waits for each batch of a ``multiprocessing.Pool`` with no timeout. When a
worker dies (``kill -9``, the OOM killer, a crash in native code), the pool starts a replacement
but the batch that worker was building never arrives, and ``fit`` waits forever; a worker killed
while it waited for a task can even leave the pool's task queue locked for all the others.

A daemon thread in the parent watches the pools Keras made for datasets (its ``_DATA_POOLS``).
Pool workers only exit when their pool is closed or terminated, so a worker that exits (or is
replaced) while its pool runs has died. Then every batch still awaited from that pool is failed
with :class:`~shardfit.errors.WorkerCrashedError`, which Keras raises out of ``fit``, and the
pool's other workers are ended, so no worker is left behind. This touches private parts of
Keras and of ``multiprocessing.pool`` (``_DATA_POOLS``, ``_pool``, ``_state``, ``_cache``);
when they are not as expected the watch logs a warning once and stands down, and ``fit``
behaves as without it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import weakref
from typing import Any

from shardfit._shm import alive
from shardfit.errors import WorkerCrashedError

__all__ = ["watch_keras_pools"]

log = logging.getLogger("shardfit")

_INTERVAL_S = 0.2
_STUCK_S = 2.0
_started: int | None = None  # pid of the process whose watch thread runs
_lock = threading.Lock()


def watch_keras_pools() -> None:
    """Start this process's watch thread, once."""
    global _started
    import os

    with _lock:
        if _started == os.getpid():
            return
        _started = os.getpid()
    threading.Thread(target=_watch, name="shardfit-pool-watch", daemon=True).start()


def _watch() -> None:
    try:
        from keras.src.trainers.data_adapters import py_dataset_adapter as adapter
    except ImportError:  # pragma: no cover - another Keras layout
        log.warning("shardfit cannot watch Keras's worker pools in this Keras version")
        return
    seen: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()
    failed: weakref.WeakKeyDictionary[Any, WorkerCrashedError] = weakref.WeakKeyDictionary()
    idle_since: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
    stop = threading.Event()
    while not stop.wait(_INTERVAL_S):
        try:
            for pool in list(adapter._DATA_POOLS):
                if pool in failed:
                    # a batch Keras asked for, or a worker the pool started, just before it
                    # closed: fail and end those too
                    _fail_pending(pool, failed[pool])
                    _kill_workers(pool)
                    continue
                err = _check(pool, seen)
                if err is not None:
                    failed[pool] = err
                _reap_stuck(pool, idle_since)
        except Exception as err:
            log.warning("shardfit stopped watching Keras's worker pools: %r", err)
            return


def _check(
    pool: Any, seen: weakref.WeakKeyDictionary[Any, dict[int, Any]]
) -> WorkerCrashedError | None:
    """The error to fail the pool with, if one of its workers died (it is then failed)."""
    if pool._state != "RUN":
        return None
    procs = list(pool._pool)
    known = seen.setdefault(pool, {})
    known.update((p.pid, p) for p in procs)
    # Liveness from /proc, not Process.exitcode: under forkserver, reading exitcode consumes the
    # exit status from a pipe that the pool's own thread reads too.
    dead = [(pid, _exit_code(p)) for pid, p in known.items() if not alive(pid)]
    if not dead or pool._state != "RUN":  # closed meanwhile: its workers exit on purpose
        return None
    pid, code = dead[0]
    err = WorkerCrashedError(
        f"data worker process {pid} {_how(code)} while model.fit was running; the batch it "
        "was building is lost, so fit stops. If the OOM killer ended it, lower workers, "
        "max_queue_size or batch_size"
    )
    log.error("%s", err)
    _fail_pending(pool, err)
    # Not pool.terminate(): it takes the task queue's read lock first, which a worker killed
    # while waiting for a task holds forever. Stop the pool from replacing workers, then end
    # them: fit is failing, their batches are not wanted any more.
    pool.close()
    _kill_workers(pool)
    return err


def _reap_stuck(pool: Any, idle_since: weakref.WeakKeyDictionary[Any, float]) -> None:
    """End the workers of a closed pool with nothing left to do that have not exited within
    _STUCK_S: they wait for a task-queue lock that a dead worker took with it (Ctrl-C can
    leave a pool so), and would otherwise outlive fit."""
    if pool._state == "RUN" or pool._cache or not any(alive(p.pid) for p in pool._pool):
        idle_since.pop(pool, None)
        return
    first = idle_since.setdefault(pool, time.monotonic())
    if time.monotonic() - first > _STUCK_S:
        _kill_workers(pool)


def _kill_workers(pool: Any) -> None:
    for p in list(pool._pool):
        if alive(p.pid):
            with contextlib.suppress(OSError, AttributeError):
                p.kill()


def _fail_pending(pool: Any, err: WorkerCrashedError) -> None:
    for result in list(pool._cache.values()):
        with contextlib.suppress(KeyError):  # its real result arrived meanwhile
            result._set(0, (False, err))


def _exit_code(proc: Any) -> int | None:
    """How a process ended, if multiprocessing already knows (without asking the OS)."""
    popen = getattr(proc, "_popen", None)
    code = getattr(popen, "returncode", None)
    return code if isinstance(code, int) else None


def _how(code: int | None) -> str:
    if code is None:
        return "died"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
