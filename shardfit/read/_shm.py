"""A ring of shared-memory batch slots: worker processes fill them, the parent reads them in place.

Pickling a 224x224 float32 batch through a pipe runs at about 600 images/s on these machines
(docs/design.md, "How Keras runs a PyDataset"). Here the parent hands a worker the number of a free
slot with each task; the worker writes the batch there and answers with its shape; the parent wraps
the slot's memory as the batch array: no copy on the way back.

The parent alone decides which slots are free, so no lock crosses processes and a dead worker
cannot leave a slot claimed. A slot handed out as a batch comes back when the batch's
:class:`_Lease` is garbage, i.e. when nothing holds the array or any view of it any more.
TensorFlow's ``Dataset.from_generator`` (the way Keras's ``fit`` pulls a PyDataset) makes
tensors that alias the numpy memory and keep the array alive (``tests/test_transport.py`` pins
this), so a slot is not reused while a tensor made from it lives.

The ring is one file in ``/dev/shm`` (or ``$SHARDFIT_SHM_DIR``), reserved with
``posix_fallocate`` (a full ``/dev/shm`` is a clear error up front, not a SIGBUS in a worker
later) and unlinked at once: nothing is ever left behind in ``/dev/shm``, whatever ends the
processes. Workers map it through :class:`RingHandle`, which forked workers inherit and spawned
or forkserver workers receive as a duplicated descriptor while they start.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import queue
import threading
import weakref
from dataclasses import dataclass
from multiprocessing import context, reduction
from typing import Any

import numpy as np
import numpy.typing as npt

from shardfit.errors import SharedMemoryError

__all__ = ["RingHandle", "SlotRing", "shm_directory"]


_PAGE = mmap.PAGESIZE
# Map every page up front: a first touch of a page costs a fault, which on these VMs is slow.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def shm_directory() -> str:
    """Where ring files are created: ``$SHARDFIT_SHM_DIR``, else ``/dev/shm``."""
    return os.environ.get("SHARDFIT_SHM_DIR") or "/dev/shm"


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass
class TransportStats:
    """Batches that came back to this process through the ring or, when no slot was free or
    the batch did not fit one, pickled whole through the pipe."""

    shared: int = 0
    pickled: int = 0


class RingHandle:
    """What a worker needs to write into the ring: its descriptor and geometry.

    It pickles only while ``multiprocessing`` starts a process (the descriptor travels as a
    duplicate); a forked worker inherits it as it is.
    """

    def __init__(self, fd: int, slots: int, slot_bytes: int) -> None:
        self.fd, self.slots, self.slot_bytes = fd, slots, slot_bytes
        self.stride = _round_up(max(slot_bytes, 1), _PAGE)
        self.size = self.stride * slots
        self._mm: mmap.mmap | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        if context.get_spawning_popen() is None:
            raise SharedMemoryError(
                "a shared-memory ring travels only to worker processes while they start"
            )
        return {"fd": reduction.DupFd(self.fd), "slots": self.slots, "slot_bytes": self.slot_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["fd"].detach(), state["slots"], state["slot_bytes"])  # type: ignore[misc]

    def array(self, slot: int, shape: tuple[int, ...], dtype: Any) -> npt.NDArray[Any]:
        """Slot ``slot`` as an array of ``shape`` and ``dtype`` (mapped in this process on
        first use)."""
        dt = np.dtype(dtype)
        count = int(np.prod(shape))
        if not 0 <= slot < self.slots or count * dt.itemsize > self.slot_bytes:
            raise ValueError(f"{shape} {dt} does not fit slot {slot} of {self.slot_bytes} bytes")
        if self._mm is None or self._pid != os.getpid():
            self._mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED | _POPULATE)
            self._pid = os.getpid()
        out: npt.NDArray[Any] = np.frombuffer(self._mm, dt, count, slot * self.stride)
        return out.reshape(shape)

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.slot_bytes


class SlotRing:
    """``slots`` page-aligned shared-memory slots of ``slot_bytes`` bytes each, owned by the
    process that makes it (the consumer of batches).

    Raises:
        SharedMemoryError: the shared-memory directory is missing, not writable, or too small.
    """

    def __init__(self, slots: int, slot_bytes: int) -> None:
        directory = shm_directory()
        stride = _round_up(max(slot_bytes, 1), _PAGE)
        size = stride * slots
        path = os.path.join(directory, f"shardfit-{os.getpid()}-{os.urandom(6).hex()}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as err:
            raise SharedMemoryError(
                f"cannot create the shared-memory batch ring in {directory}: {err.strerror}. "
                "Set SHARDFIT_SHM_DIR to a writable tmpfs, or pass use_multiprocessing=False"
            ) from None
        os.unlink(path)  # the open descriptors keep it; nothing can be left behind
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                raise SharedMemoryError(_too_small(directory, size)) from None
            raise SharedMemoryError(
                f"cannot reserve {size / 2**20:.0f} MiB in {directory}: {err.strerror}"
            ) from None
        self.handle = RingHandle(fd, slots, slot_bytes)
        self.slots, self.slot_bytes = slots, slot_bytes
        self.stats = TransportStats()
        self._stats_lock = threading.Lock()
        # SimpleQueue: put() is safe from a finalizer that runs in the middle of a get()
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for s in range(slots):
            self._free.put(s)
        self._closer = weakref.finalize(self, _close_fd, fd)

    def claim(self, wait_s: float) -> int | None:
        """A free slot, or ``None`` if none came free within ``wait_s`` seconds (the consumer
        holds them all)."""
        try:
            return self._free.get(timeout=wait_s) if wait_s > 0 else self._free.get_nowait()
        except queue.Empty:
            return None

    def give_back(self, slot: int) -> None:
        """Return a claimed slot that will not be handed out (its batch failed or went by
        pipe)."""
        self._free.put(slot)

    def take(self, slot: int, shape: tuple[int, ...], dtype: Any) -> npt.NDArray[Any]:
        """The batch a worker wrote to ``slot``, as an array viewing it; the slot comes free when
        that array and every view of it are gone."""
        buf = self.handle.array(slot, shape, dtype)
        lease = _Lease(buf)
        weakref.finalize(lease, self._free.put, slot)
        self.count(shared=True)
        return np.asarray(lease)

    def count(self, *, shared: bool) -> None:
        with self._stats_lock:
            if shared:
                self.stats.shared += 1
            else:
                self.stats.pickled += 1

    def free_slots(self) -> int:
        """Slots not handed out now."""
        return self._free.qsize()

    def close(self) -> None:
        """Close the descriptor and unmap, unless arrays still view the memory (then the
        mapping goes when the last of them does)."""
        self._closer()
        mm = self.handle._mm
        self.handle._mm = None
        if mm is not None:
            with contextlib.suppress(BufferError):
                mm.close()


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class _Lease:
    """The owner of one handed-out slot's array: the slot is freed when this is garbage.

    The array made with ``np.asarray(lease)`` and every view of it keep the lease alive (numpy
    keeps the first base that is not an array), so "the lease is gone" means "nothing, Python
    or TensorFlow, can still read the slot".
    """

    def __init__(self, buf: npt.NDArray[Any]) -> None:
        self._buf = buf  # keeps the mapping alive (and un-closable) while the arrays live
        self.__array_interface__ = {
            "shape": buf.shape,
            "typestr": buf.dtype.str,
            "data": (buf.ctypes.data, False),
            "version": 3,
        }


def _too_small(directory: str, size: int) -> str:
    try:
        st = os.statvfs(directory)
        mib = st.f_frsize / 2**20
        free = f"{st.f_bavail * mib:.0f} MiB free of {st.f_blocks * mib:.0f} MiB"
    except OSError:
        free = "free space unknown"
    return (
        f"{directory} is too small for the shared-memory batch ring: it needs "
        f"{size / 2**20:.0f} MiB ({free}). Enlarge it (docker run --shm-size=..., or "
        "mount -o remount,size=... /dev/shm), set SHARDFIT_SHM_DIR to a larger tmpfs, lower "
        "batch_size or max_queue_size, or pass use_multiprocessing=False"
    )
