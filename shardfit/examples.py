"""A small synthetic image folder to try shardfit on: shapes as classes.

``make_shapes_folder("shapes")`` writes ``shapes/circle``, ``shapes/square`` and
``shapes/triangle``, each image one filled shape of random bright colour, size and position on
a dark, noisy background, as JPEG. The classes are easy to learn, so a model trained on the
packed data shows at once whether images and labels line up.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "make_shapes_folder"]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")


def _draw(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    # a bright shape of random colour on a dark, noisy background: learnable in a few epochs
    bg = rng.integers(0, 70, (size, size, 3), dtype=np.uint8)
    fg = tuple(int(v) for v in rng.integers(140, 256, 3))
    im = Image.fromarray(bg)
    draw = ImageDraw.Draw(im)
    r = int(rng.integers(size // 5, size * 2 // 5))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    return im


def make_shapes_folder(
    root: str | os.PathLike[str], per_class: int = 200, size: int = 96, seed: int = 0
) -> Path:
    """Write ``per_class`` JPEGs of ``size`` x ``size`` pixels for each of :data:`SHAPES`.

    Returns the folder. Deterministic for a given ``seed``.
    """
    out = Path(root)
    rng = np.random.default_rng([seed, 0x5A])
    for shape in SHAPES:
        (out / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _draw(shape, size, rng).save(out / shape / f"{shape}_{i:05d}.jpg", quality=92)
    return out
