"""Read shards: samples of one split into caller-owned arrays, without zarr-python per batch.

Each process opens what it needs on first use (keyed on its pid, so nothing opened in a parent
is used by a forked child): every shard file is memory-mapped once and its index read and checked
once. Uncompressed shards are read by copying straight from the mapping; compressed ones by
decoding each chunk's bytes with the store's codec. A reader pickles to its path and a few
numbers.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from shardfit._format import read_info, shard_path
from shardfit._shardio import ChunkEncoder, read_full_shard_index
from shardfit.errors import DatasetFormatError

__all__ = ["ShardReader"]


@dataclass
class _Open:
    """What one process has opened: shard mappings and decoded indexes, labels."""

    pid: int
    shards: dict[int, tuple[mmap.mmap, npt.NDArray[np.uint64], npt.NDArray[Any] | None]] = field(
        default_factory=dict
    )
    labels: npt.NDArray[np.int32] | None = None
    codec: Any = None


class ShardReader:
    """Random access to the images and labels of one split of a shardfit store.

    Args:
        path: the store.
        split: ``"train"`` or ``"val"``.

    Raises:
        DatasetFormatError, IncompleteDatasetError: as :func:`shardfit.read_info`, or when the
            split does not exist.
    """

    def __init__(self, path: str | os.PathLike[str], split: str = "train") -> None:
        info = read_info(path)
        if split not in info.splits:
            raise DatasetFormatError(
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
        self.image_shape = (info.image_size[0], info.image_size[1], 3)
        self.stored_dtype = np.dtype(info.dtype)
        self.compression = info.compression
        self._chunk_bytes = int(np.prod(self.image_shape)) * self.stored_dtype.itemsize
        self._open: _Open | None = None
        self._lock = threading.Lock()

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

    def _shard(self, k: int) -> tuple[mmap.mmap, npt.NDArray[np.uint64], npt.NDArray[Any] | None]:
        opened = self._handles()
        got = opened.shards.get(k)
        if got is not None:
            return got
        path = shard_path(self.path, self.split, k)
        expect = min(self.shard_size, self.count - k * self.shard_size)
        index = read_full_shard_index(path, self.shard_size, expect)
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        dense = None
        offsets = index[:expect, 0].astype(np.int64)
        sizes = index[:expect, 1].astype(np.int64)
        if self.compression == "none":
            if np.any(sizes != self._chunk_bytes):
                raise DatasetFormatError(
                    f"shard file {path} has chunks of the wrong size for "
                    f"{self.image_shape} {self.stored_dtype}: re-pack the dataset"
                )
            if np.array_equal(offsets, np.arange(expect, dtype=np.int64) * self._chunk_bytes):
                # the packer's layout: one array view over the whole shard
                dense = np.frombuffer(
                    mm, self.stored_dtype, count=expect * int(np.prod(self.image_shape))
                ).reshape(expect, *self.image_shape)
        got = (mm, index, dense)
        opened.shards[k] = got
        return got

    def labels(self) -> npt.NDArray[np.int32]:
        """All labels of the split (read once per process)."""
        opened = self._handles()
        if opened.labels is None:
            opened.labels = _read_labels(self.path, self.split, self.count)
        return opened.labels

    def read_into(self, indices: npt.NDArray[np.integer], out: npt.NDArray[Any]) -> None:
        """Copy samples ``indices`` into ``out[:len(indices)]``, shape ``(n, H, W, 3)``.

        ``out`` may be float32 (uint8 stores are converted as ``pixel / 255``) or the stored dtype.
        """
        convert = out.dtype != self.stored_dtype
        for b, i in enumerate(np.asarray(indices, dtype=np.int64).tolist()):
            if not 0 <= i < self.count:
                raise IndexError(f"sample {i} out of range for {self.count} samples")
            k, j = divmod(i, self.shard_size)
            mm, index, dense = self._shard(k)
            if dense is not None:
                src: npt.NDArray[Any] = dense[j]
            else:
                off, n = int(index[j, 0]), int(index[j, 1])
                if self.compression == "none":
                    src = np.frombuffer(
                        mm, self.stored_dtype, count=n // self.stored_dtype.itemsize, offset=off
                    ).reshape(self.image_shape)
                else:
                    raw = self._handles().codec.decode(mm[off : off + n])
                    src = np.frombuffer(raw, self.stored_dtype).reshape(self.image_shape)
            if convert:
                np.divide(src, 255, out=out[b], dtype=np.float32)
            else:
                out[b] = src


def _read_labels(path: str, split: str, count: int) -> npt.NDArray[np.int32]:
    """The split's labels; straight from the raw chunk files when stored uncompressed."""
    base = os.path.join(path, split, "labels")
    try:
        with open(os.path.join(base, "zarr.json"), encoding="utf-8") as f:
            meta = json.load(f)
        chunk = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        raw_bytes = [c["name"] for c in meta["codecs"]] == ["bytes"]
    except (OSError, ValueError, KeyError) as err:
        raise DatasetFormatError(f"cannot read the labels of {path} ({split}): {err}") from None
    if not raw_bytes:
        import zarr

        return np.asarray(zarr.open_array(base, mode="r")[:], dtype=np.int32)
    parts = []
    for c in range(-(-count // chunk)):
        file = os.path.join(base, "c", str(c))
        n = min(chunk, count - c * chunk)
        try:
            part = np.fromfile(file, dtype="<i4")
        except FileNotFoundError:
            raise DatasetFormatError(
                f"labels chunk {file} is missing: re-pack the dataset"
            ) from None
        if part.size < n:
            raise DatasetFormatError(f"labels chunk {file} is truncated: re-pack the dataset")
        parts.append(part[:n])
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
