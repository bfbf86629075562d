"""The ``tf.data`` pipeline Keras's TensorFlow backend builds around a ``Sequence``, without
tf.data's autotuning.

Under TensorFlow, ``model.fit(seq)`` wraps a ``PyDataset`` in
``tf.data.Dataset.from_generator(...).prefetch(tf.data.AUTOTUNE)`` (Keras 3's
``PyDatasetAdapter.get_tf_dataset``) and makes a new iterator of it at the end of every epoch.
Each iterator starts tf.data's autotuning thread, which sleeps between tunings for a period that
doubles as the iterator ages; destroying the old iterator (at the next epoch's first step, or
whenever the garbage collector reaches it) waits for that thread to wake. Measured with
TensorFlow 2.21 and Keras 3.15, 2 cores: ``fit`` of any ``PyDataset`` (a constant batch and a
sleep, no shardfit) stalled 3.7 s in 2 of 12 epochs of 6.5 s, and shardfit's 12 GB
out-of-RAM ``fit`` 3.7-6.7 s in 6 of 26 runs, with every thread of the process idle (gdb: the
main thread in ``RootDataset::Iterator::~Iterator`` waiting for the thread in
``Model::OptimizeLoop``); with autotuning off, none in 15 epochs nor in 8 runs on the store, and
the loader benchmark's out-of-RAM ``fit`` row went from 1,727 to 2,936 img/s a whole epoch. A
``Sequence`` reads ahead in threads and processes of its own, so autotuning has nothing to
tune: it is turned off for the datasets Keras makes of a ``Sequence`` (the path through
Keras's own worker pool, ``shared_memory=False``, is already built that way by Keras).

This wraps one Keras method, for shardfit's ``Sequence`` only; if a Keras release renames it,
nothing is wrapped and a debug line says so.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("shardfit")

_INSTALLED = False


def install(owns: Callable[[object], bool]) -> None:
    """Turn tf.data autotuning off in the datasets Keras builds of datasets for which
    ``owns(py_dataset)`` is true. Idempotent."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    try:
        from keras.src.trainers.data_adapters import py_dataset_adapter
    except ImportError:  # pragma: no cover - a Keras without this module
        log.debug("keras has no py_dataset_adapter: tf.data autotuning left as Keras sets it")
        return
    adapter = getattr(py_dataset_adapter, "PyDatasetAdapter", None)
    original = getattr(adapter, "get_tf_dataset", None)
    if adapter is None or original is None:  # pragma: no cover - a renamed Keras internal
        log.debug("keras has no PyDatasetAdapter.get_tf_dataset: autotuning left as Keras sets it")
        return

    @functools.wraps(original)
    def get_tf_dataset(self: Any) -> Any:
        dataset = original(self)
        if not owns(getattr(self, "py_dataset", None)):
            return dataset
        import tensorflow as tf

        options = tf.data.Options()
        options.autotune.enabled = False
        return dataset.with_options(options)

    adapter.get_tf_dataset = get_tf_dataset
