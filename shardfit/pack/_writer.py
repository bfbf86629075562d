"""Write shards: stream decoded chunks in storage order into whole shards, record progress,
and turn the finished shards into zarr arrays.

Each shard, once written, gets a small JSON record (which source positions it covers, their
labels and paths, the files skipped among them). Records are written after their shard and both
are renamed into place, so after a ``kill -9`` the records say exactly which shards are complete
and where a resumed pack must start.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from shardfit.errors import ResumeMismatchError
from shardfit.store._format import ATTRS_KEY, STATE_DIR, shard_path, write_json_atomic
from shardfit.store._shardio import (
    ShardFileWriter,
    crc32c,
    read_chunk_checksums,
    read_full_shard_index,
    zarr_compressors,
)

__all__ = ["ShardRecord", "SplitWriter", "load_records", "write_arrays"]


@dataclass
class ShardRecord:
    """Progress record of one flush of a split: source positions ``[start, end)``.

    ``shard`` is the shard written, or ``None`` when every file of the range was skipped (only
    possible at the end of a split). ``labels`` and ``paths`` describe the stored images in order.
    """

    split: str
    seq: int
    shard: int | None
    start: int
    end: int
    labels: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _record_path(store: str, split: str, seq: int) -> str:
    return os.path.join(store, STATE_DIR, f"{split}-{seq:06d}.json")


def _bad_record(path: str, why: str) -> ResumeMismatchError:
    return ResumeMismatchError(
        f"cannot resume: progress record {path} {why}; pass overwrite=True to start over"
    )


def load_records(store: str, split: str) -> list[ShardRecord]:
    """The contiguous records of ``split`` from the first on, as written.

    Only their form is checked here; the caller checks them against the source folder's plan
    before anything is built on them (``_pack._check_records``).

    Raises:
        ResumeMismatchError: a record is not JSON or lacks a field.
    """
    records: list[ShardRecord] = []
    while True:
        path = _record_path(store, split, len(records))
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return records
        except (OSError, ValueError) as err:
            raise _bad_record(path, f"cannot be read ({err})") from None
        try:
            rec = ShardRecord(**doc)
            rec.skipped = [(p, r) for p, r in doc["skipped"]]
        except (TypeError, ValueError, KeyError):
            rec = None
        if rec is None or not _well_formed(rec):
            raise _bad_record(path, "is not a progress record")
        records.append(rec)


def _well_formed(rec: ShardRecord) -> bool:
    """Whether every field of a record read from JSON has its type (bool is no int here)."""

    def ints(*values: object) -> bool:
        return all(type(v) is int for v in values)

    def strs(*values: object) -> bool:
        return all(isinstance(v, str) for v in values)

    return (
        isinstance(rec.split, str)
        and ints(rec.seq, rec.start, rec.end)
        and (rec.shard is None or ints(rec.shard))
        and isinstance(rec.labels, list)
        and ints(*rec.labels)
        and isinstance(rec.paths, list)
        and strs(*rec.paths)
        and strs(*(item for pair in rec.skipped for item in pair))
    )


class SplitWriter:
    """Appends decoded images of one split, in storage order, and writes each full shard.

    Args:
        store: the partial store's path.
        split: split name.
        shard_size: images per shard.
        records: records already on disk (when resuming); writing continues after them.
    """

    def __init__(self, store: str, split: str, shard_size: int, records: list[ShardRecord]) -> None:
        self.store = store
        self.split = split
        self.shard_size = shard_size
        self.records = list(records)
        self.next_shard = sum(r.shard is not None for r in records)
        self.pos = records[-1].end if records else 0
        self._start = self.pos
        self._file: ShardFileWriter | None = None
        self._labels: list[int] = []
        self._paths: list[str] = []
        self._skipped: list[tuple[str, str]] = []
        self.bytes_written = 0
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Delete shard files past the last recorded one (a kill between shard and record)."""
        cdir = os.path.join(self.store, self.split, "images", "c")
        if not os.path.isdir(cdir):
            return
        for name in os.listdir(cdir):
            if not name.isdigit() or int(name) >= self.next_shard:
                shutil.rmtree(os.path.join(cdir, name), ignore_errors=True)

    def add(
        self, path: str, label: int, chunk: bytes | memoryview | None, reason: str | None
    ) -> None:
        """Take the next source position: a stored image (``chunk``) or a skipped file.

        The chunk goes to disk at once; nothing of a shard is kept in memory but its record.
        """
        self.pos += 1
        if chunk is None:
            self._skipped.append((path, reason or "unknown error"))
            return
        if self._file is None:
            self._file = ShardFileWriter(
                shard_path(self.store, self.split, self.next_shard), self.shard_size
            )
        # the checksum zarr's crc32c codec ends each chunk with, computed here rather than in
        # the decode workers: it costs ~60 us an image against ~2 ms to decode one
        self._file.append(chunk, crc32c(chunk).to_bytes(4, "little"))
        self._labels.append(label)
        self._paths.append(path)
        if len(self._file) == self.shard_size:
            self.flush()

    def abort(self) -> None:
        """Drop the shard being written (its records stay valid for a resume)."""
        if self._file is not None:
            self._file.abort()
            self._file = None

    def flush(self) -> None:
        """Publish the shard being written, then its record."""
        if self._file is None and not self._skipped:
            return
        shard: int | None = None
        if self._file is not None:
            shard = self.next_shard
            self.bytes_written += self._file.close()
            self._file = None
            self.next_shard += 1
        rec = ShardRecord(
            split=self.split,
            seq=len(self.records),
            shard=shard,
            start=self._start,
            end=self.pos,
            labels=self._labels,
            paths=self._paths,
            skipped=self._skipped,
        )
        write_json_atomic(_record_path(self.store, self.split, rec.seq), asdict(rec))
        self.records.append(rec)
        self._start = self.pos
        self._labels, self._paths, self._skipped = [], [], []


