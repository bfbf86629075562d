"""Batch buffers that are reused only when nothing can still read them.

A fresh image-sized batch array costs page faults and zeroing on every batch (on the VMs this
was measured on, half the throughput of copying the pixels themselves). Reusing buffers blindly
is wrong: Keras queues batches, and TensorFlow may keep a tensor that aliases the numpy array it
was given. So a buffer is handed out again only when its owning array is referenced by nothing
but the pool: every array or view a consumer still holds keeps the owner's reference count up,
whoever holds it (Python code, a queue, or TensorFlow holding the array alive).

Buffers are anonymous memory maps, so they start on a page boundary as the shard data does:
copying page-aligned images into malloc's buffers (16 bytes past a page boundary) suffers 4K
aliasing, measured here at up to half the copy rate (docs/design.md, "Measured machine
facts").
"""

from __future__ import annotations

import mmap
import sys
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["BufferPool"]


class BufferPool:
    """Up to ``capacity`` reusable byte buffers; arrays beyond that are allocated fresh."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._owners: list[npt.NDArray[np.uint8]] = []
        self._lock = threading.Lock()
        self.reused = 0

    def array(self, shape: tuple[int, ...], dtype: Any) -> npt.NDArray[Any]:
        """An uninitialised array of ``shape`` and ``dtype``, from a free buffer when one is."""
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dt.itemsize
        with self._lock:
            for owner in self._owners:
                # references now: the list, the loop variable and getrefcount's argument
                if owner.nbytes >= nbytes and sys.getrefcount(owner) == 3:
                    self.reused += 1
                    return _shaped(owner, nbytes, dt, shape)
            owner = np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), np.uint8)
            if len(self._owners) < self.capacity:
                self._owners.append(owner)
            return _shaped(owner, nbytes, dt, shape)

    def __len__(self) -> int:
        return len(self._owners)


def _shaped(
    owner: npt.NDArray[np.uint8], nbytes: int, dtype: np.dtype[Any], shape: tuple[int, ...]
) -> npt.NDArray[Any]:
    out: npt.NDArray[Any] = owner[:nbytes].view(dtype).reshape(shape)
    return out
