"""Every way people call Keras sees the samples it should: predict and evaluate in order,
steps_per_epoch, early-stopping loops, fit(initial_epoch=k); and the Keras behaviour this
relies on (which call runs, read from the caller's stack), pinned."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from test_sequence import MODES, fit_and_record, store, stored_index  # noqa: F401 (fixture)

import shardfit
from shardfit import InvalidOptionError

keras = pytest.importorskip("keras")
from shardfit import Sequence  # noqa: E402
from shardfit.keras._calls import keras_call  # noqa: E402

CALL_MODES = ["in-process", "threads", "processes"]


def decoding_model(num_classes: int = 3):  # type: ignore[no-untyped-def]
    """A model whose outputs are (index encoded in the image, one-hot logits of its label)."""
    inputs = keras.Input((8, 8, 3))
    px = keras.layers.Lambda(lambda x: x[:, 0, 0, :] * 255.0)(inputs)
    index = keras.layers.Lambda(lambda p: p[:, :1] + 256.0 * p[:, 1:2])(px)
    label = keras.layers.Lambda(lambda p: p[:, 2:3] / 60.0)(px)
    logits = keras.layers.Lambda(
        lambda lab: -((lab - keras.ops.arange(num_classes, dtype="float32")) ** 2) * 100.0
    )(label)
    model = keras.Model(inputs, [index, logits])
    return model


def predicted(model, seq) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    index, logits = model.predict(seq, verbose=0)
    return np.rint(index[:, 0]).astype(int), np.argmax(logits, axis=1)


# -- predict and evaluate ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", CALL_MODES)
def test_predict_on_another_split_gives_the_stores_order(store, mode: str) -> None:  # noqa: F811
    path, _ = store
    seq = Sequence(path, "val", batch_size=4, **MODES[mode])
    assert seq.shuffle is False  # only "train" shuffles by default
    model = decoding_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no shuffled-predict warning
        index, label = predicted(model, seq)
        again, _ = predicted(model, seq)
    assert index.tolist() == stored_index(path, "val").tolist() == again.tolist()
    assert np.mean(label == seq.labels) == 1.0  # scores against seq.labels
    seq.close()


@pytest.mark.parametrize("mode", CALL_MODES)
def test_predict_on_a_shuffled_sequence_warns_and_its_labels_score(store, mode: str) -> None:  # noqa: F811
    path, _ = store
    seq = Sequence(path, batch_size=8, seed=5, **MODES[mode])
    model = decoding_model()
    with pytest.warns(UserWarning, match="predict on a shuffled shardfit.Sequence"):
        index, label = predicted(model, seq)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # once per Sequence
        again, _ = predicted(model, seq)
    plan = stored_index(path, "train")[
        shardfit.epoch_order(
            seq.num_samples, seq._reader.shard_size, seed=5, epoch=0, shuffle=True, window=4
        )
    ]
    assert index.tolist() == plan.tolist() == again.tolist()  # epoch 0's plan, each time
    assert np.mean(label == seq.labels) == 1.0
    assert seq.epoch == 0  # inference leaves the training stream where it stands
    seq.close()


@pytest.mark.parametrize("mode", CALL_MODES)
def test_evaluate_between_fits_does_not_move_the_plan(store, mode: str) -> None:  # noqa: F811
    path, _ = store
    straight = fit_and_record(Sequence(path, batch_size=8, seed=2, **MODES[mode]), epochs=2)
    seq = Sequence(path, batch_size=8, seed=2, **MODES[mode])
    first = fit_and_record(seq, epochs=1)
    model = decoding_model()
    model.compile(loss=[None, keras.losses.SparseCategoricalCrossentropy(from_logits=True)])
    model.evaluate(seq, verbose=0)
    second = fit_and_record(seq, epochs=2, initial_epoch=1)
    assert first[0] == straight[0] and second[1] == straight[1]
    seq.close()


# -- steps_per_epoch and early stops -----------------------------------------------------------


def _plan(path: Path, seed: int, epochs: int) -> list[int]:
    reader = shardfit.open_split(path, "train")
    index = stored_index(path, "train")
    return [
        int(i)
        for e in range(epochs)
        for i in index[
            shardfit.epoch_order(
                reader.count, reader.shard_size, seed=seed, epoch=e, shuffle=True, window=4
            )
        ]
    ]


@pytest.mark.parametrize("mode", CALL_MODES)
@pytest.mark.parametrize("steps", [4, 14])
def test_steps_per_epoch_walks_on_through_the_plan(store, mode: str, steps: int) -> None:  # noqa: F811
    path, _ = store
    seq = Sequence(path, batch_size=6, seed=9, **MODES[mode])  # 60 samples: 10 batches
    assert len(seq) == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # never "Your input ran out of data"
        seen = fit_and_record(seq, epochs=3, steps_per_epoch=steps)
    trained = [i for e in range(3) for i in seen[e]]
    assert len(trained) == 3 * steps * 6
    assert trained == _plan(path, 9, 5)[: len(trained)]  # every sample once per pass
    seq.close()


@pytest.mark.parametrize("mode", CALL_MODES)
def test_an_early_stopping_train_on_batch_loop_starts_a_new_epoch(store, mode: str) -> None:  # noqa: F811
    path, _ = store
    seq = Sequence(path, batch_size=6, seed=4, **MODES[mode])
    model = decoding_model()
    model.compile(loss=[None, keras.losses.SparseCategoricalCrossentropy(from_logits=True)])
    index = stored_index(path, "train")
    for epoch in range(3):
        for i in range(len(seq)):
            x, y = seq[i]
            model.train_on_batch(x, (np.zeros(len(y)), y))
            want = index[seq.sample_indices(i, epoch)]
            got = np.rint(x[:, 0, 0, 0] * 255) + 256 * np.rint(x[:, 0, 0, 1] * 255)
            assert got.astype(int).tolist() == want.tolist()
            if i == 2:
                break  # stop the epoch early
        seq.on_epoch_end()
        assert seq.epoch == epoch + 1
    seq.close()


# -- resume without bookkeeping ----------------------------------------------------------------


@pytest.mark.parametrize("mode", CALL_MODES)
def test_fit_initial_epoch_serves_that_epochs_plan(store, mode: str) -> None:  # noqa: F811
    path, _ = store
    straight = fit_and_record(Sequence(path, batch_size=8, seed=3, **MODES[mode]), epochs=3)
    resumed = fit_and_record(
        Sequence(path, batch_size=8, seed=3, **MODES[mode]), epochs=3, initial_epoch=1
    )
    assert resumed[1] == straight[1] and resumed[2] == straight[2]


def test_fit_initial_epoch_against_a_sequence_mid_epoch_is_an_error(store) -> None:  # noqa: F811
    path, _ = store
    seq = Sequence(path, batch_size=8, seed=3)
    seq.resume_at(0, 3)
    with pytest.raises(InvalidOptionError, match=r"fit\(initial_epoch=2\) but the Sequence"):
        fit_and_record(seq, epochs=3, initial_epoch=2)


# -- the Keras behaviour relied on -------------------------------------------------------------


class _Recorder(keras.utils.PyDataset):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, object]] = []

    def __len__(self) -> int:
        return 4

    @property
    def num_batches(self) -> int:
        self.calls.append(("len", keras_call()))
        return 4

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return np.zeros((2, 3), "float32"), np.zeros((2,), "float32")

    def on_epoch_begin(self) -> None:
        self.calls.append(("begin", keras_call()))

    def on_epoch_end(self) -> None:
        self.calls.append(("end", keras_call()))


def test_keras_runs_hooks_and_reads_the_length_on_the_calling_thread() -> None:
    # shardfit reads which call runs, and its arguments, from the stack there (_calls.py)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile("sgd", "mse")
    data = _Recorder()
    model.fit(data, epochs=3, initial_epoch=1, steps_per_epoch=2, verbose=0)
    begins = [c for hook, c in data.calls if hook == "begin"]
    assert [(c.kind, c.epoch, c.initial_epoch, c.steps) for c in begins] == [
        ("fit", 1, 1, 2),
        ("fit", 2, 1, 2),
    ]
    lengths = [c for hook, c in data.calls if hook == "len"]
    # read first on the calling thread, where Keras makes the call's iterator; later reads
    # may come from TensorFlow's generator thread (no call there: the first answer is kept)
    assert lengths[0] is not None and lengths[0].kind == "fit" and lengths[0].new_iterator
    for call, kind in ((model.predict, "predict"), (model.evaluate, "evaluate")):
        data.calls.clear()
        call(data, steps=3, verbose=0)
        assert {(h, c.kind, c.steps) for h, c in data.calls if h != "len"} == {  # type: ignore[union-attr]
            ("begin", kind, 3),
            ("end", kind, 3),
        }
    assert keras_call() is None


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="the tf.data pipeline is TensorFlow's"
)
@pytest.mark.parametrize("mode", [*CALL_MODES, "keras-pool"])
def test_keras_builds_a_sequences_tf_dataset_without_autotuning(store, mode: str) -> None:  # noqa: F811
    # tf.data's autotuning thread stalls fit for seconds between epochs (_tf_pipeline.py):
    # the dataset fit makes of a Sequence has it off; one of another PyDataset is left alone
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    path, _ = store
    seq = Sequence(path, batch_size=4, **MODES[mode])
    ours = PyDatasetAdapter(seq, shuffle=True).get_tf_dataset()
    assert ours.options().autotune.enabled is False
    theirs = PyDatasetAdapter(_Recorder(), shuffle=True).get_tf_dataset()
    assert theirs.options().autotune.enabled is not False
    seq.close()
