from __future__ import annotations

import numpy as np
import pytest

from shardfit.read._epoch import batch_count, epoch_order


def test_every_sample_once_per_epoch_and_a_new_order_each_epoch() -> None:
    orders = [epoch_order(103, 10, seed=0, epoch=e, shuffle=True, window=3) for e in range(4)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(103))
    assert len({tuple(o.tolist()) for o in orders}) == 4


def test_same_seed_and_epoch_give_the_same_order() -> None:
    a = epoch_order(50, 7, seed=3, epoch=5, shuffle=True, window=2)
    assert np.array_equal(a, epoch_order(50, 7, seed=3, epoch=5, shuffle=True, window=2))
    # seed 1 epoch 0 differs from seed 0 epoch 1 (no seed + epoch collision)
    assert not np.array_equal(
        epoch_order(50, 7, seed=1, epoch=0, shuffle=True, window=2),
        epoch_order(50, 7, seed=0, epoch=1, shuffle=True, window=2),
    )


@pytest.mark.parametrize("window", [1, 2, 5])
def test_each_stretch_of_the_order_reads_at_most_window_shards(window: int) -> None:
    shard = 10
    order = epoch_order(200, shard, seed=0, epoch=0, shuffle=True, window=window)
    for start in range(0, 200, shard * window):
        shards = set((order[start : start + shard * window] // shard).tolist())
        assert len(shards) <= window


def test_no_shuffle_is_storage_order() -> None:
    assert epoch_order(9, 4, seed=5, epoch=3, shuffle=False, window=2).tolist() == list(range(9))


def test_batch_count_keeps_or_drops_the_last_batch() -> None:
    assert batch_count(10, 4, drop_remainder=False) == 3
    assert batch_count(10, 4, drop_remainder=True) == 2
    assert batch_count(8, 4, drop_remainder=False) == 2


def test_next_use_is_each_shards_first_sample_ahead_in_this_epoch_then_the_next() -> None:
    from shardfit.read._epoch import next_use

    # 3 shards of 2 samples: this epoch reads shards 2, 0, 1, 2; the next 1, 0, 2
    this = np.array([4, 0, 2, 5, 1, 3], np.int64)  # shards 2 0 1 2 0 1
    after = np.array([2, 3, 0, 1, 4, 5], np.int64)  # shards 1 1 0 0 2 2
    np.testing.assert_array_equal(next_use(this, after, 0, 2, 3), [1, 2, 0])
    np.testing.assert_array_equal(next_use(this, after, 4, 2, 3), [0, 1, 2 + 4])
    np.testing.assert_array_equal(next_use(this, after, 6, 2, 3), [2, 0, 4])
    assert next_use(this, after, 0, 2, 4)[3] == np.inf  # a shard in neither plan
