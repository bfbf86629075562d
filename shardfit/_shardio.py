"""Shard files: encode chunks, write whole shards atomically, read and check shard indexes.

A shard file of Zarr's ``sharding_indexed`` codec (index at the end) is the inner chunks' bytes
followed by an index of ``(offset, nbytes)`` little-endian uint64 pairs, one per inner chunk in
row-major order (``2**64 - 1`` twice for a missing chunk), followed by the crc32c of the index as
a little-endian uint32. shardfit writes these files itself, whole and at once, so that no two
writers ever share a shard and no shard is ever seen half-written.
"""

from __future__ import annotations

import os
from typing import Any

import google_crc32c
import numpy as np
import numpy.typing as npt

from shardfit.errors import DatasetFormatError

__all__ = [
    "MISSING",
    "ChunkEncoder",
    "read_shard_index",
    "write_shard",
    "zarr_compressors",
]

MISSING = 2**64 - 1
_ZSTD_LEVEL = 3
_BLOSC_LEVEL = 5


def zarr_compressors(compression: str, itemsize: int) -> Any:
    """The ``compressors=`` argument for ``zarr.create_array`` matching :class:`ChunkEncoder`."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if compression == "none":
        return None
    if compression == "zstd":
        return [ZstdCodec(level=_ZSTD_LEVEL, checksum=False)]
    if compression == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=_BLOSC_LEVEL, shuffle="shuffle", typesize=itemsize)]
    raise ValueError(f"unknown compression {compression!r}")


class ChunkEncoder:
    """Turns one image into the stored bytes of its chunk (the codecs zarr will decode)."""

    def __init__(self, compression: str) -> None:
        self.compression = compression
        self._codec: Any = None
        if compression == "zstd":
            from numcodecs import Zstd

            self._codec = Zstd(level=_ZSTD_LEVEL, checksum=False)
        elif compression == "blosc-lz4":
            from numcodecs import Blosc

            self._codec = Blosc(cname="lz4", clevel=_BLOSC_LEVEL, shuffle=Blosc.SHUFFLE)
        elif compression != "none":
            raise ValueError(f"unknown compression {compression!r}")

    def encode(self, image: npt.NDArray[Any]) -> bytes:
        """Bytes of ``image`` (C order, little-endian), compressed if asked for."""
        raw = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("<"))
        if self._codec is None:
            return raw.tobytes()
        return bytes(self._codec.encode(raw))


def _index_bytes(sizes: list[int], chunks_per_shard: int) -> bytes:
    index = np.full((chunks_per_shard, 2), MISSING, dtype="<u8")
    offset = 0
    for i, n in enumerate(sizes):
        index[i] = (offset, n)
        offset += n
    raw = index.tobytes()
    crc = int(google_crc32c.value(raw))
    return raw + crc.to_bytes(4, "little")


def write_shard(path: str, chunks: list[bytes], chunks_per_shard: int) -> int:
    """Write a complete shard file at ``path`` atomically; return its size in bytes.

    ``chunks`` are the encoded inner chunks in row-major order; positions past ``len(chunks)``
    (the tail of the last shard) are marked missing. The file is written under a temporary name
    and renamed into place, so a reader or a resumed pack sees either the whole shard or none.
    """
    if len(chunks) > chunks_per_shard:
        raise ValueError(f"{len(chunks)} chunks do not fit a shard of {chunks_per_shard}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.write(_index_bytes([len(c) for c in chunks], chunks_per_shard))
        size = f.tell()
    os.replace(tmp, path)
    return size


def read_shard_index(path: str, chunks_per_shard: int) -> npt.NDArray[np.uint64]:
    """The ``(chunks_per_shard, 2)`` index of ``(offset, nbytes)`` of the shard file at ``path``.

    Raises:
        DatasetFormatError: the file is shorter than its index, the checksum fails, or an entry
            points outside the file. The message names the file.
    """
    nbytes = chunks_per_shard * 16
    try:
        size = os.path.getsize(path)
        if size < nbytes + 4:
            raise DatasetFormatError(
                f"shard file {path} is truncated ({size} bytes, smaller than its index): "
                "re-pack the dataset"
            )
        with open(path, "rb") as f:
            f.seek(size - nbytes - 4)
            raw = f.read(nbytes + 4)
    except FileNotFoundError:
        raise DatasetFormatError(f"shard file {path} is missing: re-pack the dataset") from None
    if google_crc32c.value(raw[:nbytes]) != int.from_bytes(raw[nbytes:], "little"):
        raise DatasetFormatError(
            f"shard file {path} fails its index checksum (corrupt or truncated): "
            "re-pack the dataset"
        )
    index = np.frombuffer(raw[:nbytes], dtype="<u8").reshape(chunks_per_shard, 2)
    present = index[:, 0] != MISSING
    ends = index[present, 0] + index[present, 1]
    if ends.size and int(ends.max()) > size - nbytes - 4:
        raise DatasetFormatError(
            f"shard file {path} has index entries past its data (corrupt): re-pack the dataset"
        )
    return index.astype(np.uint64)
