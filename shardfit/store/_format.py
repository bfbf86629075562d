"""The on-disk layout (FORMAT.md) in one place: names, paths, attributes, and the opener."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from shardfit.errors import DatasetFormatError, IncompleteDatasetError

__all__ = [
    "ATTRS_KEY",
    "COMPRESSIONS",
    "DTYPES",
    "FORMAT_VERSION",
    "PARTIAL_SUFFIX",
    "READABLE_VERSIONS",
    "STATE_DIR",
    "DatasetInfo",
    "SplitInfo",
    "read_info",
    "shard_path",
    "write_json_atomic",
]

#: Stored pixel types and chunk codecs this version of the format defines (FORMAT.md).
DTYPES: tuple[str, ...] = ("float32", "uint8")
COMPRESSIONS: tuple[str, ...] = ("none", "zstd", "blosc-lz4")
#: Version of the layout described in FORMAT.md, written by this shardfit.
FORMAT_VERSION = 2
#: Versions this shardfit reads: version 1 differs only in how ``paths`` is stored, which the
#: reader does not read.
READABLE_VERSIONS = (1, 2)
#: Key of shardfit's attributes in the root group's (and each split group's) zarr attributes.
ATTRS_KEY = "shardfit"
#: A pack is built in ``OUT + PARTIAL_SUFFIX`` and renamed to ``OUT`` only once complete.
PARTIAL_SUFFIX = ".partial"
#: Per-shard progress records of a pack under way, inside the partial store.
STATE_DIR = ".shardfit-pack"


def write_json_atomic(path: str, doc: Any) -> None:
    """Write ``doc`` as JSON at ``path`` via a temporary file and a rename: a reader sees the
    old file or the new one, whatever kills the writer."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
    os.replace(tmp, path)


def shard_path(store: str, split: str, shard: int) -> str:
    """Path of the file of shard ``shard`` of ``split``'s images (zarr's default chunk keys)."""
    return os.path.join(store, split, "images", "c", str(shard), "0", "0", "0")


@dataclass(frozen=True)
class SplitInfo:
    """One split of a packed dataset.

    Attributes:
        name: ``"train"`` or ``"val"``.
        count: images stored.
        counts_per_class: images of each class, in label order.
        shard_size: images per shard.
        num_shards: shard files of this split.
    """

    name: str
    count: int
    counts_per_class: tuple[int, ...]
    shard_size: int
    num_shards: int


@dataclass(frozen=True)
class DatasetInfo:
    """What a complete shardfit store holds, read from its attributes alone.

    Attributes:
        path: absolute path of the store.
        class_names: class names in label order.
        image_size: ``(height, width)`` in pixels.
        dtype: ``"float32"`` (values in [0, 1]) or ``"uint8"`` (0-255).
        compression: ``"none"``, ``"zstd"`` or ``"blosc-lz4"``.
        splits: the splits by name.
        attrs: every shardfit attribute, as stored.
    """

    path: str
    class_names: tuple[str, ...]
    image_size: tuple[int, int]
    dtype: str
    compression: str
    splits: dict[str, SplitInfo]
    attrs: dict[str, Any]


def _load_attrs(path: str) -> dict[str, Any]:
    meta = os.path.join(path, "zarr.json")
    try:
        with open(meta, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise DatasetFormatError(
            f"{path} is not a shardfit dataset (no zarr.json): pack a folder with "
            "tools/pack_images.py"
        ) from None
    except (OSError, ValueError) as err:
        raise DatasetFormatError(f"cannot read {meta}: {err}") from None
    attrs = doc.get("attributes", {}).get(ATTRS_KEY) if isinstance(doc, dict) else None
    if not isinstance(attrs, dict):
        raise DatasetFormatError(
            f"{path} is a zarr store but not a shardfit dataset (no '{ATTRS_KEY}' attributes)"
        )
    return attrs


def read_info(path: str | os.PathLike[str]) -> DatasetInfo:
    """Open the store at ``path`` and check that it is complete and of a known format version.

    Raises:
        IncompleteDatasetError: the pack of ``path`` was interrupted (its partial store exists,
            or the store is not marked complete); the message says how to resume.
        DatasetFormatError: ``path`` is not a shardfit store or has another format version.
    """
    p = os.path.abspath(os.fspath(path))
    partial = p + PARTIAL_SUFFIX
    if not os.path.exists(p):
        if os.path.isdir(partial):
            raise IncompleteDatasetError(
                f"{p} is incomplete: its pack was interrupted (work so far is in {partial}). "
                "Pack it again with the same folder and options and resume=True to finish it."
            )
        raise DatasetFormatError(f"{p} does not exist: pack a folder with tools/pack_images.py")
    attrs = _load_attrs(p)
    version = attrs.get("format_version")
    if version not in READABLE_VERSIONS:
        raise DatasetFormatError(
            f"{p} has shardfit format version {version!r}; this shardfit reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: re-pack it with this version, or install "
            "the shardfit that wrote it"
        )
    if attrs.get("complete") is not True:
        raise IncompleteDatasetError(
            f"{p} is incomplete: its pack was interrupted. Pack it again with the same folder "
            "and options and resume=True to finish it."
        )
    for key, allowed in (("dtype", DTYPES), ("compression", COMPRESSIONS)):
        if attrs.get(key) not in allowed:
            raise DatasetFormatError(
                f"{os.path.join(p, 'zarr.json')} has {key} {attrs.get(key)!r}, not one of "
                f"{', '.join(allowed)}: the store is damaged, or written by another shardfit"
            )
    splits = {
        name: SplitInfo(
            name=name,
            count=int(s["count"]),
            counts_per_class=tuple(int(c) for c in s["counts_per_class"]),
            shard_size=int(attrs["shard_size"]),
            num_shards=int(s["num_shards"]),
        )
        for name, s in attrs["splits"].items()
    }
    return DatasetInfo(
        path=p,
        class_names=tuple(attrs["class_names"]),
        image_size=(int(attrs["image_size"][0]), int(attrs["image_size"][1])),
        dtype=str(attrs["dtype"]),
        compression=str(attrs["compression"]),
        splits=splits,
        attrs=attrs,
    )
