"""Run in a fresh interpreter by test_transport.py: fit with process workers, then report.

Usage: python _transport_child.py START_METHOD STORE SCENARIO [SCENARIO ...]

Each scenario prints one line ``RESULT {json}``: what fit did, what reached the model, and what
was left behind (live child processes, ring files in the shm directory, open ring descriptors).
"""

from __future__ import annotations

import multiprocessing as mp
import sys

if __name__ == "__main__":
    mp.set_start_method(sys.argv[1], force=True)  # before Keras makes its fork-context globals

import gc
import json
import os
import signal
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import keras
import numpy as np


def _procs() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(name)] = (int(fields[1]), fields[0], cmd)
    return out


def live_children() -> list[int]:
    """Live worker processes of this one: its children, and the children of its forkserver
    (forkserver workers are not children of the process that asked for them). The forkserver
    and the resource tracker themselves live as long as this process, by design."""
    procs = _procs()
    me = os.getpid()
    helpers = {
        pid
        for pid, (ppid, _, cmd) in procs.items()
        if ppid == me and ("forkserver import main" in cmd or "resource_tracker" in cmd)
    }
    return [
        pid
        for pid, (ppid, state, _) in procs.items()
        if ((ppid == me and pid not in helpers) or ppid in helpers) and state not in "ZX"
    ]


def leftovers(ring_file: str | None, ring_map: int | None) -> dict[str, object]:
    """What is still there a while after fit: waits up to 60 s for workers to exit (a
    forkserver worker the pool started just before it closed first imports TensorFlow, which
    takes seconds on 2 busy cores, and only then sees the pool closed and exits)."""
    gc.collect()
    deadline = time.monotonic() + 60
    while live_children() and time.monotonic() < deadline:
        mp.active_children()  # reaps
        time.sleep(0.1)
    shm_dir = os.environ.get("SHARDFIT_SHM_DIR") or "/dev/shm"
    files = [f for f in os.listdir(shm_dir) if f.startswith("shardfit-")]
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if ring_file is not None and target == ring_file:
            fds.append(target)
    from shardfit.read._shm import _Lease

    leases = sum(isinstance(o, _Lease) and id(_root(o._buf)) == ring_map for o in gc.get_objects())
    return {"children": live_children(), "shm_files": files, "ring_fds": fds, "leases": leases}


def _root(a: object) -> object:
    """The object whose memory an array views (an mmap's, through numpy's memoryview)."""
    while isinstance(a, np.ndarray):
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


class Boom(RuntimeError):
    pass


def main() -> None:
    # Ctrl-C must raise KeyboardInterrupt here as in a terminal, even when this test runs in a
    # background job (whose shell starts its children with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from test_sequence import _EpochMarks, _recording_model

    from shardfit import Sequence

    store = sys.argv[2]
    for scenario in sys.argv[3:]:
        transform = {
            "worker-exception": _Raise(1, 2),
            "kill-9": _slow,
            "sigint": _slow,
            "augment": _stamp,
        }
        seq = Sequence(
            store,
            batch_size=8,
            seed=3,
            workers=2,
            use_multiprocessing=True,
            max_queue_size=2,
            transform=transform.get(scenario),
        )
        model = _recording_model(3)
        marks = _EpochMarks()
        callbacks: list[object] = [marks]
        if scenario == "early-stopping":
            # no epoch can improve the loss by 100: stops after the second of four epochs
            callbacks.append(
                keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=100.0)
            )
        if scenario == "kill-9":
            callbacks.append(_KillAWorker(batch=3))
        if scenario == "sigint":
            callbacks.append(_Announce(batch=3))
        error = None
        t0 = time.monotonic()
        try:
            epochs = 4 if scenario == "early-stopping" else 3
            model.fit(seq, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
        except BaseException as err:
            error = f"{type(err).__name__}: {err}"
        seconds = time.monotonic() - t0
        seen = [
            round(r * 255) + 256 * round(g * 255) + 65536 * round(b * 255)
            for rows in model.seen
            for r, g, b in rows.tolist()
        ]
        batches = model.seen
        stats = seq.transport_stats
        ring = seq._procs.ring if seq._procs is not None else None
        ring_used = ring is not None
        # this scenario's ring: its file (the mapping keeps a descriptor of its own) and map
        ring_file = os.readlink(f"/proc/self/fd/{ring.handle.fd}") if ring is not None else None
        ring_map = id(ring.handle._mm) if ring is not None else None
        del ring
        seq.close()  # Keras keeps the dataset referenced after fit: give the ring back now
        del seq, model
        result = {
            "scenario": scenario,
            "error": error,
            "seconds": seconds,
            "epochs": sorted(marks.starts),
            "epoch_starts": [  # in samples
                sum(len(b) for b in batches[: marks.starts[e]]) for e in sorted(marks.starts)
            ],
            "seen": seen,
            "stats": stats,
            "ring_used": ring_used,
            **leftovers(ring_file, ring_map),
        }
        print("RESULT " + json.dumps(result), flush=True)


def _stamp(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Writes a seeded draw into the blue channel: what reached the model shows the draws."""
    images[..., 2] = rng.integers(0, 256, len(images))[:, None, None] / 255
    return images


def _slow(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keeps the workers busy mid-batch most of the time."""
    time.sleep(0.3)
    return images


class _Raise:
    def __init__(self, epoch: int, index: int) -> None:
        self.epoch, self.index = epoch, index
        self.calls = 0

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # the epoch is not passed to transforms; rng is seeded from it, so compare a draw
        probe = np.random.default_rng([3, 0x5348_0003, self.epoch, self.index]).random()
        if rng.random() == probe:
            raise Boom("transform failed on purpose")
        return images


class _KillAWorker(keras.callbacks.Callback):  # type: ignore[misc]
    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch

    def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
        if batch == self.batch:
            kids = live_children()
            print(f"KILL {kids[0]} of {kids}", flush=True)
            os.kill(kids[0], signal.SIGKILL)


class _Announce(keras.callbacks.Callback):  # type: ignore[misc]
    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch

    def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
        if batch == self.batch:
            print("FITTING", flush=True)
            # the test sends SIGINT to the process group now; wait for it (its KeyboardInterrupt
            # ends this sleep) however busy the machine is, rather than a fixed second
            time.sleep(60)


if __name__ == "__main__":
    main()
