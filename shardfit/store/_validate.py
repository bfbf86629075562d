"""Check a store's metadata before anything is read by it: every value a store can hold either
passes or raises :class:`DatasetFormatError` naming the file.

A store's JSON is trusted for nothing: a file that is not a regular file (a FIFO would block, a
link to ``/dev/zero`` would be read until memory runs out) or larger than any metadata shardfit
writes is refused unread; numbers must be ints (not bools, floats or strings) in range; the
arrays' own ``zarr.json`` must agree with the attributes (shape, data type, chunk and shard
shape, codecs), so that an edit of one of them (``dtype`` "float32" to "int32", ``image_size``
``[32, 32]`` to ``[16, 64]``, a lowered ``count``) cannot change what the bytes mean.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from shardfit.errors import DatasetFormatError

__all__ = [
    "MAX_JSON_BYTES",
    "ArrayLayout",
    "check_array",
    "check_number",
    "damaged",
    "load_json",
    "open_regular",
    "regular_file_size",
]

#: No metadata file shardfit writes comes near this (the root's lists of skipped and ignored
#: files are the largest: ~100 bytes a file).
MAX_JSON_BYTES = 256 << 20


def damaged(file: str, what: str) -> DatasetFormatError:
    """The error for a store file that says something impossible."""
    return DatasetFormatError(f"{file} {what}: the store is damaged; re-pack the dataset")


def regular_file_size(file: str, *, limit: int | None = None) -> int:
    """Size in bytes of ``file``, which must be a regular file (symlinks followed) no larger
    than ``limit``; else :class:`DatasetFormatError` naming it."""
    try:
        st = os.stat(file)
    except FileNotFoundError:
        raise DatasetFormatError(f"{file} is missing: re-pack the dataset") from None
    except OSError as err:
        raise DatasetFormatError(f"cannot read {file}: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise damaged(file, "is not a regular file")
    if limit is not None and st.st_size > limit:
        raise damaged(file, f"is {st.st_size} bytes, more than the {limit} it can be")
    return st.st_size


def open_regular(file: str) -> int:
    """A read-only descriptor of ``file``, which must be a regular file: opened without
    blocking (a FIFO in its place would block ``open`` forever), then checked.

    Raises:
        DatasetFormatError: the file is missing, unreadable or not a regular file (named).
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(file, flags)
    except FileNotFoundError:
        raise DatasetFormatError(f"shard file {file} is missing: re-pack the dataset") from None
    except OSError as err:
        raise DatasetFormatError(f"cannot read {file}: {err.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise damaged(file, "is not a regular file")
    return fd


def load_json(file: str) -> Any:
    """The JSON document in ``file``, checked to be a bounded regular file first.

    Raises:
        FileNotFoundError: ``file`` does not exist (callers say what that means).
        DatasetFormatError: anything else wrong with it, the file named.
    """
    if not os.path.lexists(file):
        raise FileNotFoundError(file)
    regular_file_size(file, limit=MAX_JSON_BYTES)
    try:
        with open(file, "rb") as f:
            text = f.read(MAX_JSON_BYTES + 1)
        return json.loads(text)
    except OSError as err:
        raise DatasetFormatError(f"cannot read {file}: {err.strerror}") from None
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        nested = isinstance(err, RecursionError)
        raise damaged(file, "is nested too deeply" if nested else f"is not JSON ({err})") from None


def check_number(file: str, key: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi]``; anything else (bools and floats included) is
    :class:`DatasetFormatError` naming ``file`` and ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise damaged(file, f"has {key} {value!r}, not an integer in [{lo}, {hi}]")
    return value


class ArrayLayout:
    """What an array's ``zarr.json`` says about the bytes of its chunks.

    Attributes:
        checksummed: every chunk ends with its crc32c (Zarr's ``crc32c`` codec, last).
        compressor: the name of the compressing codec, or ``None``.
        chunks: the regular chunk grid's chunk (for a sharded array: shard) shape, as stored.
    """

    __slots__ = ("checksummed", "chunks", "compressor")

    def __init__(self, checksummed: bool, compressor: str | None) -> None:
        self.checksummed = checksummed
        self.compressor = compressor
        self.chunks: list[Any] = []


def _codec_chain(file: str, codecs: Any) -> ArrayLayout:
    """Check a chunk codec list ``[bytes, (compressor), (crc32c)]``."""
    if not isinstance(codecs, list) or not codecs or not all(isinstance(c, dict) for c in codecs):
        raise damaged(file, "has no valid codec list")
    names = [c.get("name") for c in codecs]
    first = codecs[0]
    config = first.get("configuration") or {}
    if names[0] != "bytes" or config.get("endian", "little") != "little":
        raise damaged(file, f"stores its values as {first!r}, not little-endian bytes")
    rest = names[1:]
    checksummed = bool(rest) and rest[-1] == "crc32c"
    if checksummed:
        rest = rest[:-1]
    if len(rest) > 1 or (rest and rest[0] not in ("zstd", "blosc")):
        raise damaged(file, f"has codecs {names}, not ones shardfit writes")
    return ArrayLayout(checksummed, rest[0] if rest else None)


def check_array(
    file: str,
    *,
    shape: list[int],
    dtype: str,
    chunks: list[int] | None = None,
    inner: list[int] | None = None,
    source: str = "the store",
) -> ArrayLayout:
    """Check the array metadata in ``file`` (a ``zarr.json``): its ``shape``, data type, regular
    chunk (for a sharded array: shard) shape ``chunks`` when given, and for a sharded array its
    inner chunk shape ``inner``, as ``source`` (the file they come from) says. Returns its
    chunks' layout.

    Raises:
        DatasetFormatError: the file is missing, damaged, or disagrees with the store (named).
    """
    try:
        doc = load_json(file)
    except FileNotFoundError:
        raise DatasetFormatError(f"{file} is missing: re-pack the dataset") from None
    if not isinstance(doc, dict) or doc.get("node_type") != "array":
        raise damaged(file, "is not a zarr array's metadata")
    if doc.get("shape") != shape:
        raise damaged(file, f"has shape {doc.get('shape')!r} where {source} says {shape}")
    if doc.get("data_type") != dtype:
        raise damaged(file, f"has data type {doc.get('data_type')!r} where {source} says {dtype!r}")
    grid = doc.get("chunk_grid")
    conf = grid.get("configuration") if isinstance(grid, dict) else None
    got = conf.get("chunk_shape") if isinstance(conf, dict) else None
    if not isinstance(got, list) or (chunks is not None and got != chunks):
        raise damaged(file, f"has chunks {got!r} where {source} says {chunks}")
    codecs = doc.get("codecs")
    if inner is None:
        layout = _codec_chain(file, codecs)
        layout.chunks = got
        return layout
    sharding = codecs[0] if isinstance(codecs, list) and len(codecs) == 1 else None
    sconf = sharding.get("configuration") if isinstance(sharding, dict) else None
    if (
        not isinstance(sharding, dict)
        or not isinstance(sconf, dict)
        or sharding.get("name") != "sharding_indexed"
        or sconf.get("chunk_shape") != inner
        or sconf.get("index_location", "end") != "end"
    ):
        raise damaged(file, f"is not sharded in chunks of {inner} with the index at the end")
    layout = _codec_chain(file, sconf.get("codecs"))
    layout.chunks = got
    return layout
