"""Epoch plans: which samples each batch holds, as pure functions of (seed, epoch).

Shuffling with a shard window (docs/design.md, "Epoch plans"): shard order is permuted every epoch,
shards are taken ``window`` at a time, and the samples of each window are permuted among themselves.
Every sample appears exactly once per epoch, only ``window`` shards are read at a time (a bounded
page-cache working set), and any process can compute the plan alone from (seed, epoch).

Data-parallel training cuts the same plan among ``num_shards`` workers (a worker's share of the
data, not the store's shard files): global batch ``b`` is the ``b``-th run of
``batch_size * num_shards`` samples of the epoch's order, and worker ``i`` takes the ``i``-th of
its ``num_shards`` parts. The epoch's order does not depend on the number of workers, so the
samples trained on at each step are the same for 1, 2 or 4 workers with the same seed and global
batch size: a job can change its worker count and keep its order.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["batch_count", "batch_slice", "epoch_order", "next_use", "shard_order"]

#: Stream ids, so that no two uses of one seed draw the same numbers.
_SHARD_STREAM = 0x5348_0001
_WINDOW_STREAM = 0x5348_0002


def shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool) -> npt.NDArray[np.int64]:
    """The order in which epoch ``epoch`` visits the shards ``0 .. num_shards - 1``; its windows
    are consecutive runs of ``window`` shards of it (see :func:`epoch_order`)."""
    if not shuffle:
        return np.arange(num_shards, dtype=np.int64)
    rng = np.random.default_rng([seed, _SHARD_STREAM, epoch])
    return rng.permutation(num_shards).astype(np.int64)


def epoch_order(
    num_samples: int,
    shard_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    window: int,
) -> npt.NDArray[np.int64]:
    """The order in which epoch ``epoch`` visits the samples ``0 .. num_samples - 1``.

    Args:
        num_samples: samples in the split.
        shard_size: samples per shard (the last shard may hold fewer).
        seed: the shuffle seed.
        epoch: the epoch number (0-based); each gives another order.
        shuffle: ``False`` gives storage order, whatever ``seed`` and ``epoch``.
        window: shards whose samples are mixed together (>= 1).

    Returns:
        A permutation of ``range(num_samples)`` as int64.
    """
    if not shuffle or num_samples == 0:
        return np.arange(num_samples, dtype=np.int64)
    num_shards = -(-num_samples // shard_size)
    shards = shard_order(num_shards, seed=seed, epoch=epoch, shuffle=True)
    parts = []
    for w, start in enumerate(range(0, num_shards, window)):
        members = shards[start : start + window]
        samples = np.concatenate(
            [np.arange(s * shard_size, min((s + 1) * shard_size, num_samples)) for s in members]
        )
        rng = np.random.default_rng([seed, _WINDOW_STREAM, epoch, w])
        parts.append(rng.permutation(samples))
    order: npt.NDArray[np.int64] = np.concatenate(parts).astype(np.int64)
    return order


def batch_count(
    num_samples: int, batch_size: int, drop_remainder: bool, num_shards: int = 1
) -> int:
    """Batches per epoch (of each worker, when ``num_shards`` workers share the epoch): every
    full global batch of ``batch_size * num_shards`` samples, and the last, smaller one unless
    ``drop_remainder``, or unless it holds fewer samples than there are workers (each worker
    must get at least one: those few samples, other ones every epoch, wait for the next)."""
    full, rest = divmod(num_samples, batch_size * num_shards)
    return full + (1 if rest >= num_shards and not drop_remainder else 0)


def batch_slice(
    num_samples: int, batch_size: int, index: int, *, num_shards: int = 1, shard_index: int = 0
) -> slice:
    """Where batch ``index`` of worker ``shard_index`` of ``num_shards`` lies in the epoch's
    order: its part of global batch ``index``. Full global batches give every worker
    ``batch_size`` samples; the last, smaller one is split in parts whose sizes differ by at
    most one."""
    start = index * batch_size * num_shards
    size = max(0, min(batch_size * num_shards, num_samples - start))
    return slice(
        start + shard_index * size // num_shards, start + (shard_index + 1) * size // num_shards
    )


def next_use(
    this_epoch: npt.NDArray[np.int64],
    next_epoch: npt.NDArray[np.int64],
    position: int,
    shard_size: int,
    num_shards: int,
) -> npt.NDArray[np.float64]:
    """How far ahead, in samples of the plan, each shard is next read: its first sample at or
    after ``position`` of ``this_epoch``'s order, else in ``next_epoch``'s (counted on from the
    end of this one); ``inf`` for a shard in neither. What a cache that knows the plan evicts
    by: the shard read furthest ahead goes first (Belady's rule)."""
    out = np.full(num_shards, np.inf)
    rest = this_epoch[position:] // shard_size
    after = next_epoch // shard_size
    for shards, offset in ((after, rest.size), (rest, 0)):  # this epoch's last, to win
        ks, first = np.unique(shards, return_index=True)
        out[ks] = first + offset
    return out
