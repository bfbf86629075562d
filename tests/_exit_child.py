"""A fit that stops early while TensorFlow's generator thread is inside ``__getitem__``, then
the interpreter exits: for tests/test_sequence.py (it must not hang at exit).

Usage: ``python _exit_child.py STORE IO``.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import shardfit


def slow(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    time.sleep(0.2)  # every batch request takes a while: exit finds one under way
    return images


def main() -> None:
    store, io = sys.argv[1:3]
    seq = shardfit.Sequence(store, batch_size=4, io=io, transform=slow)
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    class Stop(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
            if batch == 1:
                self.model.stop_training = True

    model.fit(seq, epochs=2, verbose=0, callbacks=[Stop()])
    print("fit returned", flush=True)


if __name__ == "__main__":
    main()
