"""One worker of a two-worker ``MultiWorkerMirroredStrategy`` run, for tests/test_data_parallel.py.

Usage: ``TF_CONFIG=... python _mwms_child.py STORE MODE OUT``. Trains one model with the other
worker (gradients all-reduced over loopback), on this worker's part of every global batch of 8
(``num_shards=2`` and this task's ``shard_index``, from ``shardfit.cluster_shard()``), 2 epochs;
writes to OUT ``{"steps": {epoch: [[index encoded by each sample] for each step]},
"weights": [...]}``: what the replica was fed, and the final weights, which the two workers must
agree on.

A training loop of its own (``strategy.run``): Keras 3's ``fit`` under this strategy fails in
Keras before its first batch, for any dataset (keras-team/keras#20585; seen with 3.15).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

import shardfit

MODES = {
    "in-process": {},
    "threads": {"workers": 2},
    "processes": {"workers": 2, "use_multiprocessing": True},
}


def main() -> None:
    store, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    share = shardfit.cluster_shard()  # from TF_CONFIG: {"num_shards": 2, "shard_index": task}
    task = share["shard_index"]
    seq = shardfit.Sequence(store, batch_size=4, seed=3, **share, **MODES[mode])
    spec = (
        tf.TensorSpec((None, 8, 8, 3), tf.float32),
        tf.TensorSpec((None,), tf.int32),
    )

    def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
        if (context.input_pipeline_id, context.num_input_pipelines) != (task, 2):
            raise RuntimeError(f"input context {context} is not task {task} of 2")
        return tf.data.Dataset.from_generator(
            lambda: (seq[b] for b in range(len(seq))), output_signature=spec
        )

    batches = strategy.distribute_datasets_from_function(per_worker)
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)]
        )
        optimizer = keras.optimizers.SGD(0.1)

    @tf.function
    def step(batch):  # type: ignore[no-untyped-def]
        def replica(x, y):  # type: ignore[no-untyped-def]
            with tf.GradientTape() as tape:
                loss = keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
                loss = tf.reduce_sum(loss) / 8.0  # the global batch
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return x[:, 0, 0, :]

        return strategy.run(replica, args=batch)

    steps: dict[str, list[list[int]]] = {}
    for epoch in range(2):
        seen = steps[str(epoch)] = []
        for batch in batches:
            px = strategy.experimental_local_results(step(batch))[0].numpy()
            seen.append(
                (np.rint(px[:, 0] * 255) + 256 * np.rint(px[:, 1] * 255)).astype(int).tolist()
            )
        seq.on_epoch_end()
    weights = [w.tolist() for w in model.get_weights()]
    with open(out, "w") as f:
        json.dump({"steps": steps, "weights": weights, "batches": len(seq)}, f)
    seq.close()


if __name__ == "__main__":
    main()
