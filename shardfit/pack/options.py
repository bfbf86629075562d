"""Packing options: one frozen, keyword-only dataclass that validates itself."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from shardfit.errors import InvalidOptionError
from shardfit.store._format import COMPRESSIONS, DTYPES

__all__ = [
    "COMPRESSIONS",
    "DTYPES",
    "INTERPOLATIONS",
    "RESIZE_MODES",
    "TARGET_SHARD_BYTES",
    "PackOptions",
]

Resize = Literal["stretch", "crop", "pad"]
DType = Literal["float32", "uint8"]
Compression = Literal["none", "zstd", "blosc-lz4"]
OnError = Literal["skip", "raise"]

RESIZE_MODES: tuple[str, ...] = ("stretch", "crop", "pad")
#: Names follow ``keras.utils.image_dataset_from_directory``; each maps to the PIL filter of the
#: same kind. PIL's filters antialias when downscaling (TensorFlow's bilinear does not).
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "hamming")
#: The automatic shard size aims at this many bytes per shard: large enough that per-file costs
#: vanish, small enough for one worker to write a shard whole and for a shuffle window of
#: shards to stay in the page cache.
TARGET_SHARD_BYTES = 128 * 2**20


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidOptionError(f"{name} must be one of {', '.join(allowed)}. Received: {value!r}")


@dataclass(frozen=True, kw_only=True)
class PackOptions:
    """How to pack an image folder. Every field is validated on construction.

    Attributes:
        image_size: ``(height, width)`` in pixels of every stored image.
        shard_size: images per shard; ``None`` picks about 128 MiB per shard.
        resize: ``"stretch"`` resizes to ``image_size`` ignoring aspect ratio; ``"crop"`` first
            takes the largest centred window of the target aspect ratio (Keras's
            ``crop_to_aspect_ratio``); ``"pad"`` first pads with black to it
            (``pad_to_aspect_ratio``).
        interpolation: resize filter, one of :data:`INTERPOLATIONS`.
        dtype: ``"float32"`` stores pixel / 255 in [0, 1]; ``"uint8"`` stores raw pixels.
        compression: ``"none"`` (memory-mappable), ``"zstd"`` or ``"blosc-lz4"``.
        val_fraction: fraction of each class set aside as the ``val`` split, in [0, 1).
        seed: seed of the global shuffle and of the validation split.
        workers: decoding processes; ``None`` means one per available core, ``0`` decodes in
            the calling process (no protection against decoders that crash).
        on_error: ``"skip"`` skips and lists undecodable files; ``"raise"`` stops at the first.
        class_names: explicit class order (subfolder names); ``None`` sorts the subfolders.
        background: RGB colour, 0-255, that transparent pixels are composited onto.
    """

    image_size: tuple[int, int]
    shard_size: int | None = None
    resize: Resize = "stretch"
    interpolation: str = "bilinear"
    dtype: DType = "float32"
    compression: Compression = "none"
    val_fraction: float = 0.0
    seed: int = 0
    workers: int | None = None
    on_error: OnError = "skip"
    class_names: tuple[str, ...] | None = None
    background: tuple[int, int, int] = field(default=(255, 255, 255))

    def __post_init__(self) -> None:
        size = self.image_size
        if (
            not isinstance(size, tuple | list)
            or len(size) != 2
            or not all(_is_int(v) and v > 0 for v in size)
        ):
            raise InvalidOptionError(
                f"image_size must be two positive ints (height, width). Received: {size!r}"
            )
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        if self.shard_size is not None and not (_is_int(self.shard_size) and self.shard_size > 0):
            raise InvalidOptionError(
                f"shard_size must be a positive int or None. Received: {self.shard_size!r}"
            )
        _one_of("resize", self.resize, RESIZE_MODES)
        _one_of("interpolation", self.interpolation, INTERPOLATIONS)
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("compression", self.compression, COMPRESSIONS)
        _one_of("on_error", self.on_error, ("skip", "raise"))
        frac = self.val_fraction
        if (
            isinstance(frac, bool)
            or not isinstance(frac, int | float)
            or not 0.0 <= float(frac) < 1.0
        ):
            raise InvalidOptionError(f"val_fraction must be a number in [0, 1). Received: {frac!r}")
        object.__setattr__(self, "val_fraction", float(frac))
        if not _is_int(self.seed) or self.seed < 0:
            raise InvalidOptionError(f"seed must be a non-negative int. Received: {self.seed!r}")
        if self.workers is not None and not (_is_int(self.workers) and self.workers >= 0):
            raise InvalidOptionError(
                f"workers must be a non-negative int or None. Received: {self.workers!r}"
            )
        names = self.class_names
        if names is not None:
            if (
                isinstance(names, str)
                or not all(isinstance(n, str) and n for n in names)
                or len(set(names)) != len(names)
                or len(names) == 0
            ):
                raise InvalidOptionError(
                    "class_names must be a non-empty sequence of distinct folder names. "
                    f"Received: {names!r}"
                )
            object.__setattr__(self, "class_names", tuple(names))
        bg = self.background
        if (
            not isinstance(bg, tuple | list)
            or len(bg) != 3
            or not all(_is_int(v) and 0 <= v <= 255 for v in bg)
        ):
            raise InvalidOptionError(
                f"background must be three ints in 0-255 (R, G, B). Received: {bg!r}"
            )
        object.__setattr__(self, "background", tuple(int(v) for v in bg))

    @property
    def image_bytes(self) -> int:
        """Bytes of one stored, uncompressed image."""
        itemsize = 4 if self.dtype == "float32" else 1
        return self.image_size[0] * self.image_size[1] * 3 * itemsize

    def resolved_shard_size(self) -> int:
        """Images per shard: ``shard_size``, or about :data:`TARGET_SHARD_BYTES` per shard."""
        if self.shard_size is not None:
            return self.shard_size
        return max(1, round(TARGET_SHARD_BYTES / self.image_bytes))

    def resolved_workers(self) -> int:
        """Decoding processes: ``workers``, or one per core this process may run on."""
        if self.workers is not None:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)
