"""shardfit.Sequence against real Keras: batches, epochs, resume, workers, errors."""

from __future__ import annotations

import itertools
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import decode_index, make_folder

from shardfit import DatasetFormatError, InvalidOptionError, pack_images
from shardfit.store._format import shard_path

keras = pytest.importorskip("keras")
from shardfit import Sequence  # noqa: E402

N_PER_CLASS = {"a": 30, "b": 25, "c": 20}  # 75 images
SHARD = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[int, int]]]:
    root = tmp_path_factory.mktemp("seq")
    truth = make_folder(root / "src", N_PER_CLASS)
    pack_images(
        root / "src",
        root / "d.zarr",
        image_size=(8, 8),
        shard_size=SHARD,
        val_fraction=0.2,
        workers=0,
    )
    return root / "d.zarr", truth


def stored_index(store_path: Path, split: str) -> np.ndarray:
    """Index encoded in every stored image of the split, by storage position."""
    images = zarr.open_group(str(store_path), mode="r")[f"{split}/images"][:]
    return np.array([decode_index(im)[0] for im in images])


def test_batches_equal_the_stored_values_exactly(store) -> None:
    path, _ = store
    root = zarr.open_group(str(path), mode="r")
    images, labels = root["train/images"][:], root["train/labels"][:]
    seq = Sequence(path, batch_size=16, seed=4)
    assert len(seq) == -(-len(images) // 16)
    for i in range(len(seq)):
        x, y = seq[i]
        samples = seq.sample_indices(i)
        np.testing.assert_array_equal(x, images[samples])
        np.testing.assert_array_equal(y, labels[samples])
        assert x.dtype == np.float32 and y.dtype == np.int32
    assert x.shape[0] == len(images) - 16 * (len(seq) - 1)  # the last, smaller batch


def test_label_modes_and_drop_remainder(store) -> None:
    path, _ = store
    seq = Sequence(path, batch_size=16, label_mode="categorical", drop_remainder=True)
    assert len(seq) == seq.num_samples // 16
    _, y = seq[0]
    assert y.shape == (16, 3) and y.dtype == np.float32
    assert (y.sum(axis=1) == 1).all()
    (only,) = Sequence(path, batch_size=4, label_mode=None)[0]
    assert only.shape == (4, 8, 8, 3)
    assert Sequence(path).class_names == ("a", "b", "c")


def test_uint8_and_compressed_stores_give_the_same_batches(store, tmp_path: Path) -> None:
    path, _ = store
    src = path.parent / "src"
    for kwargs in ({"dtype": "uint8"}, {"compression": "zstd"}, {"compression": "blosc-lz4"}):
        ref = Sequence(path, batch_size=10, seed=1)
        other_path = tmp_path / f"{'-'.join(kwargs.values())}.zarr"
        pack_images(
            src,
            other_path,
            image_size=(8, 8),
            shard_size=SHARD,
            val_fraction=0.2,
            workers=0,
            **kwargs,
        )
        other = Sequence(other_path, batch_size=10, seed=1)
        for i in range(len(ref)):  # each index once: a second pass would be the next epoch
            (x, y), (x_ref, y_ref) = other[i], ref[i]
            np.testing.assert_array_equal(x, x_ref)
            np.testing.assert_array_equal(y, y_ref)


def test_sequence_pickles_small_and_reads_after_unpickling(store) -> None:
    path, _ = store
    seq = Sequence(path, batch_size=8)
    first = seq[0]
    blob = pickle.dumps(seq)
    assert len(blob) < 4096
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again[0][0], first[0])


def test_bad_arguments_are_clear_errors(store) -> None:
    path, _ = store
    with pytest.raises(InvalidOptionError, match=r"batch_size must be an int >= 1\. Received: 0"):
        Sequence(path, batch_size=0)
    with pytest.raises(InvalidOptionError, match="label_mode must be one of"):
        Sequence(path, label_mode="binary")  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match="split must be one of train, val"):
        Sequence(path, split="test")
    with pytest.raises(IndexError, match=r"batch index must be in \[0, "):
        Sequence(path)[10_000]


