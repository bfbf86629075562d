"""A ring of shared-memory batch slots: worker processes fill them, the parent reads them in place.

Keras's process pool returns whatever ``__getitem__`` returns by pickling it through a pipe
(about 600 images/s for 224x224 float32 batches on these machines, DESIGN.md). Here a worker
writes its batch into a slot of one shared-memory file and returns a :class:`SlotBatch`, which
pickles to a few hundred bytes and unpickles in the parent (in the pool's result thread) to
arrays that are views of the slot: no copy on the way.

Lifetime of a slot, in the header's ``state`` words:

- ``FREE`` -> ``WRITING``: a worker claims it under an ``fcntl`` record lock on the slot's byte
  of the file (the kernel drops such locks when a process dies, so a killed worker never leaves
  a lock behind), and records its pid as the owner.
- ``WRITING`` -> ``SENT``: the worker has written the batch and returns the handle.
- ``SENT`` -> ``HELD``: the handle is unpickled in the parent; the arrays are views of a
  :class:`_Lease` object.
- ``HELD`` -> ``FREE``: when the lease is garbage, i.e. nothing holds the arrays or any view of
  them any more. TensorFlow's ``Dataset.from_generator`` (the way Keras's ``fit`` pulls a
  PyDataset) makes tensors that alias the numpy memory and keep the array alive
  (``tests/test_shm.py`` pins this), so a slot is not reused while a tensor made from it lives.

The file is created in ``/dev/shm`` (or ``$SHARDFIT_SHM_DIR``), reserved with
``posix_fallocate`` (a full ``/dev/shm`` is a clear error up front, not a SIGBUS in a worker
later) and unlinked at once: nothing is ever left behind in ``/dev/shm``, whatever ends the
processes. Forked workers inherit the mapping; spawned and forkserver workers receive the file
descriptor while Keras's pool starts them (``multiprocessing.reduction.DupFd``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import mmap
import os
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing import context, reduction
from typing import Any

import numpy as np
import numpy.typing as npt

from shardfit.errors import SharedMemoryError

__all__ = ["SlotBatch", "SlotRing", "shm_directory"]

log = logging.getLogger("shardfit")

FREE, WRITING, SENT, HELD = 0, 1, 2, 3
_PAGE = mmap.PAGESIZE
_HEADER_WORDS = 2  # state, owner pid

#: The rings this process owns, by token: where an unpickled handle finds its memory.
_RINGS: weakref.WeakValueDictionary[str, SlotRing] = weakref.WeakValueDictionary()
_COUNTER = itertools.count()


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


class SlotRing:
    """``slots`` page-aligned shared-memory slots of ``slot_bytes`` bytes each.

    Create it in the process that consumes batches, before the workers start. It pickles (only
    while ``multiprocessing`` starts a process) to its token and a duplicate of its file
    descriptor.

    Raises:
        SharedMemoryError: the shared-memory directory is missing, not writable, or too small.
    """

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.stride = _round_up(max(slot_bytes, 1), _PAGE)
        self.header = _round_up(_HEADER_WORDS * 4 * slots, _PAGE)
        self.size = self.header + self.stride * slots
        self.token = f"{os.getpid()}-{next(_COUNTER)}"
        self.owner_pid = os.getpid()
        self.stats = TransportStats()
        self._stats_lock = threading.Lock()
        directory = shm_directory()
        path = os.path.join(directory, f"shardfit-{self.token}-{os.urandom(4).hex()}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as err:
            raise SharedMemoryError(
                f"cannot create the shared-memory batch ring in {directory}: {err.strerror}. "
                "Set SHARDFIT_SHM_DIR to a writable tmpfs, or pass shared_memory=False"
            ) from None
        os.unlink(path)  # the open descriptors keep it; nothing can be left behind
        try:
            os.posix_fallocate(fd, 0, self.size)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                raise SharedMemoryError(_too_small(directory, self.size)) from None
            raise SharedMemoryError(
                f"cannot reserve {self.size / 2**20:.0f} MiB in {directory}: {err.strerror}"
            ) from None
        self._fd = fd
        self._map(fd)
        _RINGS[self.token] = self

    def _map(self, fd: int) -> None:
        self._fd = fd
        self._closer = weakref.finalize(self, _close_fd, fd)
        self._mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        words = np.frombuffer(self._mm, np.int32, _HEADER_WORDS * self.slots)
        self.state: npt.NDArray[np.int32] = words[: self.slots]
        self.owner: npt.NDArray[np.int32] = words[self.slots :]

    # -- crossing into a new process ------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        if context.get_spawning_popen() is None:
            raise SharedMemoryError(
                "a shared-memory ring travels only to worker processes while they start"
            )
        return {
            "slots": self.slots,
            "slot_bytes": self.slot_bytes,
            "token": self.token,
            "owner_pid": self.owner_pid,
            "fd": reduction.DupFd(self._fd),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init_from(state["slots"], state["slot_bytes"], state["token"], state["owner_pid"])
        self._map(state["fd"].detach())

    def __init_from(self, slots: int, slot_bytes: int, token: str, owner_pid: int) -> None:
        self.slots, self.slot_bytes = slots, slot_bytes
        self.stride = _round_up(max(slot_bytes, 1), _PAGE)
        self.header = _round_up(_HEADER_WORDS * 4 * slots, _PAGE)
        self.size = self.header + self.stride * slots
        self.token, self.owner_pid = token, owner_pid
        self.stats = TransportStats()
        self._stats_lock = threading.Lock()

    # -- worker side ----------------------------------------------------------------------

    def claim(self, wait_s: float = 0.05) -> int | None:
        """A free slot, now ``WRITING`` and owned by this process; ``None`` if none freed up
        within ``wait_s`` seconds (the consumer holds them all)."""
        pid = os.getpid()
        deadline = time.monotonic() + wait_s
        pause = 0.0002
        while True:
            for k in range(self.slots):
                s = (pid + k) % self.slots  # workers start their search at different slots
                st = int(self.state[s])
                if st == WRITING and not alive(int(self.owner[s])):
                    st = FREE  # its writer died mid-batch: nobody else will ever free it
                elif st != FREE:
                    continue
                try:
                    fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, s)
                except OSError:
                    continue
                try:
                    now = int(self.state[s])
                    if now == FREE or (now == WRITING and not alive(int(self.owner[s]))):
                        self.owner[s] = pid
                        self.state[s] = WRITING
                        return s
                finally:
                    fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, s)
            if time.monotonic() >= deadline:
                return None
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def array(self, slot: int, shape: tuple[int, ...], dtype: Any) -> npt.NDArray[Any]:
        """The start of ``slot`` as an array (for the worker that claimed it to write into)."""
        dt = np.dtype(dtype)
        count = int(np.prod(shape))
        if count * dt.itemsize > self.slot_bytes:
            raise ValueError(f"{shape} {dt} does not fit a slot of {self.slot_bytes} bytes")
        out: npt.NDArray[Any] = np.frombuffer(
            self._mm, dt, count, self.header + slot * self.stride
        ).reshape(shape)
        return out

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.slot_bytes

    def send(self, slot: int, images: npt.NDArray[Any], rest: tuple[Any, ...]) -> SlotBatch:
        """The handle to return for a batch whose images were written to ``slot``."""
        self.state[slot] = SENT
        return SlotBatch(self.token, slot, images.shape, images.dtype.str, rest)

    def abandon(self, slot: int) -> None:
        """Give back a claimed slot that will not be sent (the batch failed or went by pipe)."""
        self.state[slot] = FREE

    # -- parent side ----------------------------------------------------------------------

    def _take(self, slot: int, shape: tuple[int, ...], typestr: str) -> npt.NDArray[Any]:
        self.state[slot] = HELD
        buf = np.frombuffer(
            self._mm,
            np.uint8,
            int(np.prod(shape)) * np.dtype(typestr).itemsize,
            self.header + slot * self.stride,
        )
        lease = _Lease(buf, shape, typestr, self.token)
        weakref.finalize(lease, _release, self.state, slot)
        self.count(shared=True)
        return np.asarray(lease)

    def count(self, *, shared: bool) -> None:
        with self._stats_lock:
            if shared:
                self.stats.shared += 1
            else:
                self.stats.pickled += 1

    def in_use(self) -> int:
        """Slots not ``FREE`` now."""
        return int(np.count_nonzero(self.state != FREE))

    def close(self) -> None:
        """Close the descriptor and unmap, unless arrays still view the memory (then the
        mapping goes when the last of them does)."""
        self._closer()
        del self.state, self.owner  # views of the mapping: they would keep it from closing
        with contextlib.suppress(BufferError):
            self._mm.close()


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _release(state: npt.NDArray[np.int32], slot: int) -> None:
    state[slot] = FREE


class _Lease:
    """The owner of one handed-out slot's arrays: the slot is freed when this is garbage.

    Arrays made with ``np.asarray(lease)`` and every view of them keep the lease alive (numpy
    keeps the first base that is not an array), so "the lease is gone" means "nothing, Python
    or TensorFlow, can still read the slot".
    """

    def __init__(
        self, buf: npt.NDArray[np.uint8], shape: tuple[int, ...], typestr: str, token: str
    ) -> None:
        self._buf = buf  # keeps the mapping alive (and un-closable) while the arrays live
        self.token = token  # which ring
        self.__array_interface__ = {
            "shape": tuple(shape),
            "typestr": typestr,
            "data": (buf.ctypes.data, False),
            "version": 3,
        }


class SlotBatch:
    """What a worker returns instead of its batch: unpickles to ``(images, *rest)`` in the
    process that owns the ring, ``images`` viewing the slot."""

    __slots__ = ("rest", "shape", "slot", "token", "typestr")

    def __init__(
        self, token: str, slot: int, shape: tuple[int, ...], typestr: str, rest: tuple[Any, ...]
    ) -> None:
        self.token, self.slot, self.shape, self.typestr, self.rest = (
            token,
            slot,
            tuple(shape),
            typestr,
            rest,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach, (self.token, self.slot, self.shape, self.typestr, self.rest))


def _attach(
    token: str, slot: int, shape: tuple[int, ...], typestr: str, rest: tuple[Any, ...]
) -> tuple[Any, ...]:
    ring = _RINGS.get(token)
    if ring is None or ring.owner_pid != os.getpid():
        raise SharedMemoryError(
            "a shared-memory batch arrived in a process that does not own its ring "
            f"(ring {token}, this process {os.getpid()})"
        )
    return (ring._take(slot, shape, typestr), *rest)


class PickledBatch:
    """A worker's batch sent whole through the pipe (no free slot, or it did not fit one);
    unpickles to the plain tuple and counts itself."""

    __slots__ = ("batch", "token")

    def __init__(self, token: str, batch: tuple[Any, ...]) -> None:
        self.token, self.batch = token, batch

    def __reduce__(self) -> tuple[Any, ...]:
        return (_pickled, (self.token, self.batch))


def _pickled(token: str, batch: tuple[Any, ...]) -> tuple[Any, ...]:
    ring = _RINGS.get(token)
    if ring is not None:
        ring.count(shared=False)
    return batch


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


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
        "batch_size or max_queue_size, or pass shared_memory=False"
    )
