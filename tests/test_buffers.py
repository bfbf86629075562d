from __future__ import annotations

import numpy as np

from shardfit.read._buffers import BufferPool


def test_a_buffer_is_reused_once_nothing_references_it() -> None:
    pool = BufferPool(4)
    a = pool.array((2, 3), np.float32)
    a_ptr = a.__array_interface__["data"][0]
    del a
    b = pool.array((2, 3), np.float32)
    assert b.__array_interface__["data"][0] == a_ptr
    assert pool.reused == 1


def test_a_buffer_still_referenced_is_never_handed_out() -> None:
    pool = BufferPool(4)
    a = pool.array((4, 4), np.float32)
    view = a[1:, 2]  # a derived view keeps the owner alive, like a tensor aliasing the array
    del a
    b = pool.array((4, 4), np.float32)
    assert not np.shares_memory(view, b)
    held = [pool.array((4, 4), np.float32) for _ in range(3)]
    assert len({h.__array_interface__["data"][0] for h in held}) == 3


def test_beyond_capacity_arrays_are_fresh_and_not_kept() -> None:
    pool = BufferPool(1)
    a, b = pool.array((8,), np.uint8), pool.array((8,), np.uint8)
    assert not np.shares_memory(a, b)
    assert len(pool) == 1
