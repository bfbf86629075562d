"""Worker processes send batches through shared memory: integrity, slot reuse, leaks, hangs."""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder

from shardfit import (
    InvalidOptionError,
    SharedMemoryError,
    TransformError,
    WorkerCrashedError,
    pack_images,
)
from shardfit.read._shm import SlotRing
from shardfit.read._workers import alive

keras = pytest.importorskip("keras")

from shardfit import Sequence  # noqa: E402

HERE = Path(__file__).parent
N_PER_CLASS = {"a": 30, "b": 25, "c": 20}  # 75 images, 60 in train


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("transport")
    make_folder(root / "src", N_PER_CLASS)
    pack_images(
        root / "src", root / "d.zarr", image_size=(8, 8), shard_size=8, val_fraction=0.2, workers=0
    )
    return root / "d.zarr"


def _fill(ring: SlotRing, value: float) -> np.ndarray:
    """Play a worker and the pool: claim a slot, write a batch there, hand it out."""
    slot = ring.claim(wait_s=0)
    assert slot is not None
    ring.handle.array(slot, (4, 2, 2, 3), np.float32)[...] = value
    return ring.take(slot, (4, 2, 2, 3), np.float32)


# -- the ring ------------------------------------------------------------------------------------


def test_a_slot_is_reused_only_when_no_array_or_view_of_it_is_left() -> None:
    ring = SlotRing(2, 4 * 2 * 2 * 3 * 4)
    images = _fill(ring, 0.5)
    assert images.shape == (4, 2, 2, 3) and np.all(images == 0.5)
    assert ring.free_slots() == 1
    view = images[1:, ::-1]
    del images
    gc.collect()
    assert ring.free_slots() == 1, "a view still reads the slot"
    del view
    gc.collect()
    assert ring.free_slots() == 2
    assert ring.stats.shared == 1 and ring.stats.pickled == 0


def test_a_full_ring_gives_no_slot_until_one_is_dropped() -> None:
    ring = SlotRing(2, 4 * 2 * 2 * 3 * 4)
    held = [_fill(ring, v) for v in (1.0, 2.0)]
    assert ring.claim(wait_s=0.01) is None
    assert [float(x.flat[0]) for x in held] == [1.0, 2.0]  # nothing overwritten
    held.pop()
    gc.collect()
    assert ring.claim(wait_s=0) is not None


def test_tensorflow_aliases_generator_batches_so_slots_wait_for_its_tensors() -> None:
    """fit pulls a PyDataset through tf.data.Dataset.from_generator: its tensors share the
    numpy memory they were made from (proved by writing under them), and keep it referenced,
    so a slot is not freed while such a tensor lives."""
    import tensorflow as tf

    ring = SlotRing(3, 4 * 2 * 2 * 3 * 4)

    def batches():  # type: ignore[no-untyped-def]
        for v in (1.0, 2.0, 3.0):
            yield _fill(ring, v)

    ds = tf.data.Dataset.from_generator(
        batches, output_signature=tf.TensorSpec((4, 2, 2, 3), tf.float32)
    )
    tensors = list(ds)
    gc.collect()
    assert [float(t[0, 0, 0, 0]) for t in tensors] == [1.0, 2.0, 3.0]
    assert ring.free_slots() == 0, "TensorFlow's tensors keep their slots"
    for slot in range(3):  # overwrite the memory behind the tensors' backs
        ring.handle.array(slot, (4, 2, 2, 3), np.float32)[...] = -1.0
    assert [float(t[0, 0, 0, 0]) for t in tensors] == [-1.0] * 3, "the tensors alias the slots"
    del tensors, ds
    gc.collect()
    assert ring.free_slots() == 3


def test_the_ring_travels_only_into_a_starting_process() -> None:
    ring = SlotRing(1, 64)
    with pytest.raises(SharedMemoryError, match="only to worker processes"):
        pickle.dumps(ring.handle)


# -- worker processes, driven directly -----------------------------------------------------------


def _in_process(store: Path, **kw: object) -> list[tuple[np.ndarray, np.ndarray]]:
    seq = Sequence(store, batch_size=8, seed=2, **kw)  # type: ignore[arg-type]
    return [tuple(a.copy() for a in seq[i]) for i in range(len(seq))]  # type: ignore[misc]


