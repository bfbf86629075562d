"""One ``fit`` under the Keras backend named by ``KERAS_BACKEND``, for tests/test_backends.py.

Usage: ``KERAS_BACKEND=jax python _backend_child.py STORE MODE``. Trains 2 epochs with fit's
defaults (``shuffle=True``) on a fresh model (so Keras builds it from the data first, as it does
under JAX and PyTorch) and prints one JSON line: ``{epoch: [index encoded by each trained
sample, in training order]}``, recorded by a metric (run eagerly, so it sees concrete values
under every backend), and the Sequence's epoch after fit.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import shardfit

MODES = {
    "in-process": {},
    "threads": {"workers": 2},
    "processes": {"workers": 2, "use_multiprocessing": True},
}


class Recorder(keras.metrics.Metric):  # type: ignore[misc]
    """Keeps the index each trained sample encodes (the model's last output column)."""

    def __init__(self) -> None:
        super().__init__(name="recorder")
        self.seen: list[list[int]] = []

    def update_state(self, y_true, y_pred, sample_weight=None):  # type: ignore[no-untyped-def]
        try:
            col = keras.ops.convert_to_numpy(y_pred)[:, -1]
        except Exception:  # traced, not run: Keras building the metric's state (JAX)
            return
        self.seen.append(np.rint(col).astype(int).tolist())

    def result(self):  # type: ignore[no-untyped-def]
        return keras.ops.convert_to_tensor(0.0)

    def reset_state(self) -> None:  # Keras resets metrics every epoch; the record stays
        pass


def _zero_copy(seq: shardfit.Sequence) -> bool | None:
    """Whether the tensor this backend's ``fit`` trains on shares the memory of the batch
    shardfit hands over (a view of a shared-memory slot with worker processes), converted the
    way Keras converts it for ``fit``; ``None`` under TensorFlow (its ``from_generator`` path
    is checked by tests/test_transport.py)."""
    x = seq[0][0]
    address = x.__array_interface__["data"][0]
    backend = keras.backend.backend()
    if backend == "torch":  # Keras's torch adapter converts each batch with this
        from keras.src.backend.torch.core import convert_to_tensor

        return bool(convert_to_tensor(x).data_ptr() == address)
    if backend == "jax":  # Keras's JAX trainer puts each numpy batch on the device thus
        import jax

        return bool(jax.device_put(x).unsafe_buffer_pointer() == address)
    return None


def main() -> None:
    store, mode = sys.argv[1:3]
    seq = shardfit.Sequence(store, batch_size=8, seed=6, max_queue_size=3, **MODES[mode])
    inputs = keras.Input((8, 8, 3))
    px = keras.layers.Lambda(lambda x: x[:, 0, 0, :2] * 255.0)(inputs)
    index = keras.layers.Lambda(lambda p: p[:, :1] + 256.0 * p[:, 1:2])(px)
    logits = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, keras.layers.Concatenate()([logits, index]))
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    recorder = Recorder()
    model.compile(
        optimizer="sgd",
        loss=lambda y, p: sce(y, p[:, :3]),
        metrics=[recorder],
        run_eagerly=True,
    )
    starts: dict[int, int] = {}

    class Marks(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch, logs=None):  # type: ignore[no-untyped-def]
            starts[epoch] = len(recorder.seen)

    model.fit(seq, epochs=2, verbose=0, callbacks=[Marks()])
    bounds = [starts[0], starts[1], len(recorder.seen)]
    out = {
        "backend": keras.backend.backend(),
        "epochs": {
            str(e): [i for batch in recorder.seen[bounds[e] : bounds[e + 1]] for i in batch]
            for e in range(2)
        },
        "epoch_after": seq.epoch,
    }
    if mode == "processes":
        out["transport"] = list(seq.transport_stats or (0, 0))
        out["zero_copy"] = _zero_copy(seq)
    seq.close()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
