"""This process's share of data-parallel training, read from ``TF_CONFIG`` (how
``tf.distribute``'s multi-worker strategies learn the cluster), for
``Sequence(..., **cluster_shard())``. Framework-free: ``TF_CONFIG`` is plain JSON.
"""

from __future__ import annotations

import json
import os
from typing import Any

from shardfit.errors import InvalidOptionError

__all__ = ["cluster_shard"]

#: Task types that train on a share of the data, in tf.distribute's order of ids: the chief
#: (at most one) is 0, then the workers (``multi_worker_util.id_in_cluster``).
_TRAINING_TASKS = ("chief", "worker")


def cluster_shard(tf_config: str | None = None, *, input_context: Any = None) -> dict[str, int]:
    """``{"num_shards": N, "shard_index": i}`` for this process: from ``input_context`` when
    given, else from ``tf_config`` (by default the ``TF_CONFIG`` environment variable) when
    set, else from JAX's processes when Keras's distribution API is in use under JAX (a
    ``keras.distribution`` set with ``jax.process_count() > 1``), else one worker
    (``{"num_shards": 1, "shard_index": 0}``).

    ``input_context`` is a ``tf.distribute.InputContext``, as the strategy passes it to the
    function given to ``distribute_datasets_from_function``: its ``num_input_pipelines`` and
    ``input_pipeline_id``. Under ``TF_CONFIG``, the workers are the cluster's ``chief`` and
    ``worker`` tasks, numbered as ``tf.distribute`` numbers its input pipelines (the chief
    first).

    Raises:
        InvalidOptionError: ``TF_CONFIG`` is not such JSON, or names a task that trains on no
            share of the data (an evaluator, a parameter server); ``input_context`` has no
            such attributes.
    """
    if input_context is not None:
        n = getattr(input_context, "num_input_pipelines", None)
        i = getattr(input_context, "input_pipeline_id", None)
        if not isinstance(n, int) or not isinstance(i, int) or not 0 <= i < n:
            raise InvalidOptionError(
                "input_context must be a tf.distribute.InputContext (num_input_pipelines, "
                f"input_pipeline_id). Received: {input_context!r}"
            )
        return {"num_shards": n, "shard_index": i}
    text = os.environ.get("TF_CONFIG") if tf_config is None else tf_config
    if text:
        return _from_tf_config(text)
    jax = _jax_processes()
    if jax is not None:
        return jax
    return {"num_shards": 1, "shard_index": 0}


def _jax_processes() -> dict[str, int] | None:
    """JAX's process count and index, when Keras's distribution API runs on several JAX
    processes (each process feeds its own devices: Keras's ``DataParallel`` splits a batch
    across the local devices, and each process must bring its own share of the global
    batch). ``None`` when Keras's JAX backend is not loaded or no distribution is set."""
    import sys

    keras_distribution = sys.modules.get("keras.distribution")
    jax = sys.modules.get("jax")
    if keras_distribution is None or jax is None:
        return None
    try:
        if keras_distribution.distribution() is None:
            return None
        count, index = int(jax.process_count()), int(jax.process_index())
    except Exception:  # another backend, or JAX not initialised for several processes
        return None
    return {"num_shards": count, "shard_index": index} if count > 1 else None


def _from_tf_config(text: str) -> dict[str, int]:
    try:
        config: Any = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        kind, index = task["type"], task["index"]
        counts = {t: len(cluster.get(t, [])) for t in _TRAINING_TASKS}
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise InvalidOptionError(
            'TF_CONFIG must be JSON like {"cluster": {"worker": [...]}, "task": {"type": '
            f'"worker", "index": 0}}}} ({type(err).__name__}: {err}). Received: {text[:200]!r}'
        ) from None
    if kind not in _TRAINING_TASKS:
        raise InvalidOptionError(
            f"TF_CONFIG names a {kind!r} task, which trains on no share of the data: give it "
            f"no num_shards (or a Sequence of its own). Received: task {task!r}"
        )
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < counts[kind]:
        raise InvalidOptionError(
            f"TF_CONFIG's task index must be in [0, {counts[kind]}) for its {counts[kind]} "
            f"{kind} task(s). Received: task {task!r}"
        )
    shard = index if kind == "chief" else counts["chief"] + index
    return {"num_shards": counts["chief"] + counts["worker"], "shard_index": shard}
