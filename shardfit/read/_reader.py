"""Read shards: samples of one split into caller-owned arrays, without zarr-python per batch.

Each process opens what it needs on first use (keyed on its pid, so nothing opened in a parent
is used by a forked child), and reads each shard's index and checks it once. Two ways to read
the samples themselves (``io=``):

- ``"mmap"``: every shard file is memory-mapped once; uncompressed samples are copied straight
  from the mapping, compressed ones decoded from it. The fastest when the shards are in the page
  cache (no system call per sample), but each cold page is a page fault: under a memory limit
  smaller than the data, where every epoch is cold, throughput collapses.
- ``"pread"``: one file descriptor per shard; for each batch the kernel is first told which byte
  ranges are wanted (``POSIX_FADV_WILLNEED``, so it reads them from disk in parallel), then each
  sample is read with one ``preadv`` straight into the destination. Slower than ``"mmap"`` on
  cached data (a system call and a kernel copy per sample: ~1/3 of the speed here), about 1.6
  times as fast on cold data (measured under a memory limit of half the data).
- ``"auto"`` (the default) picks ``"pread"`` when the split's shard files are more than half of
  the memory this process may use for the page cache (RAM, or its cgroup's memory limit), since
  such data cannot stay cached from one epoch to the next; ``"mmap"`` otherwise.

Every read is checked (``verify=``, format 3 on): each sample's chunk ends with its crc32c,
which must equal the store's ``checksums`` entry for that sample (a few bytes compared on every
read: a shard swapped, copied or replaced, or a store re-packed under a running job, is caught
at once), and the chunk's bytes must match that crc32c (once per shard sample per process by
default, or on every read). The labels, the checksums and the pack id are read once per process
and pinned: a process that finds the store replaced by another pack stops.

A reader pickles to its path and a few numbers.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from shardfit.errors import ChecksumError, DatasetFormatError, InvalidOptionError, StoreChangedError
from shardfit.read.options import VERIFY_CHOICES
from shardfit.read.options import VerifyChoice as Verify
from shardfit.remote._cache import ShardCache, default_cache_dir, remote_pack_id
from shardfit.remote._client import Location, is_remote
from shardfit.store._format import ATTRS_KEY, read_info, shard_path
from shardfit.store._shardio import (
    CHECKSUM_BYTES,
    ChunkEncoder,
    crc32c,
    crc32c_extend,
    read_full_shard_index,
    read_full_shard_index_fd,
    shard_index_of_bytes,
)
from shardfit.store._validate import check_array, load_json, open_regular, regular_file_size

__all__ = ["PieceChecksums", "ShardGetter", "ShardView", "SplitReader", "open_split"]

#: One shard's bytes as read: the buffer holding the file (a mapping, or the whole file read into
#: memory), its checked index of ``(offset, nbytes)`` per sample, and, when the samples lie
#: densely in the packer's layout, an array view ``(n, H, W, 3)`` over them.
ShardView = tuple[Any, npt.NDArray[np.uint64], npt.NDArray[Any] | None]
#: Where a read takes shard ``k``'s bytes from.
ShardGetter = Callable[[int], ShardView]

IoMode = Literal["auto", "mmap", "pread"]
_IO_MODES: tuple[str, ...] = ("auto", "mmap", "pread")
log = logging.getLogger("shardfit")
#: cgroup limits at or above this are "no limit" (v1 writes 2**63 rounded down to a page)
_NO_LIMIT = 1 << 60
_HAVE_FADVISE = hasattr(os, "posix_fadvise")
#: Linux's MADV_POPULATE_READ (5.14+): fault a mapping's pages in, in one call (Python's mmap
#: module names it from 3.13 only).
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_HAVE_PREADV = hasattr(os, "preadv")


class _ShardFile:
    """One shard file opened for ``pread`` by this process: its descriptor, closed when the
    object is dropped (so a thread still reading through it keeps it open), and its index."""

    __slots__ = ("fd", "offsets", "path", "sizes")

    def __init__(self, path: str, offsets: list[int], sizes: list[int], fd: int = -1) -> None:
        self.fd = -1
        self.path = path
        self.offsets = offsets  # byte offset of each chunk, in the file
        self.sizes = sizes  # stored bytes of each chunk
        self.fd = open_regular(path) if fd < 0 else fd

    def __del__(self, _close: Any = os.close) -> None:
        # os.close bound at definition: at interpreter exit the os module may be gone already
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                _close(self.fd)
            self.fd = -1


@dataclass
class _Open:
    """What one process has opened: shard mappings (and which file each maps, to notice it
    shrinking under its mapping) or files with their decoded indexes, the pinned labels and
    checksums, which samples were verified, the codec, and each thread's staging buffer
    (``pread`` of converted samples)."""

    pid: int
    shards: dict[int, ShardView] = field(default_factory=dict)
    #: shard -> (device, inode, bytes) of the file mapped
    mapped: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    files: dict[int, _ShardFile] = field(default_factory=dict)
    labels: npt.NDArray[np.int32] | None = None
    checksums: npt.NDArray[np.uint32] | None = None
    verified: dict[int, npt.NDArray[np.bool_]] = field(default_factory=dict)
    #: remote stores: each shard's checked index (a pack's shards never change, wherever
    #: the cache fetched them from)
    indexes: dict[int, npt.NDArray[np.uint64]] = field(default_factory=dict)
    #: remote stores: descriptors leasing the cached files this process maps
    leases: list[int] = field(default_factory=list)
    map_lock: threading.Lock = field(default_factory=threading.Lock)
    codec: Any = None
    local: threading.local = field(default_factory=threading.local)


def open_split(
    path: str | os.PathLike[str],
    split: str = "train",
    *,
    io: IoMode = "auto",
    verify: Verify = "once",
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_limit: int | None = None,
) -> SplitReader:
    """Open one split of a store for random access to its samples, without Keras.

    ``reader.read(indices)`` gives images as float32 in [0, 1], ``reader.labels()`` every
    label, and ``shardfit.epoch_order(...)`` the order a ``Sequence`` visits them; see
    :class:`SplitReader`.
    """
    return SplitReader(
        path,
        split,
        io=io,
        verify=verify,
        storage_options=storage_options,
        cache_dir=cache_dir,
        cache_limit=cache_limit,
    )


class SplitReader:
    """Random access to the images and labels of one split of a shardfit store.

    Args:
        path: the store: a local path, or an object store URL (``s3://bucket/data.zarr``,
            ``gs://...``, ``az://...``) read through a local cache of whole shard files.
        split: ``"train"`` or ``"val"``.
        io: how samples are read: ``"mmap"`` (fastest when the shards are page-cached),
            ``"pread"`` (fastest when they are not: data larger than the memory available for
            the page cache), or ``"auto"``: ``"pread"`` when the split's shard files are more
            than half of RAM or of this process's cgroup memory limit, else ``"mmap"``.
        verify: when each sample's bytes are checked against their crc32c: ``"once"`` (the
            default: the first time this process reads the sample), ``"always"`` (on every
            read) or ``"off"``. Except with ``"off"``, every read also checks that the chunk is
            the one packed at that position of this pack (its crc32c against the store's
            ``checksums``). Stores of format 1 and 2 have no checksums: nothing is verified.
        storage_options: for an object store URL: obstore's options, or the s3fs names
            (``key``, ``secret``, ``endpoint_url``, ``anon``, ``client_kwargs``) as xarray and
            zarr take them. Endpoint and credentials otherwise come from the environment
            (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
            ``AWS_DEFAULT_REGION``, ...).
        cache_dir: where an object store's shards are cached (shared by every process on the
            machine); default ``$SHARDFIT_CACHE`` or ``~/.cache/shardfit``.
        cache_limit: bytes of shard files the cache may hold (least recently used ones are
            deleted to make room); ``None``: no bound. It must hold the shards read at once
            by every reader on the machine (about ``shuffle_window + 5`` shards per reader).

    Attributes:
        io_mode: ``"mmap"`` or ``"pread"``: the way this reader reads, ``io`` resolved once at
            construction (a pickled reader keeps it).

    Raises:
        InvalidOptionError: ``io`` or ``verify`` is not one of the above.
        DatasetFormatError, IncompleteDatasetError: as :func:`shardfit.read_info`, or when the
            split does not exist.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str = "train",
        *,
        io: IoMode = "auto",
        verify: Verify = "once",
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_limit: int | None = None,
    ) -> None:
        if not isinstance(io, str) or io not in _IO_MODES:
            raise InvalidOptionError(
                f"io must be one of {', '.join(repr(m) for m in _IO_MODES)}. Received: {io!r}"
            )
        if not isinstance(verify, str) or verify not in VERIFY_CHOICES:
            raise InvalidOptionError(
                f"verify must be one of {', '.join(repr(m) for m in VERIFY_CHOICES)}. "
                f"Received: {verify!r}"
            )
        #: the object store URL this reader reads (``None``: a local store)
        self.url: str | None = None
        self._cache: ShardCache | None = None
        if is_remote(path):
            if cache_limit is not None and (
                not isinstance(cache_limit, int) or isinstance(cache_limit, bool) or cache_limit < 1
            ):
                raise InvalidOptionError(
                    f"cache_limit must be a positive int (bytes) or None. Received: {cache_limit!r}"
                )
            location = Location.of(str(path), storage_options)
            folder = default_cache_dir() if cache_dir is None else os.fspath(cache_dir)
            self._cache = ShardCache(location, folder, cache_limit)
            self.url = location.url
            path = self._cache.mirror()
        elif storage_options is not None or cache_limit is not None:
            raise InvalidOptionError(
                "storage_options and cache_limit apply to an object store URL (s3://, gs://, "
                f"az://), not to the local path {os.fspath(path)!r}"
            )
        info = read_info(path)
        if split not in info.splits:
            raise InvalidOptionError(
                f"split must be one of {', '.join(info.splits)} for {info.path}. "
                f"Received: {split!r}"
            )
        s = info.splits[split]
        self.path = info.path
        self.split = split
        self.count = s.count
        self.shard_size = s.shard_size
        self.num_shards = s.num_shards
        self.class_names = info.class_names
        self.counts_per_class = s.counts_per_class
        self.image_shape = (info.image_size[0], info.image_size[1], 3)
        self.stored_dtype = np.dtype(info.dtype)
        self.compression = info.compression
        #: the pack this reader is pinned to (``None``: a store of format 1 or 2)
        self.pack_id = info.pack_id
        self.checksummed = s.checksummed
        self.verify: Verify = verify if s.checksummed else "off"
        if verify != "off" and not s.checksummed:
            log.warning(
                "%s has no checksums (format %s): its reads cannot be verified; re-pack it with "
                "this shardfit to have them checked",
                info.path,
                info.attrs.get("format_version"),
            )
        self._chunk_bytes = int(np.prod(self.image_shape)) * self.stored_dtype.itemsize
        self._trailer = CHECKSUM_BYTES if s.checksummed else 0
        #: bytes from one uncompressed sample to the next in a shard file
        self._stride = self._chunk_bytes + self._trailer
        if self._cache is not None and self._cache.limit is not None:
            # a mapped shard stays leased (it cannot be evicted) until the process ends: only
            # a cache that holds the whole split can map it
            if io == "mmap" and self._cache.limit < self.data_bytes():
                raise InvalidOptionError(
                    f"io='mmap' keeps every shard of {self.url} it maps in the cache, which "
                    f"cache_limit={self._cache.limit} cannot hold ({self.data_bytes()} bytes): "
                    "use io='auto' or 'pread', or raise cache_limit. Received: io='mmap'"
                )
            if io == "auto" and self._cache.limit < self.data_bytes():
                io = "pread"
        self.io_mode: Literal["mmap", "pread"] = (
            _choose_io(self.data_bytes(), memory_bytes()) if io == "auto" else io
        )
        self._open: _Open | None = None
        self._lock = threading.Lock()

    def data_bytes(self) -> int:
        """Bytes of the split's shard files (from their sizes; estimated if they cannot be
        listed: errors about missing files are for the first read to report)."""
        if self._cache is not None:
            return sum(self.max_shard_bytes(k) for k in range(self.num_shards))
        try:
            return sum(
                os.stat(shard_path(self.path, self.split, k)).st_size
                for k in range(self.num_shards)
            )
        except OSError:
            return self.count * self._chunk_bytes

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = None  # handles never travel to another process
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _handles(self) -> _Open:
        opened = self._open
        if opened is not None and opened.pid == os.getpid():
            return opened
        with self._lock:
            if self._open is None or self._open.pid != os.getpid():
                self._open = _Open(pid=os.getpid())
                if self.compression != "none":
                    self._open.codec = ChunkEncoder(self.compression).codec
            return self._open

    def _check_chunk_sizes(self, path: str, sizes: npt.NDArray[np.int64]) -> None:
        """Every chunk of an uncompressed shard must hold exactly one image (and its checksum);
        a compressed one at least a byte and its checksum, and not much more than the image
        (a compressor's frame of incompressible data adds a little)."""
        if self.compression == "none":
            bad = bool(np.any(sizes != self._stride))
        else:
            bad = bool(np.any(sizes <= self._trailer)) or bool(
                np.any(sizes > self._chunk_bytes + self._chunk_bytes // 64 + 4096 + self._trailer)
            )
        if bad:
            raise DatasetFormatError(
                f"shard file {path} has chunks of the wrong size for "
                f"{self.image_shape} {self.stored_dtype}: re-pack the dataset"
            )

    def _shard(self, k: int) -> ShardView:
        opened = self._handles()
        got = opened.shards.get(k)
        if got is not None:
            return got
        if self._cache is None:
            path, index = self._index(k)
            fd = open_regular(path)
        else:  # one lease, for the index and the mapping alike
            path, fd = shard_path(self.path, self.split, k), self.open_shard(k)
        try:
            if self._cache is not None:
                index = self._remote_index(k, fd)
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except BaseException:
            os.close(fd)
            raise
        # Map every page of the shard now: one call instead of a fault per 64 KB later, paid
        # again by every process that reads the shard (worker processes each map it). Only a
        # hint: kernels before 5.14 refuse it.
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(_MADV_POPULATE_READ)
        dense = self._dense(path, mm, index)
        st = os.fstat(fd)
        if self._cache is None:
            os.close(fd)
        else:  # the lease: the cached file is not evicted while this process maps it
            opened.leases.append(fd)
        with opened.map_lock:
            first = opened.shards.get(k)
            if first is None:  # else another thread mapped it meanwhile: use the first only
                # a file cut short under its mapping kills the process with SIGBUS on the next
                # read of a lost page, so each batch first checks the file's size
                opened.mapped[k] = (st.st_dev, st.st_ino, len(mm))
                first = opened.shards[k] = (mm, index, dense)
        return first

    def _dense(self, path: str, buf: Any, index: npt.NDArray[np.uint64]) -> npt.NDArray[Any] | None:
        """An array view over all samples of a shard's bytes ``buf`` when they lie densely from
        its start (the packer's layout), else ``None``; chunk sizes checked."""
        expect = len(index)
        offsets = index[:, 0].astype(np.int64)
        sizes = index[:, 1].astype(np.int64)
        self._check_chunk_sizes(path, sizes)
        if self.compression == "none" and np.array_equal(
            offsets, np.arange(expect, dtype=np.int64) * self._stride
        ):
            # sample j at j * stride: each image contiguous, its checksum between images
            item = self.stored_dtype.itemsize
            _, w, c = self.image_shape
            return np.ndarray(
                (expect, *self.image_shape),
                self.stored_dtype,
                buffer=buf,
                strides=(self._stride, w * c * item, c * item, item),
            )
        return None

    def piece_checker(self, k: int, buffer: Any) -> PieceChecksums | None:
        """What verifies shard ``k`` while it is being read into ``buffer`` piece by piece
        (``io="stream"``), or ``None`` if nothing needs verifying there: ``verify="off"``, a
        compressed store (its chunk boundaries are known only from the index at the end), or
        every sample already verified in this process with ``verify="once"``."""
        if self.verify == "off" or self.compression != "none":
            return None
        expect = self._samples_in(k)
        if self.verify == "once" and bool(self._verified(k)[:expect].all()):
            return None
        return PieceChecksums(buffer, self._stride, self._chunk_bytes, expect)

    def shard_of_bytes(
        self, k: int, data: memoryview, checked: PieceChecksums | None = None
    ) -> ShardView:
        """Shard ``k`` from the whole content of its file, read into memory by the caller
        (``shardfit.read._stage``, in its reading threads); its index is checked as when read
        from the file, and its samples verified here (as ``verify`` says; ``checked``: with the
        checksums :meth:`piece_checker` computed as the bytes arrived), so that reads from the
        view returned need no checking.

        Raises:
            DatasetFormatError: the content is truncated or corrupt (the file is named).
        """
        path = self.shard_name(k)
        expect = self._samples_in(k)
        index = shard_index_of_bytes(path, data, self.shard_size, expect)[:expect]
        dense = self._dense(path, data, index)
        if self.verify == "off":
            return data, index, dense
        if dense is not None and self._all_intact(k, data, len(index), checked):
            return data, index, dense
        # one of them fails (or a layout of another writer): sample by sample, to name it
        sums = checked.crcs if checked is not None and dense is not None else None
        for j, (off, n) in enumerate(index.tolist()):
            n -= self._trailer
            stored = int.from_bytes(data[off + n : off + n + self._trailer], "little")
            # with the checker's checksums where its assumed layout holds
            computed = None if sums is None else int(sums[j])
            payload = np.frombuffer(data, np.uint8, n, off)
            self._check_sample(k * self.shard_size + j, payload, stored, computed=computed)
        return data, index, dense

    def _shard_file(self, k: int) -> _ShardFile:
        """Shard ``k`` opened for ``pread`` in this process (index read and checked once)."""
        opened = self._handles()
        got = opened.files.get(k)
        if got is not None:
            return got
        path, index = self._index(k)
        sizes = index[:, 1].astype(np.int64)
        self._check_chunk_sizes(path, sizes)
        new = _ShardFile(path, index[:, 0].astype(np.int64).tolist(), sizes.tolist())
        # two threads may open the same shard at once: both use the first one stored, and the
        # other descriptor is closed as soon as it is dropped
        return opened.files.setdefault(k, new)

    def shard_files(self) -> list[str]:
        """Path of every shard file of the split, in shard order."""
        return [shard_path(self.path, self.split, k) for k in range(self.num_shards)]

    def sample_offsets(self, shard: int) -> npt.NDArray[np.int64]:
        """Byte offset of each sample of shard ``shard`` in its file (from the shard's index,
        read and checked).

        Raises:
            DatasetFormatError: the shard file is missing, truncated or corrupt (named).
        """
        return self._index(shard)[1][:, 0].astype(np.int64)

    def max_shard_bytes(self, k: int) -> int:
        """The largest shard ``k``'s file can be: its images (at most a compressor's frame of
        each, a little larger than the image when it does not compress), their checksums and
        the index. Exact when uncompressed."""
        expect = self._samples_in(k)
        chunk = self._stride
        if self.compression != "none":
            chunk = self._chunk_bytes + self._chunk_bytes // 64 + 4096 + self._trailer
        return expect * chunk + 16 * self.shard_size + 4

    def shard_name(self, k: int) -> str:
        """What names shard ``k``'s file in messages: its path, or its object's URL."""
        if self.url is not None:
            return f"{self.url}/{self.split}/images/c/{k}/0/0/0"
        return shard_path(self.path, self.split, k)

    def _samples_in(self, k: int) -> int:
        """Samples shard ``k`` holds (the last shard may hold fewer)."""
        return min(self.shard_size, self.count - k * self.shard_size)

    def open_shard(self, k: int) -> int:
        """A read-only descriptor of shard ``k``'s file; for an object store, of its copy in
        the cache (fetched if need be), leased until the descriptor is closed."""
        if self._cache is None:
            return open_regular(shard_path(self.path, self.split, k))
        expect = self._samples_in(k)
        return self._cache.lease(self.split, k, self.max_shard_bytes(k), expect, self.shard_size)

    def key_cache(self, distance: npt.NDArray[np.float64]) -> None:
        """For an object store: tell the cache how far ahead (samples) the plan next reads
        each shard, so that it evicts the one read furthest ahead first."""
        if self._cache is not None:
            self._cache.key_by_plan(self.split, distance)

    def close(self) -> None:
        """Stop an object store's background fetches (nothing to do for a local store)."""
        if self._cache is not None:
            self._cache.close()

    def cache_stats(self) -> dict[str, float] | None:
        """For an object store: this process's shard requests served from the cache
        (``hits``), fetched (``misses``), ``hit_rate``, ``bytes_fetched``; and the bytes every
        process fetched into this store's cache folder (``bytes_fetched_all``). ``None`` for a
        local store."""
        if self._cache is None:
            return None
        from shardfit.remote._cache import fetched_bytes

        st = self._cache.stats
        return {
            "hits": st.hits,
            "misses": st.misses,
            "hit_rate": st.hit_rate,
            "bytes_fetched": st.bytes_fetched,
            "bytes_fetched_all": fetched_bytes(self._cache.root),
        }

    def _remote_index(self, k: int, fd: int | None = None) -> npt.NDArray[np.uint64]:
        """Shard ``k``'s checked index, read once per process from its cached copy."""
        opened = self._handles()
        got = opened.indexes.get(k)
        if got is not None:
            return got
        expect = self._samples_in(k)
        own = fd is None
        fd = self.open_shard(k) if fd is None else fd
        try:
            index = read_full_shard_index_fd(fd, self.shard_name(k), self.shard_size, expect)
        finally:
            if own:
                os.close(fd)
        index = index[:expect]
        self._check_chunk_sizes(self.shard_name(k), index[:, 1].astype(np.int64))
        return opened.indexes.setdefault(k, index)

    def _index(self, k: int) -> tuple[str, npt.NDArray[np.uint64]]:
        """Shard ``k``'s path and the index entries of the samples it holds (read, checked)."""
        if self._cache is not None:
            return shard_path(self.path, self.split, k), self._remote_index(k)
        path = shard_path(self.path, self.split, k)
        expect = self._samples_in(k)
        size = regular_file_size(path)
        if size > self.max_shard_bytes(k):
            raise DatasetFormatError(
                f"shard file {path} is {size} bytes, more than a shard of this store can be: "
                "the store is damaged; re-pack the dataset"
            )
        return path, read_full_shard_index(path, self.shard_size, expect)[:expect]

    def read(self, indices: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Samples ``indices`` as a new float32 array ``(n, H, W, 3)`` in [0, 1].

        Raises:
            IndexError, DatasetFormatError: as :meth:`read_into`.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((idx.size, *self.image_shape), np.float32)
        self.read_into(idx, out)
        return out

    def paths(self) -> list[str]:
        """The source file of every sample, relative to the store's ``source_root`` attribute
        (read with zarr on each call: for tracing samples back, not for the training loop)."""
        import zarr

        array = zarr.open_array(os.path.join(self.path, self.split, "paths"), mode="r")
        stored = np.asarray(array[:])
        if stored.ndim == 1:  # format version 1: zarr's string type
            return [str(p) for p in stored]
        return [os.fsdecode(bytes(row).rstrip(b"\0")) for row in stored]

    def labels(self) -> npt.NDArray[np.int32]:
        """All labels of the split (read once per process, checked, and pinned to the pack
        this reader opened).

        Raises:
            DatasetFormatError: the labels are damaged (the file named).
            StoreChangedError: the store at this path is now another pack.
        """
        return self._pinned()[0]

    def _pinned(self) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.uint32] | None]:
        """This process's copy of the labels and checksums, read once, then the pack id read
        again: what this process serves is the pack the reader was opened on, or an error."""
        opened = self._handles()
        if opened.labels is not None:
            return opened.labels, opened.checksums
        with self._lock:
            if opened.labels is None:
                labels = _read_vector(self.path, self.split, "labels", self.count, "<i4")
                _check_labels(self.path, self.split, labels, self.counts_per_class)
                sums = None
                if self.checksummed:
                    sums = _read_vector(self.path, self.split, "checksums", self.count, "<u4")
                self._check_same_pack()
                opened.checksums = None if sums is None else sums.astype(np.uint32)
                opened.labels = labels.astype(np.int32)
            return opened.labels, opened.checksums

    def _check_same_pack(self) -> None:
        """Raise if the store's pack id is no longer the one this reader was opened on."""
        if self.pack_id is None:
            return
        if self._cache is not None:
            now = remote_pack_id(self._cache.location)
        else:
            now = _pack_id_now(self.path)
        if now != self.pack_id:
            what = "removed" if now is None else f"replaced by another pack (pack id {now})"
            raise StoreChangedError(
                f"{self.url or self.path} was {what} while it was being read (pack id "
                f"{self.pack_id} when opened): open it again to read the new store"
            )

    def _verified(self, k: int) -> npt.NDArray[np.bool_]:
        opened = self._handles()
        seen = opened.verified.get(k)
        if seen is None:
            seen = opened.verified.setdefault(k, np.zeros(self.shard_size, np.bool_))
        return seen

    def _all_intact(self, k: int, data: Any, n: int, checked: PieceChecksums | None) -> bool:
        """Shard ``k``'s ``n`` images, laid out densely in ``data``, checked at once: each ends
        with the checksum the store records for it, and their bytes match it (``checked``, or
        verified before in this process with ``verify="once"``). ``False`` when any of this
        does not hold, or cannot be told this way."""
        seen = self._verified(k)[:n]
        if checked is None and (self.verify == "always" or not bool(seen.all())):
            return False
        ends: npt.NDArray[Any] = np.ndarray(
            (n,), "<u4", buffer=data, offset=self._chunk_bytes, strides=(self._stride,)
        )
        sums = self._pinned()[1]
        base = k * self.shard_size
        if sums is not None and not np.array_equal(ends, sums[base : base + n]):
            return False
        if checked is not None:
            if not np.array_equal(ends, checked.crcs):
                return False
            seen[:] = True
        return True

    def _check_sample(
        self, i: int, payload: Any, trailer: int, *, computed: int | None = None
    ) -> None:
        """Check sample ``i`` read as ``payload`` (its stored bytes) and ``trailer`` (the crc32c
        its chunk ends with): the chunk is sample ``i``'s of this pack, and, if not done before
        in this process (or always, with ``verify="always"``), its bytes are intact: their
        crc32c is ``computed`` if given (then always checked), else computed from ``payload``
        (``None``: only where the bytes were verified before)."""
        sums = self._pinned()[1]
        k, j = divmod(i, self.shard_size)
        if sums is not None and trailer != int(sums[i]):
            self._check_same_pack()
            raise ChecksumError(
                f"shard file {self.shard_name(k)} does not hold sample {i} of "
                f"this store at position {j} (its checksum {trailer:#010x}, the store's "
                f"{int(sums[i]):#010x}): a shard file was swapped, copied or replaced; re-pack "
                "the dataset"
            )
        seen = self._verified(k)
        if computed is not None or self.verify == "always" or not seen[j]:
            if computed is None:
                computed = crc32c(payload)
            if computed != trailer:
                raise ChecksumError(
                    f"shard file {self.shard_name(k)} is corrupt: sample {i} "
                    f"(position {j}) fails its crc32c; re-pack the dataset"
                )
            seen[j] = True

    def _check_mapped(self, k: int) -> None:
        """Raise, rather than die of SIGBUS on the next copy, if shard ``k``'s file is now
        shorter than its mapping (cut short in place under a running reader)."""
        got = self._handles().mapped.get(k)
        if got is None:
            return
        dev, ino, size = got
        try:
            st = os.stat(shard_path(self.path, self.split, k))
        except OSError:  # removed or replaced: the mapping keeps the old file whole
            return
        now = st.st_size
        if st.st_ino == ino and st.st_dev == dev and now < size:
            raise DatasetFormatError(
                f"shard file {shard_path(self.path, self.split, k)} shrank from {size} to {now} "
                "bytes while it was being read: a store must not be changed in place while a job "
                "reads it (pack to a new path and switch over); re-pack the dataset"
            )

    def read_into(
        self,
        indices: npt.NDArray[np.integer[Any]],
        out: npt.NDArray[Any],
        *,
        shards: ShardGetter | None = None,
    ) -> None:
        """Copy samples ``indices`` into ``out[:len(indices)]``, shape ``(n, H, W, 3)``.

        ``out`` may be float32 (uint8 stores are converted as ``pixel / 255``) or the stored dtype.
        Safe to call from several threads at once, each with its own ``out``. ``shards``, if
        given, supplies the bytes of every shard the samples are in (whole shards read ahead
        into memory, each made by :meth:`shard_of_bytes`, which verified them), instead of
        reading the files.

        Raises:
            IndexError: an index is outside ``[0, count)``.
            DatasetFormatError: a shard file is missing, truncated or corrupt (named).
        """
        if shards is not None:
            self._read_from(indices, out, shards)
        elif self.io_mode == "pread":
            self._read_pread(indices, out)
        else:
            self._read_from(indices, out, self._shard, mapped=True)

    def _read_from(
        self,
        indices: npt.NDArray[np.integer[Any]],
        out: npt.NDArray[Any],
        shards: ShardGetter,
        *,
        mapped: bool = False,
    ) -> None:
        """Samples copied (uncompressed) or decoded from shard bytes in memory (``mapped``: this
        reader's own mappings, whose files' sizes are checked once per batch)."""
        convert = out.dtype != self.stored_dtype
        checking = mapped and self.verify != "off"  # other shard views were checked when made
        sized: set[int] = set()
        for b, i in enumerate(np.asarray(indices, dtype=np.int64).tolist()):
            if not 0 <= i < self.count:
                raise IndexError(f"sample {i} out of range for {self.count} samples")
            k, j = divmod(i, self.shard_size)
            mm, index, dense = shards(k)
            if mapped and k not in sized:
                self._check_mapped(k)
                sized.add(k)
            off, n = int(index[j, 0]), int(index[j, 1]) - self._trailer
            stored = int.from_bytes(mm[off + n : off + n + 4], "little") if checking else 0
            check_copy = checking
            if dense is not None:
                src: npt.NDArray[Any] = dense[j]
            elif self.compression == "none":
                src = np.frombuffer(
                    mm, self.stored_dtype, count=n // self.stored_dtype.itemsize, offset=off
                ).reshape(self.image_shape)
            else:  # checked before decoding: a decoder is not for damaged frames
                if checking:
                    self._check_sample(i, np.frombuffer(mm, np.uint8, n, off), stored)
                raw = self._handles().codec.decode(mm[off : off + n])
                src = np.frombuffer(raw, self.stored_dtype).reshape(self.image_shape)
                check_copy = False
            dst = out[b]
            if convert:
                np.divide(src, 255, out=dst, dtype=np.float32)
            else:
                dst[...] = src
            if check_copy:
                # the copy just made is in the CPU's cache: checking it rather than the
                # mapping reads the image from memory once, not twice (measured, epoch 0 of a
                # warm store: 5,400 img/s checking the mapping, 9,100 checking the copy,
                # 11,700 unchecked)
                done = dst if not convert and dst.flags.c_contiguous else src
                self._check_sample(i, done, stored)

    def will_need(self, indices: npt.NDArray[np.integer[Any]]) -> None:
        """Tell the kernel that samples ``indices`` will be read soon (reading them from disk
        starts now, in the background). Only with ``io_mode == "pread"``: mapped shards are
        read ahead by the kernel's own fault-around. For an object store: start fetching the
        shards they are in that the cache lacks."""
        if self._cache is not None:
            self.prefetch(np.unique(np.asarray(indices, dtype=np.int64) // self.shard_size))
        elif self.io_mode == "pread":
            _will_need(self._pread_plan(indices))

    def prefetch(self, shards: npt.ArrayLike) -> None:
        """For an object store: start fetching ``shards`` into the cache in the background
        (nothing for a local store)."""
        if self._cache is None:
            return
        ks = [int(k) for k in np.asarray(shards, dtype=np.int64).reshape(-1)]
        self._cache.prefetch(
            self.split,
            [
                (
                    k,
                    self.max_shard_bytes(k),
                    self._samples_in(k),
                    self.shard_size,
                )
                for k in ks
                if 0 <= k < self.num_shards
            ],
        )

    def _pread_plan(
        self,
        indices: npt.NDArray[np.integer[Any]],
        files: Callable[[int], _ShardFile] | None = None,
    ) -> list[tuple[_ShardFile, int, int]]:
        """(file, byte offset, bytes with the checksum) of each sample."""
        plan = []
        get = self._shard_file if files is None else files
        for i in np.asarray(indices, dtype=np.int64).tolist():
            if not 0 <= i < self.count:
                raise IndexError(f"sample {i} out of range for {self.count} samples")
            k, j = divmod(i, self.shard_size)
            f = get(k)
            plan.append((f, f.offsets[j], f.sizes[j]))
        return plan

    def _read_pread(self, indices: npt.NDArray[np.integer[Any]], out: npt.NDArray[Any]) -> None:
        if self._cache is None:
            self._read_pread_from(indices, out, None)
            return
        # An object store's cached shards are leased one at a time, for as long as their
        # samples of this batch take to read: between reads the cache may evict them, and a
        # batch needs room for one shard per reading thread, not for every shard it spans.
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.count):
            bad = int(idx[(idx < 0) | (idx >= self.count)][0])
            raise IndexError(f"sample {bad} out of range for {self.count} samples")
        shards = idx // self.shard_size
        for k in np.unique(shards).tolist():
            rows = np.flatnonzero(shards == k)
            fd = self.open_shard(k)
            f: _ShardFile | None = None
            try:
                index = self._remote_index(k, fd)
                f = _ShardFile(
                    self.shard_name(k),
                    index[:, 0].astype(np.int64).tolist(),
                    index[:, 1].astype(np.int64).tolist(),
                    fd,
                )
                self._read_pread_from(idx[rows], out, _same_file(f), rows.tolist())
            finally:
                if f is not None:
                    f.fd = -1  # the lease's descriptor is closed here, not when f is dropped
                os.close(fd)

    def _read_pread_from(
        self,
        indices: npt.NDArray[np.integer[Any]],
        out: npt.NDArray[Any],
        files: Callable[[int], _ShardFile] | None,
        rows: list[int] | None = None,
    ) -> None:
        """Samples ``indices`` into ``out`` (sample ``b`` into row ``b``, or ``rows[b]``)."""
        samples = np.asarray(indices, dtype=np.int64).tolist()
        plan = self._pread_plan(indices, files)
        # all of the batch's reads queued at once: the disk serves them in parallel, while the
        # preads below each wait for one sample in turn (measured on cold data: +40%; on cached
        # data it costs ~20%, but then io="mmap" is the better choice anyway)
        _will_need(plan)
        convert = out.dtype != self.stored_dtype
        compressed = self.compression != "none"
        check = self.verify != "off"
        trailer = self._trailer
        tail = bytearray(4)
        for b, (f, off, n) in enumerate(plan):
            row = b if rows is None else rows[b]
            if compressed:
                data = _pread_bytes(f, off, n)
                if check:
                    self._check_sample(
                        samples[b],
                        data[: n - trailer],
                        int.from_bytes(data[n - trailer :], "little"),
                    )
                raw = self._handles().codec.decode(data[: n - trailer])
                src: npt.NDArray[Any] = np.frombuffer(raw, self.stored_dtype).reshape(
                    self.image_shape
                )
            else:
                dst = out[row]
                direct = (
                    not convert
                    and dst.shape == self.image_shape
                    and dst.flags.c_contiguous
                    and dst.flags.writeable
                )
                src = dst if direct else self._stage()
                # the image and its checksum in one system call
                views = [memoryview(src).cast("B")]  # type: ignore[arg-type]
                if trailer:
                    views.append(memoryview(tail))
                _preadv_exact(f, views, off)
                if check:
                    self._check_sample(samples[b], src, int.from_bytes(tail, "little"))
                if direct:
                    continue
            if convert:
                np.divide(src, 255, out=out[row], dtype=np.float32)
            else:
                out[row] = src

    def _stage(self) -> npt.NDArray[Any]:
        """This thread's buffer for one stored image, reused: converted samples land here first.

        Page-aligned (anonymous mapping), so that converting from it into an aligned batch
        buffer does not suffer 4K aliasing (docs/design.md, "Measured machine facts").
        """
        local = self._handles().local
        stage: npt.NDArray[Any] | None = getattr(local, "stage", None)
        if stage is None:
            buf = mmap.mmap(-1, self._chunk_bytes)
            stage = np.frombuffer(buf, self.stored_dtype).reshape(self.image_shape)
            local.stage = stage
        return stage


def _same_file(f: _ShardFile) -> Callable[[int], _ShardFile]:
    """A getter giving ``f`` for every shard: the one shard leased for a read."""

    def get(_k: int) -> _ShardFile:
        return f

    return get


def _will_need(plan: list[tuple[_ShardFile, int, int]]) -> None:
    if not _HAVE_FADVISE:
        return
    with contextlib.suppress(OSError):  # only a hint: a refusal must not fail the read
        for f, off, n in plan:
            os.posix_fadvise(f.fd, off, n, os.POSIX_FADV_WILLNEED)


def _truncated(f: _ShardFile) -> DatasetFormatError:
    return DatasetFormatError(f"shard file {f.path} is truncated: re-pack the dataset")


def _preadv_exact(f: _ShardFile, views: list[memoryview], offset: int) -> None:
    """Fill ``views`` in turn with the file's bytes from ``offset``; the file ending first is
    an error."""
    while views:
        if _HAVE_PREADV:
            n = os.preadv(f.fd, views, offset)
        else:
            part = os.pread(f.fd, len(views[0]), offset)
            n = len(part)
            views[0][:n] = part
        if n == 0:
            raise _truncated(f)
        offset += n
        while views and n >= len(views[0]):  # drop what is filled, trim a part filled
            n -= len(views[0])
            views = views[1:]
        if views and n:
            views = [views[0][n:], *views[1:]]


def _pread_bytes(f: _ShardFile, offset: int, nbytes: int) -> bytes:
    """``nbytes`` of the file from ``offset``; the file ending first is an error."""
    raw = os.pread(f.fd, nbytes, offset)
    if len(raw) == nbytes:
        return raw
    parts = [raw]
    got = len(raw)
    while got < nbytes:  # a short read: rare (signals, some filesystems), so join only here
        part = os.pread(f.fd, nbytes - got, offset + got)
        if not part:
            raise _truncated(f)
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _choose_io(data_bytes: int, memory_bytes: int | None) -> Literal["mmap", "pread"]:
    """The read path for ``data_bytes`` of shard files, given ``memory_bytes`` of memory this
    process may fill with page cache (``None``: unknown).

    ``"pread"`` when the data is more than half of that memory: it cannot be expected to stay
    cached between epochs (the model, the batches and everything else need memory too), so
    reads are cold, and cold reads by page fault run at about half the speed of large preads.
    ``"mmap"`` otherwise, the faster path over cached data.
    """
    if memory_bytes is not None and data_bytes * 2 > memory_bytes:
        return "pread"
    return "mmap"


def memory_bytes(proc: str = "/proc", cgroup_fs: str = "/sys/fs/cgroup") -> int | None:
    """Bytes of memory this process can use (and so fill with page cache): the smaller of RAM
    (``MemTotal``) and its cgroup's memory limit, if any; ``None`` when neither can be read.

    ``proc`` and ``cgroup_fs`` are where procfs and the cgroup filesystems are mounted.
    """
    limits = [m for m in (_mem_total(proc), _cgroup_limit(proc, cgroup_fs)) if m is not None]
    return min(limits) if limits else None


def _mem_total(proc: str) -> int | None:
    """``MemTotal`` of ``/proc/meminfo`` in bytes, or ``None``."""
    try:
        with open(os.path.join(proc, "meminfo"), encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # the file says kB, meaning KiB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_limit(file: Path) -> int | None:
    """A cgroup memory limit file's value in bytes; ``None`` for none, unreadable, or huge."""
    try:
        text = file.read_text(encoding="ascii").strip()
        value = int(text)  # "max" (v2's "no limit") fails here too
    except (OSError, ValueError):
        return None
    return value if 0 < value < _NO_LIMIT else None


def _cgroup_limit(proc: str, cgroup_fs: str) -> int | None:
    """The tightest memory limit on this process's cgroup and its ancestors (they apply too),
    cgroup v2 (``memory.max``) or v1 (``memory.limit_in_bytes`` of the memory controller)."""
    try:
        with open(os.path.join(proc, "self", "cgroup"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    root = Path(cgroup_fs)
    found: list[int] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, rel = parts
        if hierarchy == "0" and controllers == "":  # v2: unified, or under unified/ if hybrid
            mounts, name = [root, root / "unified"], "memory.max"
        elif "memory" in controllers.split(","):
            mounts, name = [root / "memory"], "memory.limit_in_bytes"
        else:
            continue
        for mount in mounts:
            group = mount / rel.lstrip("/")
            # walk up to the mount point; a group missing here (another cgroup namespace)
            # is skipped, its ancestors still count
            while True:
                limit = _read_limit(group / name)
                if limit is not None:
                    found.append(limit)
                if group == mount or mount not in group.parents:
                    break
                group = group.parent
    return min(found) if found else None


def _pack_id_now(path: str) -> str | None:
    """The pack id in the store's root metadata at this moment (``None`` if unreadable)."""
    try:
        doc = load_json(os.path.join(path, "zarr.json"))
        value = doc["attributes"][ATTRS_KEY]["pack_id"]
    except (OSError, DatasetFormatError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def _read_vector(path: str, split: str, name: str, count: int, dtype: str) -> npt.NDArray[Any]:
    """A one-dimensional array of the split (``labels``, ``checksums``) straight from its chunk
    files (values little-endian, each chunk ending with its crc32c in format 3), checked.

    Raises:
        DatasetFormatError: its metadata or a chunk is missing, damaged or fails its checksum
            (the file named).
    """
    base = os.path.join(path, split, name)
    meta = os.path.join(base, "zarr.json")
    layout = check_array(meta, shape=[count], dtype={"<i4": "int32", "<u4": "uint32"}[dtype])
    if layout.compressor is not None:
        raise DatasetFormatError(f"{meta} is compressed, which shardfit never writes")
    chunk = layout.chunks
    if (
        len(chunk) != 1
        or isinstance(chunk[0], bool)
        or not isinstance(chunk[0], int)
        or chunk[0] < 1
    ):
        raise DatasetFormatError(f"{meta} has chunks {chunk!r}: re-pack the dataset")
    size = chunk[0]
    trailer = CHECKSUM_BYTES if layout.checksummed else 0
    parts = []
    for c in range(-(-count // size)):
        file = os.path.join(base, "c", str(c))
        n = min(size, count - c * size)
        nbytes = size * 4 + trailer
        got = regular_file_size(file, limit=nbytes)
        with open(file, "rb") as f:
            data = f.read(nbytes)
        # zarr writes whole chunks (the last padded with the fill value); a trailing chunk
        # written short by another writer is accepted if it covers the samples
        if got < n * 4 + trailer or (trailer and got != nbytes):
            raise DatasetFormatError(f"{name} chunk {file} is truncated: re-pack the dataset")
        body = data[: len(data) - trailer]
        if trailer and crc32c(body) != int.from_bytes(data[-trailer:], "little"):
            raise ChecksumError(f"{name} chunk {file} fails its crc32c: re-pack the dataset")
        parts.append(np.frombuffer(body, dtype, n))
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _check_labels(path: str, split: str, labels: npt.NDArray[Any], counts: tuple[int, ...]) -> None:
    """Every label a class index, each class as many times as the store's attributes say."""
    file = os.path.join(path, split, "labels")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= len(counts)):
        bad = int(np.flatnonzero((labels < 0) | (labels >= len(counts)))[0])
        raise DatasetFormatError(
            f"{file} has label {int(labels[bad])} at sample {bad}, outside [0, {len(counts)}): "
            "the store is damaged; re-pack the dataset"
        )
    found = np.bincount(labels.astype(np.int64), minlength=len(counts))
    if found.tolist() != list(counts):
        meta = os.path.join(path, "zarr.json")
        raise DatasetFormatError(
            f"{file} has {found.tolist()} samples per class where {meta} says {list(counts)}: "
            "the store is damaged; re-pack the dataset"
        )


class PieceChecksums:
    """The crc32c of each image of a shard in the packer's dense layout (image ``j`` at
    ``j * stride``, ``payload`` bytes), computed piece by piece as a reader fills ``buffer``:
    each piece is checked while it is still in the CPU's cache. Measured, 4 threads reading
    3 GB of shard files cold: 0.64 CPU-s reading alone, 1.24 checking each 8 MiB read after it,
    0.93 reading and checking 1 MiB pieces, at the same 2.2 GB/s."""

    #: Bytes read, then checked, at a time.
    PIECE = 1 << 20

    def __init__(self, buffer: Any, stride: int, payload: int, count: int) -> None:
        self._bytes = np.frombuffer(buffer, np.uint8)
        self._stride = stride
        self._payload = payload
        self.count = count
        self.crcs = np.zeros(count, np.uint32)

    def feed(self, start: int, end: int) -> None:
        """Bytes ``[start, end)`` of the file have arrived in the buffer."""
        j = start // self._stride
        while j < self.count:
            first = j * self._stride
            if first >= end:
                return
            lo, hi = max(start, first), min(end, first + self._payload)
            if hi > lo:
                self.crcs[j] = crc32c_extend(int(self.crcs[j]), self._bytes[lo:hi])
            if first + self._payload > end:
                return
            j += 1
