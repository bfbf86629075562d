"""Pack-time index math: the global shuffle and the stratified validation split.

Pure functions of their arguments; every random stream is seeded with
``np.random.default_rng([seed, stream, ...])`` so that no two uses of one seed collide.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["global_order", "stratified_split"]

#: Stream id of the pack-time global shuffle (other streams use other ids).
_PACK_SHUFFLE_STREAM = 0x5348


def global_order(n: int, seed: int) -> npt.NDArray[np.int64]:
    """A permutation of ``range(n)``: the order in which files are stored.

    Shuffling before sharding is what keeps a shard from holding a single class when the class
    folders were read one after another.
    """
    return np.random.default_rng([seed, _PACK_SHUFFLE_STREAM]).permutation(n).astype(np.int64)


def stratified_split(
    labels: npt.NDArray[np.integer[Any]], fraction: float
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Split already-shuffled samples into train and validation positions, class by class.

    Args:
        labels: label of each sample, in (shuffled) storage order.
        fraction: share of each class for validation, in [0, 1). A class of ``n`` samples gives
            ``floor(n * fraction + 0.5)`` to validation, but always keeps one for training.

    Returns:
        ``(train, val)``: ascending positions into ``labels``; disjoint, together all of them.
        Because ``labels`` is already in shuffled order, taking each class's first samples is a
        uniformly random choice, and both splits keep the shuffled order.
    """
    labels = np.asarray(labels)
    is_val = np.zeros(labels.shape[0], dtype=bool)
    if fraction > 0:
        for cls in np.unique(labels):
            where = np.flatnonzero(labels == cls)
            k = min(int(np.floor(where.size * fraction + 0.5)), where.size - 1)
            is_val[where[:k]] = True
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)
