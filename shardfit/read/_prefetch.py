"""Read-ahead along the stream: the next batches of the epoch plan are built while the current
one is trained on.

Since shardfit serves the plan in order (``_order``), the batches asked for next are known
exactly: :class:`Prefetcher` keeps the next ``depth`` of them in flight on ``threads`` threads of
its own, each building one batch (in this process, or by handing it to shardfit's worker
processes). A request takes its batch from what is in flight, or builds it at once if it is not
there. Nothing is read ahead that will not be asked for next, unless the consumer stops (the end
of ``fit``), and then it is only dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from shardfit.read._order import Request

__all__ = ["Prefetcher"]


class Prefetcher:
    """Builds batches with ``build(request)`` on ``threads`` threads, ``depth`` ahead.

    Thread-safe. Not picklable (it holds threads): its owner drops it when pickled.
    """

    def __init__(self, build: Callable[[Request], Any], threads: int, depth: int) -> None:
        self._build = build
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shardfit-read")
        self._inflight: dict[tuple[int, int], Future[Any]] = {}
        self._lock = threading.Lock()

    def get(self, request: Request, upcoming: list[Request]) -> Any:
        """The batch of ``request`` (waiting for it if it is still being built), after putting
        the first ``depth`` of ``upcoming`` (the batches that will be asked for next, in order)
        in flight. Raises whatever building the batch raised."""
        with self._lock:
            future = self._inflight.pop(request.key, None)
            if future is None:
                future = self._pool.submit(self._build, request)
            wanted = upcoming[: self.depth]
            keys = {r.key for r in wanted}
            for key in [k for k in self._inflight if k not in keys]:
                # not going to be asked for (the stream moved elsewhere): let it go
                self._inflight.pop(key).cancel()
            for r in wanted:
                if r.key not in self._inflight:
                    self._inflight[r.key] = self._pool.submit(self._build, r)
        return future.result()

    def in_flight(self) -> list[tuple[int, int]]:
        """``(epoch, index)`` of the batches being built or ready, in the order asked."""
        with self._lock:
            return list(self._inflight)

    def close(self) -> None:
        """Drop what is in flight and end the threads (a batch being built finishes first)."""
        with self._lock:
            for future in self._inflight.values():
                future.cancel()
            self._inflight.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