def _corrupt(path: Path, how: str) -> Path:
    shard = Path(shard_path(str(path), "train", 1))
    if how == "missing":
        shard.unlink()
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    elif how == "checksum":
        data = bytearray(shard.read_bytes())
        data[-20] ^= 0xFF
        shard.write_bytes(bytes(data))
    return shard


def _copy_store(store_path: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(store_path, dst)
    return dst


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("missing", "is missing"),
        ("truncated", "is truncated"),
        ("checksum", "fails its index checksum"),
    ],
)
def test_bad_shard_files_are_named_in_the_error(
    store, tmp_path: Path, how: str, match: str
) -> None:
    path = _copy_store(store[0], tmp_path / "copy.zarr")
    shard = _corrupt(path, how)
    seq = Sequence(path, batch_size=75, shuffle=False)
    with pytest.raises(DatasetFormatError, match=match) as err:
        seq[0]
    assert str(shard) in str(err.value)


def test_another_format_version_is_refused(store, tmp_path: Path) -> None:
    path = _copy_store(store[0], tmp_path / "copy.zarr")
    root = zarr.open_group(str(path), mode="r+")
    attrs = root.attrs["shardfit"]
    root.attrs["shardfit"] = {**attrs, "format_version": 4}
    with pytest.raises(DatasetFormatError, match="format version 4"):
        Sequence(path)


# -- under model.fit ---------------------------------------------------------------------------


def _recording_model(num_classes: int):  # type: ignore[no-untyped-def]
    class Recorder(keras.Model):  # type: ignore[misc]
        def train_step(self, data):  # type: ignore[no-untyped-def]
            self.seen.append(np.asarray(data[0])[:, 0, 0, :].copy())
            return super().train_step(data)

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    model = Recorder(inputs, keras.layers.Dense(num_classes)(x))
    model.seen = []
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=True,
    )
    return model


class _EpochMarks(keras.callbacks.Callback):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.starts: dict[int, int] = {}

    def on_epoch_begin(self, epoch, logs=None):  # type: ignore[no-untyped-def]
        self.starts[epoch] = len(self.model.seen)


def fit_and_record(seq, epochs: int, initial_epoch: int = 0, shuffle: bool | None = True, **fit_kw):  # type: ignore[no-untyped-def]
    """Run a real fit; return {epoch: [index encoded by each sample, in arrival order]}.
    ``shuffle=None`` leaves fit's argument to Keras's default."""
    model = _recording_model(3)
    marks = _EpochMarks()
    if shuffle is not None:
        fit_kw["shuffle"] = shuffle
    model.fit(
        seq,
        epochs=epochs,
        initial_epoch=initial_epoch,
        verbose=0,
        callbacks=[marks],
        **fit_kw,
    )
    per_epoch: dict[int, list[int]] = {}
    bounds = [*sorted(marks.starts.items()), (epochs, len(model.seen))]
    for (epoch, start), (_, end) in itertools.pairwise(bounds):
        rows = np.concatenate(model.seen[start:end]) if end > start else np.zeros((0, 3))
        per_epoch[epoch] = [round(r * 255) + 256 * round(g * 255) for r, g, _ in rows.tolist()]
    return per_epoch


