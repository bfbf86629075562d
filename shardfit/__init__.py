"""shardfit: pack image folders once into Zarr shards, stream them into Keras ``model.fit``.

Importing shardfit does not import TensorFlow or Keras.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from shardfit._format import DatasetInfo, SplitInfo, read_info
from shardfit.errors import (
    DatasetFormatError,
    ImageDecodeError,
    IncompleteDatasetError,
    InvalidOptionError,
    OutputExistsError,
    ResumeMismatchError,
    ShardfitError,
    SharedMemoryError,
    SourceFolderError,
    TransformError,
    WorkerCrashedError,
)
from shardfit.options import PackOptions
from shardfit.pack import PackReport, pack_images

if TYPE_CHECKING:  # imported lazily at run time: Sequence needs Keras
    from shardfit.sequence import Sequence, SequenceOptions

__all__ = [
    "DatasetFormatError",
    "DatasetInfo",
    "ImageDecodeError",
    "IncompleteDatasetError",
    "InvalidOptionError",
    "OutputExistsError",
    "PackOptions",
    "PackReport",
    "ResumeMismatchError",
    "Sequence",
    "SequenceOptions",
    "ShardfitError",
    "SharedMemoryError",
    "SourceFolderError",
    "SplitInfo",
    "TransformError",
    "WorkerCrashedError",
    "__version__",
    "pack_images",
    "read_info",
]


def __getattr__(name: str) -> object:
    # Sequence needs Keras (and so TensorFlow): load it on first use only, so that packing
    # and reading never import them.
    if name in ("Sequence", "SequenceOptions"):
        from shardfit import sequence

        return getattr(sequence, name)
    raise AttributeError(f"module 'shardfit' has no attribute {name!r}")