def write_arrays(
    store: str,
    split: str,
    records: list[ShardRecord],
    *,
    image_size: tuple[int, int],
    dtype: str,
    compression: str,
    shard_size: int,
    num_classes: int,
    group_attrs: dict[str, Any],
) -> dict[str, Any]:
    """Create ``split``'s zarr arrays over its finished shards; return the split's attributes.

    The images array's metadata is written last of all, over shard files already in place;
    labels and paths are written whole. Every shard's index is read back and its count of
    present chunks checked, so an image missing from disk cannot go unnoticed.
    """
    import zarr

    labels = np.asarray([lab for r in records for lab in r.labels], dtype=np.int32)
    paths = [p for r in records for p in r.paths]
    n = int(labels.size)
    num_shards = sum(r.shard is not None for r in records)
    checksums = np.zeros(n, np.uint32)
    for k in range(num_shards):
        expect = min(shard_size, n - k * shard_size)
        path = shard_path(store, split, k)
        index = read_full_shard_index(path, shard_size, expect)[:expect]
        checksums[k * shard_size : k * shard_size + expect] = read_chunk_checksums(path, index)
    h, w = image_size
    counts = (
        [int(c) for c in np.bincount(labels, minlength=num_classes)] if n else [0] * num_classes
    )
    split_attrs: dict[str, Any] = {"count": n, "counts_per_class": counts, "num_shards": num_shards}
    group = zarr.open_group(os.path.join(store, split), mode="a")
    group.attrs[ATTRS_KEY] = {**group_attrs, **split_attrs, "split": split}
    meta = os.path.join(store, split, "images", "zarr.json")
    if os.path.exists(meta):  # a finalize interrupted earlier: rewrite the metadata only
        os.remove(meta)
    zarr.create_array(
        store=store,
        name=f"{split}/images",
        shape=(n, h, w, 3),
        dtype=dtype,
        chunks=(1, h, w, 3),
        shards=(shard_size, h, w, 3),
        compressors=zarr_compressors(compression, np.dtype(dtype).itemsize),
        fill_value=0,
        dimension_names=("sample", "height", "width", "channel"),
        config={"write_empty_chunks": True},
    )
    crc = zarr_compressors("none", 1)

    def per_sample(name: str, dtype: str, fill: int, **extra: Any) -> Any:
        """A one-dimensional array with a value per sample, each chunk checksummed."""
        return zarr.create_array(
            store=store,
            name=f"{split}/{name}",
            shape=(n,),
            dtype=dtype,
            chunks=(max(1, min(n, 1 << 18)),),
            compressors=crc,
            fill_value=fill,
            dimension_names=("sample",),
            overwrite=True,
            **extra,
        )

    lab = per_sample("labels", "int32", -1)
    # checksums[i]: the crc32c that ends sample i's chunk. A chunk's own checksum shows that its
    # bytes are intact; this array shows that they are sample i's of this pack, so a shard file
    # swapped with, copied over or replaced by another (each intact in itself) is caught.
    sums = per_sample(
        "checksums", "uint32", 0, attributes={"meaning": "crc32c that ends each sample's chunk"}
    )
    # paths: UTF-8 bytes, NUL-padded to the longest, one row per sample. A uint8 array rather
    # than zarr's "string" data type (vlen-utf8), which tensorstore and most non-Python Zarr v3
    # readers cannot open.
    encoded = [os.fsencode(p) for p in paths]  # names' bytes as on disk: UTF-8 where they are
    width = max(1, max(map(len, encoded), default=0))
    path_bytes = np.asarray(encoded, dtype=f"S{width}").view(np.uint8).reshape(n, width)
    pth = zarr.create_array(
        store=store,
        name=f"{split}/paths",
        shape=(n, width),
        dtype="uint8",
        chunks=(max(1, min(n, 1 << 16, (1 << 22) // width)), width),  # <= 4 MiB a chunk
        fill_value=0,
        compressors=crc,
        dimension_names=("sample", "path_byte"),
        attributes={"text_encoding": "file name bytes (UTF-8 where the name is), NUL-padded"},
        overwrite=True,
    )
    if n:
        lab[:] = labels
        sums[:] = checksums
        pth[:] = path_bytes
    return split_attrs
