"""shardfit's errors: one small hierarchy, each also a built-in exception type.

Catch :class:`ShardfitError` for anything shardfit raises on purpose. Each subclass also derives
from the built-in type a caller would expect (``ValueError`` for bad arguments, ``FileExistsError``
for an output that is in the way), so generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "CacheFullError",
    "ChecksumError",
    "DatasetFormatError",
    "ImageDecodeError",
    "IncompleteDatasetError",
    "InvalidOptionError",
    "OutputExistsError",
    "OutputLockedError",
    "OutputWriteError",
    "RemoteStoreError",
    "ResumeMismatchError",
    "ShardfitError",
    "SharedMemoryError",
    "SourceFolderError",
    "StoreChangedError",
    "TransformError",
    "WorkerCrashedError",
]


class ShardfitError(Exception):
    """Base class of every error shardfit raises on purpose."""


class InvalidOptionError(ShardfitError, ValueError):
    """An option or argument breaks its rule; the message names it, the rule and the value."""


class SourceFolderError(ShardfitError, ValueError):
    """The image folder to pack is missing, unreadable, or holds no class subfolders."""


class ImageDecodeError(ShardfitError, ValueError):
    """An image could not be decoded while packing with ``on_error="raise"``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"cannot decode {path}: {reason}. Fix or remove the file, or pack with "
            'on_error="skip" to skip and list such files.'
        )
        self.path = path
        self.reason = reason


class OutputExistsError(ShardfitError, FileExistsError):
    """The output store (or an interrupted pack of it) is in the way."""


class OutputLockedError(OutputExistsError):
    """Another pack is writing the same output right now (it holds the output's lock)."""


class OutputWriteError(ShardfitError, OSError):
    """The output cannot be written: the disk or a quota is full, a file grows past its size
    limit, or the place is read-only or not ours. The message names the path and what to do."""


class ResumeMismatchError(ShardfitError, ValueError):
    """``resume=True`` was asked for, but the source folder or the options changed since."""


class IncompleteDatasetError(ShardfitError, RuntimeError):
    """The store is the leftover of an interrupted pack; it must be resumed before use."""


class DatasetFormatError(ShardfitError, ValueError):
    """The path is not a shardfit store, one written in an unsupported format version, or a
    store whose files are damaged; the message names the file."""


class ChecksumError(DatasetFormatError):
    """Stored bytes fail their crc32c, or are not the ones packed at that position (a shard
    file swapped, copied or replaced); the message names the file."""


class StoreChangedError(DatasetFormatError):
    """The store was replaced by another pack while a reader that opened it was reading."""


class SharedMemoryError(ShardfitError, OSError):
    """The shared-memory batch ring cannot be made: no writable tmpfs, or too little room."""


class WorkerCrashedError(ShardfitError, RuntimeError):
    """A data worker process died (killed by a signal, the OOM killer, or an interrupt)."""


class TransformError(ShardfitError, ValueError):
    """A ``transform`` returned something that is not a batch of images."""


class RemoteStoreError(ShardfitError, OSError):
    """An object store could not be read or written (after retries), or an object is missing;
    the message names the object's URL."""


class CacheFullError(ShardfitError, OSError):
    """The local shard cache of a remote store has no room: every cached shard is in use and
    ``cache_limit`` cannot hold one more."""
