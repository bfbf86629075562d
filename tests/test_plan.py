from __future__ import annotations

import numpy as np

from shardfit.pack._plan import global_order, stratified_split


def test_global_order_is_a_seeded_permutation() -> None:
    a = global_order(1000, seed=0)
    assert sorted(a.tolist()) == list(range(1000))
    assert np.array_equal(a, global_order(1000, seed=0))
    assert not np.array_equal(a, global_order(1000, seed=1))
    assert global_order(0, seed=0).size == 0


def test_stratified_split_is_disjoint_complete_and_per_class() -> None:
    rng = np.random.default_rng(5)
    labels = rng.permutation(np.repeat(np.arange(3), [100, 50, 11]))
    train, val = stratified_split(labels, 0.2)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(labels.size))
    assert np.bincount(labels[val], minlength=3).tolist() == [20, 10, 2]
    # both keep storage order
    assert np.all(np.diff(train) > 0)
    assert np.all(np.diff(val) > 0)


def test_stratified_split_keeps_one_training_sample_per_class() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    train, _val = stratified_split(labels, 0.9)
    assert set(labels[train].tolist()) == {0, 1, 2}
    assert stratified_split(labels, 0.0)[1].size == 0
