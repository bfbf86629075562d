"""The on-disk layout (FORMAT.md) in one place: names, paths, attributes, and the opener."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from shardfit.errors import DatasetFormatError, IncompleteDatasetError
from shardfit.store._validate import check_array, check_number, damaged, load_json

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
FORMAT_VERSION = 3
#: Versions this shardfit reads: version 1 differs from 2 only in how ``paths`` is stored;
#: versions before 3 have no content checksums, so their reads cannot be verified.
READABLE_VERSIONS = (1, 2, 3)
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
        checksummed: every chunk of its arrays ends with its crc32c, and its ``checksums``
            array holds each image's (format 3 on); reads can be verified.
    """

    name: str
    count: int
    counts_per_class: tuple[int, ...]
    shard_size: int
    num_shards: int
    checksummed: bool = False


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
        pack_id: what names this pack's content (format 3 on; ``None`` before): two stores
            have the same one exactly when they hold the same bytes.
    """

    path: str
    class_names: tuple[str, ...]
    image_size: tuple[int, int]
    dtype: str
    compression: str
    splits: dict[str, SplitInfo]
    attrs: dict[str, Any]
    pack_id: str | None = None


def _load_attrs(path: str) -> dict[str, Any]:
    meta = os.path.join(path, "zarr.json")
    try:
        doc = load_json(meta)
    except FileNotFoundError:
        raise DatasetFormatError(
            f"{path} is not a shardfit dataset (no zarr.json): pack a folder with "
            "tools/pack_images.py"
        ) from None
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else None
    attrs = attrs.get(ATTRS_KEY) if isinstance(attrs, dict) else None
    if not isinstance(attrs, dict):
        raise DatasetFormatError(
            f"{path} is a zarr store but not a shardfit dataset (no '{ATTRS_KEY}' attributes)"
        )
    return attrs


def _get(meta: str, attrs: dict[str, Any], key: str) -> Any:
    if key not in attrs:
        raise damaged(meta, f"has no {key!r}")
    return attrs[key]


#: Bounds on what a store's numbers may be: beyond them the store is damaged, not large.
_MAX_SIDE = 1 << 16
_MAX_COUNT = 1 << 40
_MAX_SHARD = 1 << 24
_MAX_CLASSES = 1 << 24
_COMPRESSORS = {"none": None, "zstd": "zstd", "blosc-lz4": "blosc"}


def read_info(path: str | os.PathLike[str]) -> DatasetInfo:
    """Open the store at ``path``: check that it is complete, of a known format version, and
    that its metadata is whole and consistent (attributes, and each array's ``zarr.json``).

    Raises:
        IncompleteDatasetError: the pack of ``path`` was interrupted (its partial store exists,
            or the store is not marked complete); the message says how to resume.
        DatasetFormatError: ``path`` is not a shardfit store, has another format version, or
            any of its metadata is damaged (the message names the file).
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
    meta = os.path.join(p, "zarr.json")
    version = attrs.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
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
                f"{meta} has {key} {attrs.get(key)!r}, not one of "
                f"{', '.join(allowed)}: the store is damaged, or written by another shardfit"
            )
    names = _get(meta, attrs, "class_names")
    if (
        not isinstance(names, list)
        or not 1 <= len(names) <= _MAX_CLASSES
        or not all(isinstance(n, str) for n in names)
        or len(set(names)) != len(names)
    ):
        raise damaged(meta, "has no valid class_names (a list of distinct strings)")
    size = _get(meta, attrs, "image_size")
    if not isinstance(size, list) or len(size) != 2:
        raise damaged(meta, f"has image_size {size!r}, not [height, width]")
    h, w = (check_number(meta, "image_size", v, 1, _MAX_SIDE) for v in size)
    shard_size = check_number(meta, "shard_size", _get(meta, attrs, "shard_size"), 1, _MAX_SHARD)
    pack_id = attrs.get("pack_id")
    if version >= 3 and not isinstance(pack_id, str):
        raise damaged(meta, "has no pack_id")
    splits_doc = _get(meta, attrs, "splits")
    if not isinstance(splits_doc, dict) or not splits_doc or not set(splits_doc) <= SPLITS:
        raise damaged(meta, f"has splits {splits_doc!r}, not some of {sorted(SPLITS)}")
    splits = {
        name: _check_split(p, name, s, attrs, len(names), (h, w), shard_size, version)
        for name, s in splits_doc.items()
    }
    return DatasetInfo(
        path=p,
        class_names=tuple(names),
        image_size=(h, w),
        dtype=str(attrs["dtype"]),
        compression=str(attrs["compression"]),
        splits=splits,
        attrs=attrs,
        pack_id=pack_id if isinstance(pack_id, str) else None,
    )


