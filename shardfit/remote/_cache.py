"""A local, bounded cache of a remote store's shard files, shared by every process on the machine.

A remote store is read through a local mirror of it (``<cache_dir>/<url hash>-<pack id>/``):
its metadata and small arrays (labels, checksums, paths: a few bytes per sample) are fetched
when it is opened, and each shard file of images is fetched whole the first time a process
needs it, then read like a local store's (``mmap`` aside: see :func:`lease`). Fetching whole
shards, not samples, is what the peers do too (MosaicML Streaming, LitData): one request per
shard keeps the link busy, and samples are then read from local disk at local speed.

Across processes, files and locks on the cache folder are the whole protocol (nothing to start,
nothing to clean up after a crash):

- one download per shard at a time: the fetching process holds an exclusive ``flock`` on the
  shard's lock file; another process wanting the shard waits on it, then finds the file there;
- a download goes to ``NAME.tmp-PID-TID``, made as large as the shard can be before a byte is
  fetched (so that every process counting the cache's bytes counts it), then checked (size,
  index crc32c, every entry inside the file) and renamed into place: a shard file in the cache is
  always whole;
- ``cache_limit`` bounds the bytes of shard files (and downloads in flight) under
  ``cache_dir``: room is made under an exclusive ``flock`` of ``cache_dir/.lock`` by deleting
  the shards with the oldest mtime first. A hit sets it to now (least recently used goes
  first), unless the process that owns the epoch plan has keyed the file: it sets each cached
  shard's mtime to :data:`PLANNED` minus how far ahead the plan next reads it (samples), so
  the shard read furthest ahead goes first (Belady's rule: with a new shard order every epoch,
  LRU keeps the shards just read, which the next epoch wants no sooner than any other);
- a reader holds a shared ``flock`` on each shard file while it reads from it (a lease); a
  shard under a lease is never deleted. If nothing can be deleted, the fetch waits for a lease
  to end, and after :data:`WAIT_S` seconds raises :class:`~shardfit.CacheFullError`.

The bytes a reader then takes from a cached shard are checked as any local store's are (each
sample's crc32c against the store's checksums), so a damaged download cannot be trained on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from shardfit.errors import CacheFullError, DatasetFormatError, RemoteStoreError
from shardfit.remote._client import Location
from shardfit.store._format import ATTRS_KEY, shard_path
from shardfit.store._shardio import read_full_shard_index

__all__ = ["WAIT_S", "CacheStats", "ShardCache", "default_cache_dir", "remote_pack_id"]

log = logging.getLogger("shardfit")

#: mtime of a shard file the epoch plan reads next (in 2096): keyed files hold this minus
#: their distance ahead in samples (at most 1e8), above any real "now" (below 3.8e9, 2090),
#: so hits leave them as they are.
PLANNED = 4_000_000_000.0
#: Seconds after its fetch that an unkeyed shard is evicted only after every other one.
FRESH_S = 30.0
#: Seconds a fetch waits for room (every cached shard leased) before giving up.
WAIT_S = 60.0
_POLL_S = 0.05
#: Shard fetches in flight at once in one process, ahead of the reads (a few streams keep a
#: link busy; each holds at most one shard's bytes on disk beyond the cache's files).
PREFETCH_THREADS = 4
_SMALL_ARRAYS = ("labels", "checksums", "paths")


def default_cache_dir() -> str:
    """``$SHARDFIT_CACHE`` or ``$XDG_CACHE_HOME/shardfit`` (``~/.cache/shardfit``)."""
    env = os.environ.get("SHARDFIT_CACHE")
    if env:
        return os.path.abspath(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "shardfit")


def remote_pack_id(location: Location) -> str | None:
    """The ``pack_id`` of the store at ``location`` now (``None``: no pack id, or gone)."""
    try:
        doc = json.loads(location.get_bytes("zarr.json"))
    except (RemoteStoreError, ValueError):
        return None
    attrs = doc.get("attributes", {}).get(ATTRS_KEY, {}) if isinstance(doc, dict) else {}
    pid = attrs.get("pack_id") if isinstance(attrs, dict) else None
    return pid if isinstance(pid, str) else None


@dataclass
class CacheStats:
    """What one process's cache did: shard requests served from the cache (``hits``), shards
    fetched (``misses``) and their bytes."""

    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0

    @property
    def hit_rate(self) -> float:
        """Share of shard requests served without a fetch."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ShardCache:
    """The local mirror of the remote store at ``location``, in ``cache_dir``, holding at most
    ``limit`` bytes of shard files (``None``: no bound).

    Pickles to its location, folder and limit; threads and counters are per process.
    """

    def __init__(self, location: Location, cache_dir: str, limit: int | None) -> None:
        self.location = location
        self.cache_dir = os.path.abspath(cache_dir)
        self.limit = limit
        self.root = ""  # set by mirror()
        self._init_local()

    def _init_local(self) -> None:
        self.stats = CacheStats()
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: dict[tuple[str, int], Future[str]] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("location", "cache_dir", "limit", "root")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_local()

    # -- the mirror ----------------------------------------------------------------------------

    def mirror(self) -> str:
        """Fetch the store's metadata and small arrays into the local mirror (once per pack)
        and return the mirror's path, which reads as a local store whose shard files appear
        when :meth:`ensure` fetches them.

        Raises:
            RemoteStoreError: the store cannot be read (the object is named).
            DatasetFormatError: the root ``zarr.json`` is not a shardfit store's.
        """
        loc = self.location
        raw = loc.get_bytes("zarr.json")
        try:
            doc = json.loads(raw)
            attrs = doc["attributes"][ATTRS_KEY]
            splits = list(attrs["splits"])
        except (ValueError, KeyError, TypeError):
            raise DatasetFormatError(
                f"{loc.name('zarr.json')} is not a shardfit store's root metadata: pack a folder "
                "with tools/pack_images.py"
            ) from None
        pack = attrs.get("pack_id")
        tag = pack if isinstance(pack, str) else hashlib.sha256(raw).hexdigest()
        url_hash = hashlib.sha256(loc.url.encode()).hexdigest()[:16]
        root = os.path.join(self.cache_dir, f"{url_hash}-{tag[:32]}")
        self.root = root
        if os.path.exists(os.path.join(root, "zarr.json")):
            return root  # complete: the root's metadata is written last
        os.makedirs(root, exist_ok=True)
        names = []
        for split in splits:
            if not isinstance(split, str) or "/" in split or split.startswith("."):
                raise DatasetFormatError(f"{loc.name('zarr.json')} names a bad split {split!r}")
            names += [f"{split}/zarr.json", f"{split}/images/zarr.json"]
            for array in _SMALL_ARRAYS:
                names += [rel for rel, _ in loc.list(f"{split}/{array}")]
        for rel in names:
            if ".." in rel.split("/"):
                raise DatasetFormatError(f"{loc.name(rel)}: a path outside the store")
            _write_atomic(os.path.join(root, *rel.split("/")), loc.get_bytes(rel))
        _write_atomic(os.path.join(root, "zarr.json"), raw)
        return root

    # -- shards --------------------------------------------------------------------------------

    def ensure(self, split: str, shard: int, max_bytes: int, expect: int, shard_size: int) -> str:
        """Local path of shard ``shard`` of ``split``, fetched if it is not cached (at most
        ``max_bytes``, holding ``expect`` samples of a shard of ``shard_size``), and marked as
        just used.

        Raises:
            RemoteStoreError: the fetch failed after retries (the object named).
            DatasetFormatError: the object is not a whole shard (the object named).
            CacheFullError: no room could be made within :data:`WAIT_S` seconds.
        """
        path = shard_path(self.root, split, shard)
        if _touch(path):
            self.stats.hits += 1
            return path
        locks = os.path.join(self.root, ".locks")
        os.makedirs(locks, exist_ok=True)
        fd = os.open(os.path.join(locks, f"{split}-{shard}"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another process fetching it: wait for it
            if _touch(path):
                self.stats.hits += 1
                return path
            self._fetch(split, shard, path, max_bytes, expect, shard_size)
            return path
        finally:
            os.close(fd)

    def lease(self, split: str, shard: int, max_bytes: int, expect: int, shard_size: int) -> int:
        """A read-only descriptor of shard ``shard``'s cached file, holding a shared ``flock``
        that keeps it from being evicted until the descriptor is closed."""
        for _ in range(100):
            path = self.ensure(split, shard, max_bytes, expect, shard_size)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # evicted between the two: fetch again
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_nlink > 0:
                return fd
            os.close(fd)  # deleted while we waited for the lock
        raise CacheFullError(
            f"shard {shard} of {self.location.url} was evicted from {self.cache_dir} 100 times "
            "before it could be read: raise cache_limit"
        )

    def prefetch(self, split: str, shards: Iterable[tuple[int, int, int, int]]) -> None:
        """Start fetching ``(shard, max_bytes, expect, shard_size)`` in the background (at most
        :data:`PREFETCH_THREADS` at once in this process); errors are left to the reads."""
        with self._lock:
            if self._pid != os.getpid():
                self._init_local()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    PREFETCH_THREADS, thread_name_prefix="shardfit-fetch"
                )
            for shard, max_bytes, expect, size in shards:
                key = (split, shard)
                got = self._inflight.get(key)
                if got is not None and not got.done():
                    continue
                if os.path.exists(shard_path(self.root, split, shard)):
                    continue
                future = self._pool.submit(self.ensure, split, shard, max_bytes, expect, size)
                future.add_done_callback(lambda f: f.exception())  # not re-raised here
                self._inflight[key] = future

    def key_by_plan(self, split: str, distance: Any) -> None:
        """Key the cached shards of ``split`` for eviction by ``distance[k]``, how far ahead
        (samples) the plan next reads shard ``k``: the furthest is evicted first."""
        for k, d in enumerate(distance.tolist()):
            path = shard_path(self.root, split, k)
            with contextlib.suppress(FileNotFoundError):
                os.utime(path, (time.time(), PLANNED - min(float(d), 1e8)))

    def close(self) -> None:
        """Stop background fetches (one in progress finishes)."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._inflight.clear()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _fetch(
        self, split: str, shard: int, path: str, max_bytes: int, expect: int, shard_size: int
    ) -> None:
        rel = f"{split}/images/c/{shard}/0/0/0"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_native_id()}"
        fd = self._reserve(tmp, max_bytes)
        try:
            size = self.location.get_to_file(rel, fd)
            if size > max_bytes:
                raise DatasetFormatError(
                    f"{self.location.name(rel)} is {size} bytes, more than a shard of this store "
                    "can be: the store is damaged; re-pack the dataset"
                )
            os.ftruncate(fd, size)
            try:
                read_full_shard_index(tmp, shard_size, expect)
            except DatasetFormatError as err:
                raise DatasetFormatError(
                    f"{self.location.name(rel)} is not a whole shard ({str(err).split(': ')[-1]}"
                    "): the store is damaged; re-pack the dataset"
                ) from None
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        self.stats.misses += 1
        self.stats.bytes_fetched += size
        with contextlib.suppress(OSError):  # cross-process count of bytes fetched
            _append(os.path.join(self.root, ".fetched"), f"{size}\n")

    def _reserve(self, tmp: str, nbytes: int) -> int:
        """Create ``tmp`` at ``nbytes`` (sparse) once the cache has room for it."""
        if self.limit is not None and nbytes > self.limit:
            raise CacheFullError(
                f"cache_limit={self.limit} bytes cannot hold one shard of {self.location.url} "
                f"({nbytes} bytes): raise cache_limit"
            )
        os.makedirs(self.cache_dir, exist_ok=True)
        lock = os.open(os.path.join(self.cache_dir, ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + WAIT_S
        try:
            while True:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    if self.limit is None or self._make_room(nbytes):
                        fd = os.open(tmp, os.O_CREAT | os.O_RDWR | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                        os.ftruncate(fd, nbytes)
                        return fd
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
                if time.monotonic() > deadline:
                    raise CacheFullError(
                        f"{self.cache_dir} has no room for a shard of {self.location.url} "
                        f"({nbytes} bytes) within cache_limit={self.limit} bytes: every cached "
                        f"shard has been in use for {WAIT_S:.0f} s; raise cache_limit (it must "
                        "hold the shards that all readers on this machine read at once)"
                    )
                time.sleep(_POLL_S)
        finally:
            os.close(lock)

    def _make_room(self, nbytes: int) -> bool:
        """Delete least recently used, unleased shard files until ``nbytes`` more fit under the
        limit; called holding the cache's lock. ``False`` if they cannot be made to fit now."""
        assert self.limit is not None
        used = 0
        shards: list[tuple[bool, float, int, str]] = []
        fresh = time.time() - FRESH_S
        for path, st in _cached_files(self.cache_dir):
            used += st.st_size
            if ".tmp-" not in os.path.basename(path):
                # fetched moments ago and not yet keyed by a plan: about to be read, last to go
                just_fetched = fresh < st.st_mtime < PLANNED - 2e8
                shards.append((just_fetched, st.st_mtime, st.st_size, path))
        shards.sort()
        for _, _, size, path in shards:
            if used + nbytes <= self.limit:
                break
            if _evict(path):
                used -= size
        return used + nbytes <= self.limit


def fetched_bytes(root: str) -> int:
    """Bytes of shard files fetched into the mirror ``root`` so far, by every process."""
    try:
        with open(os.path.join(root, ".fetched")) as f:
            return sum(int(line) for line in f if line.strip())
    except FileNotFoundError:
        return 0


def _cached_files(cache_dir: str) -> list[tuple[str, os.stat_result]]:
    """Every shard file and download in flight under ``cache_dir`` (downloads left by a
    process that no longer runs are deleted)."""
    found = []
    for dirpath, _, files in os.walk(cache_dir):
        if os.sep + "images" + os.sep + "c" + os.sep not in dirpath + os.sep:
            continue
        for name in files:
            path = os.path.join(dirpath, name)
            if ".tmp-" in name and not _alive(name):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            with contextlib.suppress(FileNotFoundError):
                found.append((path, os.stat(path)))
    return found


def _alive(tmp_name: str) -> bool:
    try:
        pid = int(tmp_name.split(".tmp-")[1].split("-")[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _evict(path: str) -> bool:
    """Delete ``path`` unless a reader holds a lease on it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    try:
        os.unlink(path)
    finally:
        os.close(fd)  # a reader waiting for its lease finds the file unlinked and fetches again
    return True


def _touch(path: str) -> bool:
    """Mark ``path`` as just used, unless the plan keyed it; ``False`` if it is not there."""
    try:
        if os.stat(path).st_mtime < PLANNED - 2e8:  # not keyed by a plan
            os.utime(path)
    except FileNotFoundError:
        return False
    return True


def _write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_native_id()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _append(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
