"""Decode on a ``dask.distributed`` cluster: the same results, in the same order, as
:class:`~shardfit.pack._pool.DecodePool`, so the shards written from them are byte-identical.

The cluster decodes and encodes (the costly part: ~90% of a pack's CPU time); this process
writes the shards in plan order as results arrive, through the same writer and progress records
as a local pack, so that a pack killed anywhere (a worker, this client) resumes the same way.
Files go to the cluster in blocks (one task per block: a task costs the scheduler ~1 ms, a small
image to decode about as much), at most ``window`` blocks in flight, which bounds the memory
held here for results not yet written. A worker that dies is replaced by Dask and its tasks run
again; a block whose task kills every worker that tries it (a decoder crash) is decoded file by
file, and the file whose task dies is reported as skipped, as the local pool does.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from shardfit.errors import InvalidOptionError
from shardfit.pack._decode import DecodeSpec
from shardfit.pack._pool import DecodeResult, _decode_one
from shardfit.store._shardio import ChunkEncoder

__all__ = ["BLOCK", "DaskDecodePool", "connect"]

log = logging.getLogger("shardfit")

#: Files per task.
BLOCK = 16
#: Seconds to wait for a scheduler to answer.
_CONNECT_S = 10


def _decode_block(
    first: int, paths: list[str], spec: DecodeSpec, compression: str
) -> list[tuple[int, bytes | None, str | None]]:
    """Decode ``paths`` (the tasks ``first``, ``first + 1``...) on a worker."""
    encoder = ChunkEncoder(compression)
    out = []
    for j, path in enumerate(paths):
        r = _decode_one(first + j, path, spec, encoder)
        out.append((r.index, None if r.chunk is None else bytes(r.chunk), r.error))
    return out


def connect(dask: Any) -> tuple[Any, Any]:
    """``(client, cluster or None)`` for the ``dask`` argument of ``pack_images``: a
    ``distributed.Client``, a scheduler address, or ``"local:N"`` (a ``LocalCluster`` of ``N``
    single-threaded worker processes, closed with the pack)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise InvalidOptionError(
            "dask needs the 'distributed' package: pip install 'shardfit[dask]'. "
            f"Received: dask={dask!r}"
        ) from None
    if isinstance(dask, Client):
        return dask, None
    if not isinstance(dask, str) or not dask:
        raise InvalidOptionError(
            "dask must be a distributed.Client, a scheduler address (tcp://host:8786) or "
            f"'local:N'. Received: {dask!r}"
        )
    if dask.startswith("local:"):
        n = dask.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise InvalidOptionError(
                f"dask='local:N' needs N, the worker processes, a positive int. Received: {dask!r}"
            )
        cluster = LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=int(n), threads_per_worker=1, processes=True, dashboard_address=None
        )
        return Client(cluster), cluster  # type: ignore[no-untyped-call]
    try:
        return Client(dask, timeout=_CONNECT_S), None  # type: ignore[no-untyped-call]
    except OSError as err:
        raise InvalidOptionError(
            f"dask: no scheduler answers at {dask} ({err}): start one (dask scheduler) or check "
            "the address"
        ) from None


class DaskDecodePool:
    """Decodes on a Dask cluster; use as a context manager, like ``DecodePool``."""

    def __init__(self, dask: Any, spec: DecodeSpec, compression: str) -> None:
        self._dask = dask
        self._spec = spec
        self._compression = compression
        self._client: Any = None
        self._cluster: Any = None
        self.crashes = 0

    def __enter__(self) -> DaskDecodePool:
        self._client, self._cluster = connect(self._dask)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cluster is not None:  # a cluster of our own: closed with the pack
            self._client.close()
            self._cluster.close()

    def _workers(self) -> int:
        return max(1, len(self._client.scheduler_info(n_workers=-1).get("workers", {})))

    def imap(self, paths: Sequence[str]) -> Iterator[DecodeResult]:
        """Decode ``paths``; yield their results in the same order."""
        client = self._client
        window = 4 * self._workers()
        starts = list(range(0, len(paths), BLOCK))
        pending: deque[tuple[int, Any]] = deque()
        nxt = 0
        while nxt < len(starts) or pending:
            while nxt < len(starts) and len(pending) < window:
                first = starts[nxt]
                block = list(paths[first : first + BLOCK])
                future = client.submit(
                    _decode_block, first, block, self._spec, self._compression, pure=False
                )
                pending.append((first, future))
                nxt += 1
            first, future = pending.popleft()
            yield from self._results(first, list(paths[first : first + BLOCK]), future)

    def _results(self, first: int, block: list[str], future: Any) -> Iterator[DecodeResult]:
        from distributed import KilledWorker

        try:
            done = future.result()
        except KilledWorker:
            # a file in the block kills its decoder: each on its own, to name it
            log.warning("a decode task of %d files killed its workers: one by one", len(block))
            for j, path in enumerate(block):
                one = self._client.submit(
                    _decode_block, first + j, [path], self._spec, self._compression, pure=False
                )
                try:
                    (got,) = one.result()
                except KilledWorker:
                    self.crashes += 1
                    yield DecodeResult(first + j, None, "the decoder crashed its process")
                    continue
                yield DecodeResult(*got)
            return
        for got in done:
            yield DecodeResult(*got)