#: The splits a store may hold.
SPLITS = frozenset({"train", "val"})


def _check_split(
    store: str,
    name: str,
    doc: Any,
    attrs: dict[str, Any],
    num_classes: int,
    image_size: tuple[int, int],
    shard_size: int,
    version: int,
) -> SplitInfo:
    """One split's attributes, checked against its group's attributes and arrays' metadata."""
    meta = os.path.join(store, "zarr.json")
    if not isinstance(doc, dict):
        raise damaged(meta, f"has split {name!r} as {doc!r}")
    count = check_number(meta, f"{name} count", doc.get("count"), 0, _MAX_COUNT)
    per_class = doc.get("counts_per_class")
    if (
        not isinstance(per_class, list)
        or len(per_class) != num_classes
        or sum(check_number(meta, f"{name} counts_per_class", c, 0, count) for c in per_class)
        != count
    ):
        raise damaged(meta, f"has {name} counts_per_class that do not add up to its count")
    num_shards = check_number(meta, f"{name} num_shards", doc.get("num_shards"), 0, _MAX_COUNT)
    need = -(-count // shard_size)
    if num_shards != need:
        raise damaged(meta, f"says {name} has {num_shards} shards; {count} images need {need}")
    group_meta = os.path.join(store, name, "zarr.json")
    try:
        group = load_json(group_meta)
    except FileNotFoundError:
        raise DatasetFormatError(f"{group_meta} is missing: re-pack the dataset") from None
    gattrs = group.get("attributes", {}).get(ATTRS_KEY) if isinstance(group, dict) else None
    same = {"count": count, "num_shards": num_shards, "pack_id": attrs.get("pack_id")}
    if not isinstance(gattrs, dict) or any(gattrs.get(k) != v for k, v in same.items()):
        raise damaged(group_meta, f"disagrees with {meta} on the split's size or pack id")
    h, w = image_size
    base = os.path.join(store, name)
    images = check_array(
        os.path.join(base, "images", "zarr.json"),
        shape=[count, h, w, 3],
        dtype=str(attrs["dtype"]),
        chunks=[shard_size, h, w, 3],
        inner=[1, h, w, 3],
        source=meta,
    )
    if images.compressor != _COMPRESSORS[str(attrs["compression"])]:
        raise damaged(
            os.path.join(base, "images", "zarr.json"),
            f"is compressed with {images.compressor}, the store says {attrs['compression']}",
        )
    labels = check_array(
        os.path.join(base, "labels", "zarr.json"), shape=[count], dtype="int32", source=meta
    )
    checksummed = version >= 3
    if checksummed:
        sums = check_array(
            os.path.join(base, "checksums", "zarr.json"), shape=[count], dtype="uint32", source=meta
        )
        for file, layout in (("images", images), ("labels", labels), ("checksums", sums)):
            if not layout.checksummed:
                raise damaged(os.path.join(base, file, "zarr.json"), "has no crc32c codec")
    return SplitInfo(
        name=name,
        count=count,
        counts_per_class=tuple(per_class),
        shard_size=shard_size,
        num_shards=num_shards,
        checksummed=checksummed,
    )
