"""Seeded batch augmentations for ``Sequence(..., transform=...)``.

A transform is any callable ``fn(images, rng) -> images``: ``images`` is one batch, float32 of
shape ``(n, H, W, 3)`` in [0, 1], which the transform may change in place and return, or replace
with a new array whose first dimension is still ``n``. ``rng`` is a ``numpy.random.Generator``
seeded from ``(seed, epoch, batch index)``, so the same batch of the same epoch gets the same
augmentation in any process, in any order, and after a resume. Transforms run where the batch is
built (in each worker process when ``use_multiprocessing=True``); with spawn or forkserver
workers they must pickle (define them at module level, or use the classes here).

NumPy's global RNG and Python's ``random`` are not reseeded in forked workers (every worker
would draw the same numbers): draw only from ``rng``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shardfit.errors import InvalidOptionError

__all__ = ["Compose", "RandomCrop", "RandomFlip", "RandomTranslate", "Transform", "per_sample"]

Images = npt.NDArray[np.float32]
Transform = Callable[[Images, np.random.Generator], Images]


@dataclass(frozen=True)
class Compose:
    """Apply ``transforms`` in order, each with its own generator spawned from ``rng``."""

    transforms: tuple[Transform, ...]

    def __post_init__(self) -> None:
        if not all(callable(t) for t in self.transforms):
            raise InvalidOptionError(f"transforms must be callables. Received: {self.transforms!r}")

    def __call__(self, images: Images, rng: np.random.Generator) -> Images:
        for t, r in zip(self.transforms, rng.spawn(len(self.transforms)), strict=True):
            images = t(images, r)
        return images


@dataclass(frozen=True)
class _PerSample:
    fn: Callable[[Images, np.random.Generator], Images]

    def __call__(self, images: Images, rng: np.random.Generator) -> Images:
        for k, r in enumerate(rng.spawn(len(images))):
            images[k] = self.fn(images[k], r)
        return images


def per_sample(fn: Callable[[Images, np.random.Generator], Images]) -> Transform:
    """A batch transform that calls ``fn(image, rng)`` on each ``(H, W, 3)`` image of the batch,
    each with its own generator; ``fn`` must return an image of the same shape."""
    if not callable(fn):
        raise InvalidOptionError(f"fn must be callable. Received: {fn!r}")
    return _PerSample(fn)


@dataclass(frozen=True, kw_only=True)
class RandomFlip:
    """Mirror each image left-right (``horizontal``) and/or upside down (``vertical``), each
    with probability ``p``, independently per image."""

    horizontal: bool = True
    vertical: bool = False
    p: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.p, int | float) or not 0.0 <= self.p <= 1.0:
            raise InvalidOptionError(f"p must be a number in [0, 1]. Received: {self.p!r}")
        if not (self.horizontal or self.vertical):
            raise InvalidOptionError(
                "RandomFlip needs horizontal=True or vertical=True. Received: both False"
            )

    def __call__(self, images: Images, rng: np.random.Generator) -> Images:
        for axis, on in ((2, self.horizontal), (1, self.vertical)):
            if not on:
                continue
            flip = rng.random(len(images)) < self.p
            if flip.any():
                images[flip] = np.flip(images[flip], axis=axis)
        return images


def _shift(name: str, value: Any) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, tuple)
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair)
    ):
        raise InvalidOptionError(
            f"{name} must be an int >= 0 or a pair of them (rows, columns). Received: {value!r}"
        )
    return pair


@dataclass(frozen=True, kw_only=True)
class RandomTranslate:
    """Shift each image by a random whole number of pixels, up to ``max_shift`` (rows, columns,
    or one int for both) either way, filling what is uncovered with ``fill``; same shape out."""

    max_shift: int | tuple[int, int] = 4
    fill: float = 0.0

    def __post_init__(self) -> None:
        _shift("max_shift", self.max_shift)

    def __call__(self, images: Images, rng: np.random.Generator) -> Images:
        my, mx = _shift("max_shift", self.max_shift)
        n, h, w = images.shape[:3]
        dy: list[int] = np.asarray(rng.integers(-my, my + 1, n)).tolist()
        dx: list[int] = np.asarray(rng.integers(-mx, mx + 1, n)).tolist()
        out = np.empty_like(images)
        for k in range(n):
            out[k] = self.fill
            y, x = dy[k], dx[k]
            if abs(y) >= h or abs(x) >= w:
                continue
            out[k, max(y, 0) : h + min(y, 0), max(x, 0) : w + min(x, 0)] = images[
                k, max(-y, 0) : h + min(-y, 0), max(-x, 0) : w + min(-x, 0)
            ]
        return out


@dataclass(frozen=True, kw_only=True)
class RandomCrop:
    """Cut a ``size`` (height, width) window at a random place out of each image: batches come
    out ``(n, height, width, 3)``. Build the model for that size."""

    size: tuple[int, int]

    def __post_init__(self) -> None:
        s = self.size
        if (
            not isinstance(s, tuple)
            or len(s) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s)
        ):
            raise InvalidOptionError(f"size must be two positive ints. Received: {s!r}")

    def __call__(self, images: Images, rng: np.random.Generator) -> Images:
        n, h, w = images.shape[:3]
        ch, cw = self.size
        if ch > h or cw > w:
            raise InvalidOptionError(
                f"size must fit the images ({h}, {w}). Received: {self.size!r}"
            )
        ys = rng.integers(0, h - ch + 1, n)
        xs = rng.integers(0, w - cw + 1, n)
        out = np.empty((n, ch, cw, *images.shape[3:]), images.dtype)
        for k in range(n):
            out[k] = images[k, ys[k] : ys[k] + ch, xs[k] : xs[k] + cw]
        return out