def test_worker_batches_equal_in_process_batches_and_come_through_shared_memory(
    store: Path,
) -> None:
    expect = _in_process(store, transform=_stamp)
    seq = Sequence(
        store,
        batch_size=8,
        seed=2,
        transform=_stamp,
        workers=2,
        use_multiprocessing=True,
        max_queue_size=2,
    )
    # shardfit's own processes; Keras is shown a dataset without workers of its own
    assert seq.mode == "processes" and not seq.use_multiprocessing
    assert seq.options.workers == 2 and seq.workers == 1
    got = []
    for i in range(len(seq)):
        x, y = seq[i]
        got.append((x.copy(), y.copy()))
        del x, y
    for (ex, ey), (gx, gy) in zip(expect, got, strict=True):
        np.testing.assert_array_equal(gx, ex)
        np.testing.assert_array_equal(gy, ey)
    assert seq.transport_stats == (len(seq), 0)
    assert len(seq.worker_pids) == 2
    pids = seq.worker_pids
    seq.close()
    assert not any(alive(p) for p in pids) and seq.worker_pids == []
    with pytest.raises(WorkerCrashedError, match="worker pool is closed"):
        seq[0]  # what Keras's threads still ask for after an interrupted fit: no restart
    seq.on_epoch_begin()  # a new fit starts new workers
    again = Sequence(store, batch_size=8, seed=2, transform=_stamp, initial_epoch=1)
    np.testing.assert_array_equal(seq[0][0], again[0][0])  # epoch 1: every batch was served
    seq.close()


def test_when_the_consumer_holds_every_slot_batches_come_pickled_and_right(store: Path) -> None:
    expect = _in_process(store)
    seq = Sequence(
        store, batch_size=8, seed=2, workers=1, use_multiprocessing=True, max_queue_size=1
    )  # 1 + 2 x 1 + 2 = 5 slots for 8 batches
    held = [seq[i] for i in range(len(seq))]
    for (ex, ey), (gx, gy) in zip(expect, held, strict=True):
        np.testing.assert_array_equal(gx, ex)
        np.testing.assert_array_equal(gy, ey)
    assert seq.transport_stats == (5, len(seq) - 5)
    seq.close()


def test_a_killed_worker_fails_the_request_clearly_and_a_new_epoch_starts_new_workers(
    store: Path,
) -> None:
    seq = Sequence(store, batch_size=8, workers=1, use_multiprocessing=True)
    seq[0]
    (pid,) = seq.worker_pids
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashedError, match=rf"process {pid} was killed by SIGKILL"):
        seq[1]
    with pytest.raises(WorkerCrashedError, match="killed by SIGKILL"):
        seq[2]  # the pool stays failed: fit stops on the first error
    seq.on_epoch_begin()  # a new fit
    assert seq[1][0].shape == (8, 8, 8, 3)
    assert seq.worker_pids and seq.worker_pids != [pid]
    seq.close()


def test_a_lock_held_in_the_consumer_while_workers_fork_does_not_hang_them(store: Path) -> None:
    if mp.get_start_method() != "fork":
        pytest.skip("only forked workers inherit the consumer's locks")
    expect = _in_process(store)
    seq = Sequence(store, batch_size=8, seed=2, workers=1, use_multiprocessing=True)
    with seq._reader._lock:  # another thread of the consumer opens a shard right now
        seq._worker_pool()  # ... while the worker forks
    got: list[np.ndarray] = []
    t = threading.Thread(target=lambda: got.append(seq[0][0].copy()), daemon=True)
    t.start()
    t.join(timeout=60)
    assert got, "the worker hung on a lock inherited from the consumer"
    np.testing.assert_array_equal(got[0], expect[0][0])
    seq.close()


def test_an_error_in_a_worker_is_raised_with_its_type_and_traceback(store: Path) -> None:
    seq = Sequence(
        store, batch_size=8, workers=1, use_multiprocessing=True, transform=_fail_on_purpose
    )
    with pytest.raises(ZeroDivisionError, match="on purpose") as info:
        seq[0]
    assert "_fail_on_purpose" in str(info.value.__cause__)
    assert seq.worker_pids and all(alive(p) for p in seq.worker_pids)  # a user error only
    seq.close()


