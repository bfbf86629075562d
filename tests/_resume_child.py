"""One training run for tests/test_resume.py, in a process of its own (it may kill itself).

Usage: ``python _resume_child.py STORE MODE BACKUP_DIR LOG KILL_AT``. Trains 3 epochs with
``shardfit.BackupAndRestore(BACKUP_DIR, seq, save_freq=5)``; writes one line per trained batch to
LOG (the indices its images encode), then the final weights to ``LOG.weights.npy``; with
``KILL_AT >= 0``, kills itself with SIGKILL right after that global batch (0-based) is trained.
"""

from __future__ import annotations

import os
import signal
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
BATCH = 4
EPOCHS = 3


def main() -> None:
    store, mode, backup, log_path, kill_at = sys.argv[1:6]
    seq = shardfit.Sequence(store, batch_size=BATCH, seed=11, max_queue_size=4, **MODES[mode])
    log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run

    class Recorder(keras.Model):  # type: ignore[misc]
        def train_step(self, data):  # type: ignore[no-untyped-def]
            px = np.asarray(data[0])[:, 0, 0, :2]
            index = np.rint(px[:, 0] * 255) + 256 * np.rint(px[:, 1] * 255)
            log.write(" ".join(str(int(i)) for i in index) + "\n")
            log.flush()  # the kernel keeps it through a SIGKILL
            return super().train_step(data)

    keras.utils.set_random_seed(0)  # the same initial weights in every run
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    model = Recorder(inputs, keras.layers.Dense(3)(x))
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=True,
    )

    class Kill(keras.callbacks.Callback):  # type: ignore[misc]
        step = 0

        def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
            if self.step == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
            self.step += 1

    backup_cb = shardfit.BackupAndRestore(backup, seq, save_freq=5)
    model.fit(seq, epochs=EPOCHS, verbose=0, callbacks=[backup_cb, Kill()])
    np.save(log_path + ".weights.npy", np.concatenate([w.ravel() for w in model.get_weights()]))
    seq.close()


if __name__ == "__main__":
    main()
