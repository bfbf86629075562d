"""Shared test helpers: tiny image folders whose images identify themselves."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PILLOW_EDGE = REPO.parent / "shared" / "testdata" / "pillow-edge"


def index_color(index: int, label: int) -> tuple[int, int, int]:
    """The colour of self-identifying image ``index``: R, G hold the index, B the label.

    Index 0 of label 0 is all black, so every folder made here also checks that black images
    are really stored (zarr skips chunks equal to the fill value unless told otherwise).
    """
    return (index % 256, (index // 256) % 256, label * 60)


def decode_index(image: np.ndarray) -> tuple[int, int]:
    """``(index, label)`` encoded in a stored image (float32 in [0, 1] or uint8)."""
    px = image[0, 0].astype(np.float64)
    if image.dtype != np.uint8:
        px = px * 255.0
    r, g, b = (round(v) for v in px)
    return r + 256 * g, b // 60


def make_folder(
    root: Path,
    per_class: dict[str, int],
    size: tuple[int, int] = (8, 8),
    fmt: str = "png",
) -> dict[str, tuple[int, int]]:
    """Write uniform images, one subfolder per class; return ``{relative path: (index, label)}``.

    Images are ``size`` = (height, width) so packing at that size does not resample.
    """
    truth: dict[str, tuple[int, int]] = {}
    index = 0
    for label, (name, n) in enumerate(sorted(per_class.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            rel = f"{name}/img{index:05d}.{fmt}"
            color = index_color(index, label)
            Image.new("RGB", (size[1], size[0]), color).save(root / rel)
            truth[rel] = (index, label)
            index += 1
    return truth


def bomb_gif() -> bytes:
    """A 44-byte GIF claiming 65535 x 65535 pixels: Pillow refuses it as a decompression bomb."""
    header = b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
    image = b"," + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00"
    return header + image + b";"


@pytest.fixture
def folder(tmp_path: Path) -> Callable[..., tuple[Path, dict[str, tuple[int, int]]]]:
    """Factory: ``folder({"a": 5, "b": 7}, size=(8, 8))`` -> (path, truth)."""

    def make(
        per_class: dict[str, int], **kwargs: object
    ) -> tuple[Path, dict[str, tuple[int, int]]]:
        root = tmp_path / "src"
        truth = make_folder(root, per_class, **kwargs)  # type: ignore[arg-type]
        return root, truth

    return make


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` by relative path, for byte-for-byte comparisons."""
    out: dict[str, bytes] = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = Path(dirpath) / name
            out[str(full.relative_to(path))] = full.read_bytes()
    return out
