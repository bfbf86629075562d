"""shardfit: pack image folders once into Zarr shards, stream them into Keras ``model.fit``.

Importing shardfit does not import TensorFlow or Keras.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardfit._version import __version__
from shardfit.errors import (
    CacheFullError,
    ChecksumError,
    DatasetFormatError,
    ImageDecodeError,
    IncompleteDatasetError,
    InvalidOptionError,
    OutputExistsError,
    OutputLockedError,
    OutputWriteError,
    RemoteStoreError,
    ResumeMismatchError,
    ShardfitError,
    SharedMemoryError,
    SourceFolderError,
    StoreChangedError,
    TransformError,
    WorkerCrashedError,
)
from shardfit.pack._pack import PackReport, pack_images
from shardfit.pack.options import PackOptions
from shardfit.read._cluster import cluster_shard
from shardfit.read._epoch import batch_count, batch_slice, epoch_order
from shardfit.read._reader import SplitReader, open_split
from shardfit.read.options import SequenceOptions
from shardfit.store._format import DatasetInfo, SplitInfo, read_info, shard_path

if TYPE_CHECKING:  # imported lazily at run time: they need Keras and its backend
    from shardfit.keras._callbacks import BackupAndRestore
    from shardfit.keras._sequence import Sequence

__all__ = [
    "BackupAndRestore",
    "CacheFullError",
    "ChecksumError",
    "DatasetFormatError",
    "DatasetInfo",
    "ImageDecodeError",
    "IncompleteDatasetError",
    "InvalidOptionError",
    "OutputExistsError",
    "OutputLockedError",
    "OutputWriteError",
    "PackOptions",
    "PackReport",
    "RemoteStoreError",
    "ResumeMismatchError",
    "Sequence",
    "SequenceOptions",
    "ShardfitError",
    "SharedMemoryError",
    "SourceFolderError",
    "SplitInfo",
    "SplitReader",
    "StoreChangedError",
    "TransformError",
    "WorkerCrashedError",
    "__version__",
    "batch_count",
    "batch_slice",
    "cluster_shard",
    "epoch_order",
    "open_split",
    "pack_images",
    "read_info",
    "shard_path",
]


#: Public names loaded on first use, from shardfit.keras.
_NEED_KERAS = ("BackupAndRestore", "Sequence")
#: The modules Keras imports for its backends.
_BACKENDS = ("tensorflow", "jax", "jaxlib", "torch")


def __getattr__(name: str) -> object:
    # Sequence and BackupAndRestore need Keras and its backend: load them on first use only,
    # so that packing and reading never import them.
    if name in _NEED_KERAS:
        try:
            from shardfit.keras import _callbacks, _sequence
        except ImportError as err:
            if err.name is None or err.name.split(".")[0] not in _BACKENDS:
                raise
            raise ImportError(
                f"shardfit.{name} needs Keras with a backend, and Keras's backend "
                f"{err.name.split('.')[0]!r} is not installed: pip install 'shardfit[tensorflow]' "
                "(or [jax], [torch], with KERAS_BACKEND set to match)"
            ) from err
        return getattr(_sequence if name == "Sequence" else _callbacks, name)
    raise AttributeError(f"module 'shardfit' has no attribute {name!r}")