def _fail_on_purpose(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    raise ZeroDivisionError("on purpose")


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 1 MiB tmpfs standing in for a too-small /dev/shm (needs root to mount)."""
    mount = tmp_path / "tiny-shm"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_too_small_shm_directory_is_a_clear_error(  # type: ignore[no-untyped-def]
    store: Path, tiny_tmpfs: Path, monkeypatch
) -> None:
    monkeypatch.setenv("SHARDFIT_SHM_DIR", str(tiny_tmpfs))
    with pytest.raises(SharedMemoryError, match=r"tiny-shm is too small .* it needs \d+ MiB"):
        SlotRing(8, 1 << 20)
    seq = Sequence(store, batch_size=8192, workers=2, use_multiprocessing=True)
    with pytest.raises(SharedMemoryError, match="--shm-size"):
        seq[0]  # the first batch makes the ring
    assert os.listdir(tiny_tmpfs) == []
    SlotRing(2, 1024)  # a ring that fits is fine


def test_a_missing_shm_directory_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SHARDFIT_SHM_DIR", str(tmp_path / "nope"))
    with pytest.raises(SharedMemoryError, match="nope: No such file or directory"):
        SlotRing(1, 64)


# -- under fit, in fresh interpreters (fork and forkserver) ------------------------------------


def _run_child(method: str, store: Path, *scenarios: str, sigint: bool = False) -> dict:  # type: ignore[type-arg]
    cmd = [sys.executable, str(HERE / "_transport_child.py"), method, str(store), *scenarios]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    lines: list[str] = []
    errors: list[str] = []

    def pump_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if sigint and line.startswith("FITTING"):
                os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does

    def pump_stderr() -> None:
        assert proc.stderr is not None
        errors.extend(proc.stderr)

    pumps = [threading.Thread(target=f, daemon=True) for f in (pump_stdout, pump_stderr)]
    for t in pumps:
        t.start()
    try:
        proc.wait(timeout=300)
    finally:
        # whatever the child left in its process group (it reported what it saw first) would
        # keep the pipes open
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for t in pumps:
        t.join(timeout=30)
    results = {}
    for line in lines:
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            results[r["scenario"]] = r
    assert set(results) == set(scenarios), "".join(errors)[-3000:]
    return results


def _per_epoch(r: dict) -> list[list[int]]:  # type: ignore[type-arg]
    bounds = [*r["epoch_starts"], len(r["seen"])]
    return [r["seen"][a:b] for a, b in itertools.pairwise(bounds)]


def _nothing_left(r: dict) -> None:  # type: ignore[type-arg]
    """No worker left, no file in /dev/shm, and the scenario's ring closed (its mapping may
    outlive close() only while batches Keras still holds view it)."""
    assert r["ring_used"], "the batches did not come through the ring"
    assert r["children"] == [], "worker processes left behind"
    assert r["shm_files"] == [], "files left in the shared-memory directory"
    if r["leases"] == 0:
        assert r["ring_fds"] == [], "the ring is still open after close()"
    else:
        # Keras keeps the batches it drained from a failed epoch (its enqueuer's ready_queue,
        # itself kept by TensorFlow): their memory stays mapped until they go, nothing more
        assert len(r["ring_fds"]) <= 1 and r["leases"] <= 2 + 2, r


@pytest.mark.parametrize("method", ["fork", pytest.param("forkserver", marks=pytest.mark.slow)])
def test_fit_through_shared_memory_sees_every_sample_and_leaves_nothing(
    store: Path, method: str
) -> None:
    results = _run_child(
        method, store, "normal", "augment", "worker-exception", "early-stopping", "kill-9"
    )
    plan_seq = Sequence(store, batch_size=8, seed=3)
    position = _stored_index(plan_seq)

    def plan(epoch: int) -> list[int]:
        return [
            int(position[s])
            for i in range(len(plan_seq))
            for s in plan_seq.sample_indices(i, epoch)
        ]

    normal = results["normal"]
    assert normal["error"] is None
    assert normal["epochs"] == [0, 1, 2]
    assert [[v % 65536 for v in e] for e in _per_epoch(normal)] == [plan(e) for e in range(3)]
    shared, pickled = normal["stats"]
    assert pickled == 0 and shared >= 3 * len(plan_seq) - 2  # Keras probes 2 batches itself
    _nothing_left(normal)

    # seeded augmentation in the workers: the draws of (seed, epoch, batch) reached the model
    augment = results["augment"]
    assert augment["error"] is None
    for e, got in enumerate(_per_epoch(augment)):
        expect = []
        for i in range(len(plan_seq)):
            rng = np.random.default_rng([3, 0x5348_0003, e, i])
            draws = rng.integers(0, 256, len(plan_seq.sample_indices(i, e)))
            expect += [
                int(position[s]) + 65536 * int(d)
                for s, d in zip(plan_seq.sample_indices(i, e), draws, strict=True)
            ]
        assert got == expect
    _nothing_left(augment)

    failed = results["worker-exception"]
    assert "Boom: transform failed on purpose" in failed["error"]
    _nothing_left(failed)

    early = results["early-stopping"]
    assert early["error"] is None and early["epochs"] == [0, 1]  # of 4
    _nothing_left(early)

    killed = results["kill-9"]
    assert "WorkerCrashedError: data worker process" in killed["error"]
    assert killed["seconds"] < 60, "fit hung on a killed worker"
    _nothing_left(killed)


@pytest.mark.parametrize("method", ["fork", pytest.param("forkserver", marks=pytest.mark.slow)])
def test_ctrl_c_during_fit_leaves_no_worker_and_no_ring(store: Path, method: str) -> None:
    r = _run_child(method, store, "sigint", sigint=True)["sigint"]
    assert r["error"].startswith("KeyboardInterrupt")
    _nothing_left(r)


def _stored_index(seq: Sequence) -> np.ndarray:
    """The index each stored sample of the split encodes, by storage position."""
    from conftest import decode_index

    images = np.zeros((seq.num_samples, 8, 8, 3), np.float32)
    seq._reader.read_into(np.arange(seq.num_samples), images)
    return np.array([decode_index(im)[0] for im in images])


# -- transforms --------------------------------------------------------------------------------


def _stamp(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    images[..., 2] = rng.integers(0, 256, len(images))[:, None, None] / 255
    return images


def test_a_transform_is_seeded_by_seed_epoch_and_batch(store: Path) -> None:
    a = Sequence(store, batch_size=8, seed=5, transform=_stamp)
    b = Sequence(store, batch_size=8, seed=5, transform=_stamp, initial_epoch=1)
    first = [a[0][0][:, 0, 0, 2].copy()]
    assert a[0][0][:, 0, 0, 2].tolist() == first[0].tolist()  # the same batch again: same draw
    first += [a[i][0][:, 0, 0, 2].copy() for i in range(1, len(a))]
    a.on_epoch_end()
    assert a.epoch == 1
    second = [a[i][0][:, 0, 0, 2].copy() for i in range(len(a))]
    assert any((x != y).any() for x, y in zip(first, second, strict=True))
    resumed = [b[i][0][:, 0, 0, 2].copy() for i in range(len(b))]  # a resume at epoch 1
    assert all((x == y).all() for x, y in zip(second, resumed, strict=True))


def test_a_transform_must_return_the_batch(store: Path) -> None:
    seq = Sequence(store, batch_size=8, transform=lambda images, rng: images[:3])
    with pytest.raises(TransformError, match=r"batch's 8 images first. Received: \(3, 8, 8, 3\)"):
        seq[0]
    with pytest.raises(InvalidOptionError, match="transform must be a callable"):
        Sequence(store, transform="flip")  # type: ignore[arg-type]


def test_a_transform_that_cannot_pickle_is_named_when_it_must_travel(store: Path) -> None:
    seq = Sequence(store, batch_size=8, transform=lambda images, rng: images)
    with pytest.raises(InvalidOptionError, match=r"pickle to run in another process .*<lambda>"):
        pickle.dumps(seq)  # a Sequence without its transform would train without it
    ctx = mp.get_context("forkserver")
    from shardfit.read._batch import BatchMaker
    from shardfit.read._workers import WorkerPool

    with pytest.raises(InvalidOptionError, match="run in forkserver worker processes"):
        WorkerPool(BatchMaker(seq._reader, seq.transform, 0), 1, slots=1, slot_bytes=64, ctx=ctx)


def _small_model():  # type: ignore[no-untyped-def]
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    model.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


class _KillWorkerAt(keras.callbacks.Callback):  # type: ignore[misc]
    def __init__(self, seq, batch: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.seq, self.batch = seq, batch
        self.killed: list[int] = []

    def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
        if batch == self.batch and not self.killed:
            self.killed.extend(self.seq.worker_pids)
            for pid in self.killed:
                os.kill(pid, signal.SIGKILL)


def test_a_new_fit_trains_after_a_worker_was_killed_and_after_close(store: Path) -> None:
    seq = Sequence(store, batch_size=8, workers=2, use_multiprocessing=True, max_queue_size=2)
    model = _small_model()
    killer = _KillWorkerAt(seq, batch=1)
    # under TensorFlow, fit re-raises the generator's error as its own, with its text
    # (whether the pool learns the signal depends on which thread reaps the process first)
    crashed = r"WorkerCrashedError: data worker process \d+ (was killed|died)"
    with pytest.raises(Exception, match=crashed):
        model.fit(seq, epochs=3, verbose=0, callbacks=[killer])
    assert killer.killed
    # the same Sequence, a new fit: new workers from its first request on (Keras asks for
    # batches before it calls on_epoch_begin)
    history = model.fit(seq, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    assert seq.worker_pids and not set(seq.worker_pids) & set(killer.killed)
    seq.close()
    history = model.fit(seq, epochs=1, verbose=0)
    assert len(history.history["loss"]) == 1
    seq.close()
