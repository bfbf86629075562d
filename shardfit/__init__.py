"""shardfit: pack image folders once into Zarr shards, stream them into Keras ``model.fit``.

Importing shardfit does not import TensorFlow or Keras.
"""

from __future__ import annotations

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
    SourceFolderError,
)
from shardfit.options import PackOptions
from shardfit.pack import PackReport, pack_images

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
    "ShardfitError",
    "SourceFolderError",
    "SplitInfo",
    "__version__",
    "pack_images",
    "read_info",
]