MODES = {
    "in-process": {"workers": 1, "use_multiprocessing": False},
    "threads": {"workers": 2, "use_multiprocessing": False},
    "processes": {"workers": 2, "use_multiprocessing": True},
    # Keras's own process pool (batches pickled): the epoch is counted from hook calls there
    "keras-pool": {"workers": 2, "use_multiprocessing": True, "shared_memory": False},
    # whole shards read ahead into memory (what io="auto" picks for stores larger than memory)
    "stream": {"workers": 1, "io": "stream"},
    "stream-threads": {"workers": 2, "io": "stream"},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_fit_sees_every_sample_once_per_epoch_in_a_new_shard_order(store, mode: str) -> None:
    path, _ = store
    expected = sorted(stored_index(path, "train").tolist())
    seq = Sequence(path, batch_size=8, seed=0, max_queue_size=3, **MODES[mode])
    seen = fit_and_record(seq, epochs=3)
    assert sorted(seen) == [0, 1, 2]
    for epoch, indices in seen.items():
        assert sorted(indices) == expected, f"epoch {epoch}: not every sample exactly once"
    assert len({tuple(v) for v in seen.values()}) == 3  # a new order every epoch


def _plan_order(path: Path, seed: int, epoch: int) -> list[int]:
    """The sample indices epoch ``epoch`` of Sequence(seed=seed, batch_size=8) holds, in order."""
    import shardfit

    reader = shardfit.open_split(path, "train")
    order = shardfit.epoch_order(
        reader.count, reader.shard_size, seed=seed, epoch=epoch, shuffle=True, window=4
    )
    return stored_index(path, "train")[order].tolist()


@pytest.mark.parametrize("mode", ["in-process", "threads", "processes", "stream", "stream-threads"])
def test_fit_with_keras_default_shuffle_trains_on_shardfits_plan_in_order(store, mode: str) -> None:
    # fit's default shuffle=True draws a batch order from Python's global random, unseeded:
    # two fits in one process draw two different ones. shardfit serves its own plan anyway.
    path, _ = store
    runs = [
        fit_and_record(Sequence(path, batch_size=8, seed=4, **MODES[mode]), epochs=3, shuffle=s)
        for s in (None, None, False)
    ]
    assert runs[0] == runs[1] == runs[2]
    assert [runs[0][e] for e in range(3)] == [_plan_order(path, 4, e) for e in range(3)]


@pytest.mark.parametrize("mode", list(MODES))
def test_same_seed_repeats_and_a_resumed_run_matches(store, mode: str) -> None:
    path, _ = store
    position_to_index = stored_index(path, "train")

    def plan(epoch: int) -> list[int]:
        s = Sequence(path, batch_size=8, seed=7)
        return position_to_index[
            np.concatenate([s.sample_indices(i, epoch) for i in range(len(s))])
        ].tolist()

    full = fit_and_record(
        Sequence(path, batch_size=8, seed=7, **MODES[mode]), epochs=3, shuffle=False
    )
    again = fit_and_record(
        Sequence(path, batch_size=8, seed=7, **MODES[mode]), epochs=3, shuffle=False
    )
    assert full == again
    assert [full[e] for e in range(3)] == [plan(e) for e in range(3)]
    assert full[0] != full[1] != full[2]
    resumed = fit_and_record(
        Sequence(path, batch_size=8, seed=7, initial_epoch=2, **MODES[mode]),
        epochs=3,
        initial_epoch=2,
        shuffle=False,
    )
    assert resumed[2] == full[2]


def test_fit_with_validation_class_weight_and_callbacks(store, tmp_path: Path) -> None:
    path, _ = store
    train = Sequence(path, batch_size=16, workers=2, use_multiprocessing=True)
    val = Sequence(path, split="val", batch_size=32, shuffle=False)
    inputs = keras.Input((8, 8, 3))
    out = keras.layers.Dense(3)(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, out)
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    history = model.fit(
        train,
        validation_data=val,
        epochs=3,
        verbose=0,
        class_weight={0: 1.0, 1: 2.0, 2: 1.0},
        callbacks=[
            keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras")),
            keras.callbacks.EarlyStopping(patience=5),
            keras.callbacks.ReduceLROnPlateau(patience=1),
            keras.callbacks.TensorBoard(str(tmp_path / "tb")),
        ],
    )
    assert len(history.history["val_loss"]) == 3
    assert (tmp_path / "m.keras").exists()


def test_train_on_batch_loop(store) -> None:
    path, _ = store
    seq = Sequence(path, batch_size=16, label_mode="int")
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for _ in range(2):
        batches = 0
        for x, y in seq:
            model.train_on_batch(x, y)
            batches += 1
        assert batches == len(seq)
    assert seq.epoch == 1


@pytest.mark.parametrize("mode", ["in-process", "processes"])
def test_a_corrupt_shard_fails_fit_with_the_clear_error(store, tmp_path: Path, mode: str) -> None:
    path = _copy_store(store[0], tmp_path / "copy.zarr")
    shard = _corrupt(path, "checksum")
    seq = Sequence(path, batch_size=8, **MODES[mode])
    model = _recording_model(3)
    with pytest.raises(DatasetFormatError, match="fails its index checksum") as err:
        model.fit(seq, epochs=1, verbose=0)
    assert str(shard) in str(err.value)


_START_METHOD_CHILD = """
import json, multiprocessing as mp, sys
mp.set_start_method(sys.argv[1], force=True)  # first thing: Keras keeps fork-context globals
sys.path.insert(0, sys.argv[3])
from test_sequence import MODES, fit_and_record
from shardfit import Sequence
if __name__ == "__main__":
    seq = Sequence(sys.argv[2], batch_size=8, seed=7, **MODES["processes"])
    print("SEEN " + json.dumps(fit_and_record(seq, epochs=2, shuffle=False)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("io", ["stream", "pread"])
def test_a_fit_stopped_early_does_not_hang_the_exit(store, io: str) -> None:
    # TensorFlow's generator thread is inside __getitem__ when fit stops; if it still is when
    # Python finalizes, TensorFlow waits for it forever (seen 1 run in 6 before the fix)
    path, _ = store
    child = Path(__file__).with_name("_exit_child.py")
    for _ in range(3):
        proc = subprocess.run(
            [sys.executable, str(child), str(path), io],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0 and "fit returned" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_processes_under_other_start_methods(store, method: str, tmp_path: Path) -> None:
    # A fresh interpreter: Keras cannot switch start methods once it has used process workers.
    path, _ = store
    script = tmp_path / "child.py"
    script.write_text(_START_METHOD_CHILD)
    proc = subprocess.run(
        [sys.executable, str(script), method, str(path), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SEEN "))
    seen = {int(k): v for k, v in json.loads(line[5:]).items()}
    expected = sorted(stored_index(path, "train").tolist())
    for indices in seen.values():
        assert sorted(indices) == expected
    full = fit_and_record(Sequence(path, batch_size=8, seed=7), epochs=2, shuffle=False)
    assert seen == full


# -- the epoch bookkeeping against Keras's call patterns, step by step --------------------------


# Keras's probes before an epoch and TensorFlow's prefetch across the hooks: replayed on the
# cursor with the hooks as Keras calls them (tests/test_order.py); a hook called by a user's
# own loop means what it says (tests/test_calls.py).


class _HookCounter(keras.utils.PyDataset):  # type: ignore[misc]
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.ends = 0

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return np.zeros((2, 3), np.float32), np.zeros((2,), np.float32)

    def on_epoch_end(self) -> None:
        self.ends += 1


class _CallRecorder(keras.utils.PyDataset):  # type: ignore[misc]
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.log: list[object] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        self.log.append(int(i))
        return np.full((2, 3), i, np.float32), np.zeros((2,), np.float32)

    def on_epoch_begin(self) -> None:
        self.log.append("begin")

    def on_epoch_end(self) -> None:
        self.log.append("end")


def test_keras_asks_for_every_trained_batch_within_its_epoch_hooks() -> None:
    # EpochCursor's stream relies on this Keras 3.15 behaviour for a PyDataset without workers
    # (what shardfit shows Keras): outside on_epoch_begin .. on_epoch_end, only the tensor
    # signature probe (batches 0 and 1, before the first epoch); within, one request per
    # batch trained, none early for the next epoch (TensorFlow's prefetch starts on the
    # epoch's first step). Pinned with a compiled model and many batches.
    data = _CallRecorder(40)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile("sgd", "mse")
    model.fit(data, epochs=3, verbose=0)
    log = data.log
    assert log[:4] == [0, 1, "end", "begin"]
    hooks = [k for k, e in enumerate(log) if e in ("begin", "end")]
    between = [(log[i], log[i + 1 : j]) for i, j in itertools.pairwise(hooks)]
    epochs = [requests for hook, requests in between if hook == "begin"]
    assert len(epochs) == 3
    for requests in epochs:
        assert sorted(requests) == list(range(40))  # type: ignore[type-var]
    assert all(not requests for hook, requests in between if hook == "end")
    assert hooks[-1] == len(log) - 1 and log[-1] == "end"


@pytest.mark.parametrize("mode", ["in-process", "threads", "processes", "keras-pool"])
def test_keras_calls_on_epoch_end_once_more_than_there_are_epochs(mode: str) -> None:
    # The process-mode bookkeeping relies on this Keras 3.15 behaviour; pin it.
    data = _HookCounter(**{k: v for k, v in MODES[mode].items() if k != "shared_memory"})
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile("sgd", "mse")
    model.fit(data, epochs=3, verbose=0)
    assert data.ends == 4
