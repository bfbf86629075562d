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


def cluster_shard(tf_config: str | None = None) -> dict[str, int]:
    """``{"num_shards": N, "shard_index": i}`` for this process: from ``tf_config`` (by default
    the ``TF_CONFIG`` environment variable) when set, else one worker (``{"num_shards": 1,
    "shard_index": 0}``).

    Under ``TF_CONFIG``, the workers are the cluster's ``chief`` and ``worker`` tasks, numbered
    as ``tf.distribute`` numbers its input pipelines (the chief first).

    Raises:
        InvalidOptionError: ``TF_CONFIG`` is not such JSON, or names a task that trains on no
            share of the data (an evaluator, a parameter server).
    """
    text = os.environ.get("TF_CONFIG") if tf_config is None else tf_config
    if text:
        return _from_tf_config(text)
    return {"num_shards": 1, "shard_index": 0}


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
