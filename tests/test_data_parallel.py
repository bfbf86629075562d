"""Data-parallel shards: ``num_shards`` workers, each with a Sequence of its own, share every
epoch; the global batch at each step is the same set of samples for 1, 2 or 4 workers with the
same seed and global batch size."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from test_sequence import MODES, fit_and_record, store, stored_index  # noqa: F401 (fixture)

import shardfit
from shardfit import (
    InvalidOptionError,
    Sequence,
    SequenceOptions,
    batch_count,
    batch_slice,
    epoch_order,
)

WORKER_COUNTS = (1, 2, 4)


def _global_batches(
    num_samples: int, global_batch: int, num_shards: int, epoch: int, drop: bool = False
) -> list[list[list[int]]]:
    """For each step of the epoch, each worker's batch (lists of sample indices)."""
    order = epoch_order(num_samples, 10, seed=7, epoch=epoch, shuffle=True, window=3)
    per = global_batch // num_shards
    steps = batch_count(num_samples, per, drop, num_shards)
    return [
        [
            order[batch_slice(num_samples, per, b, num_shards=num_shards, shard_index=i)].tolist()
            for i in range(num_shards)
        ]
        for b in range(steps)
    ]


@pytest.mark.parametrize("num_samples", [160, 163, 170])
@pytest.mark.parametrize("epoch", [0, 1])
def test_the_global_batch_at_each_step_is_the_same_for_1_2_and_4_workers(
    num_samples: int, epoch: int
) -> None:
    # 160: whole global batches; 163 and 170: a last, smaller one (3 samples: fewer than 4
    # workers; 10: split 3/2/3/2 among 4, 5/5 between 2)
    runs = {n: _global_batches(num_samples, 16, n, epoch) for n in WORKER_COUNTS}
    one = [set(step[0]) for step in runs[1]]
    for n, steps in runs.items():
        for step in steps:
            sizes = [len(part) for part in step]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1  # every worker gets some
            union = set().union(*map(set, step))
            assert len(union) == sum(sizes)  # disjoint
        unions = [set().union(*map(set, step)) for step in steps]
        if num_samples % 16 >= n or num_samples % 16 == 0:
            assert unions == one  # the same global batch at every step
            assert sorted(s for u in unions for s in u) == list(range(num_samples))
        else:  # the last few samples, fewer than the workers, wait for another epoch
            assert unions == one[:-1]


def test_the_workers_parts_tile_each_global_batch_and_none_is_empty() -> None:
    # batch_count is one number for all workers; what must hold is that every step's parts,
    # worker by worker, are non-empty and lie end to end over the global batch
    for num_samples in range(1, 90):
        for n in WORKER_COUNTS:
            for drop in (False, True):
                steps = batch_count(num_samples, 4, drop, n)
                covered = 0
                for b in range(steps):
                    parts = [
                        batch_slice(num_samples, 4, b, num_shards=n, shard_index=i)
                        for i in range(n)
                    ]
                    assert all(p.stop > p.start for p in parts)
                    assert parts[0].start == b * 4 * n == covered
                    assert all(a.stop == c.start for a, c in itertools.pairwise(parts))
                    covered = parts[-1].stop
                rest = num_samples - covered  # held over: a partial batch dropped or too small
                assert rest < 4 * n if drop else rest < n


def test_one_worker_is_the_plain_plan() -> None:
    assert batch_count(10, 4, False, 1) == batch_count(10, 4, False) == 3
    assert [batch_slice(10, 4, b) for b in range(3)] == [slice(0, 4), slice(4, 8), slice(8, 10)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_shards": 0}, r"num_shards must be an int >= 1. Received: 0"),
        ({"num_shards": 2, "shard_index": 2}, r"shard_index must be in \[0, num_shards\)"),
        ({"shard_index": -1}, r"shard_index must be an int >= 0. Received: -1"),
        ({"num_shards": 2, "io": "stream"}, r"io='stream' .* num_shards=2"),
    ],
)
def test_bad_shard_options_name_the_argument(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        SequenceOptions(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["in-process", "threads", "processes"])
def test_workers_fit_disjoint_parts_of_the_same_global_batches(store, mode: str) -> None:  # noqa: F811
    path, _ = store
    index = stored_index(path, "train")
    # one worker with the global batch of 8, and two with 4 each: the same samples per step
    alone = Sequence(path, batch_size=8, seed=3, **MODES[mode])
    plan = [[alone.sample_indices(b, epoch=e).tolist() for b in range(len(alone))] for e in (0, 1)]
    alone.close()
    seen = []
    for i in range(2):
        seq = Sequence(path, batch_size=4, seed=3, num_shards=2, shard_index=i, **MODES[mode])
        assert len(seq) == len(plan[0])
        seen.append(fit_and_record(seq, epochs=2))
        seq.close()
    for e in (0, 1):
        steps = [index[s].tolist() for s in plan[e]]
        for b, step in enumerate(steps):
            parts = [seen[i][e][4 * b : 4 * b + 4] for i in range(2)]
            assert not set(parts[0]) & set(parts[1])
            assert sorted(parts[0] + parts[1]) == sorted(step)


def test_a_workers_labels_are_its_samples(store) -> None:  # noqa: F811
    path, _ = store
    seq = Sequence(path, batch_size=4, seed=1, num_shards=2, shard_index=1)
    labels = np.concatenate([seq[b][1] for b in range(len(seq))])
    assert labels.tolist() == seq.labels.tolist()
    seq.close()


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="MultiWorkerMirroredStrategy is TensorFlow's"
)
@pytest.mark.parametrize("mode", ["in-process", "processes"])
def test_two_tensorflow_workers_train_one_model_on_disjoint_complete_epochs(
    store,  # noqa: F811
    tmp_path: Path,
    mode: str,
) -> None:
    path, _ = store
    index = stored_index(path, "train")
    alone = Sequence(path, batch_size=8, seed=3)
    plan = [
        [index[alone.sample_indices(b, epoch=e)].tolist() for b in range(len(alone))]
        for e in (0, 1)
    ]
    alone.close()
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    child = Path(__file__).with_name("_mwms_child.py")
    root = Path(shardfit.__file__).parents[1]
    procs = []
    for task in range(2):
        env = {
            **os.environ,
            # the workers import the shardfit under test, wherever it is installed from
            "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": task}}
            ),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(child), str(path), mode, str(tmp_path / f"w{task}.json")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            outputs.append(out.decode(errors="replace")[-6000:])
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = [json.loads((tmp_path / f"w{t}.json").read_text()) for t in range(2)]
    assert runs[0]["batches"] == runs[1]["batches"] == len(plan[0])
    for e in (0, 1):
        steps = [r["steps"][str(e)] for r in runs]
        assert len(steps[0]) == len(steps[1]) == len(plan[e])
        for b, global_batch in enumerate(plan[e]):
            mine, theirs = steps[0][b], steps[1][b]
            assert not set(mine) & set(theirs)  # disjoint
            assert sorted(mine + theirs) == sorted(global_batch)  # the global batch of 1 worker
        assert sorted(s for step in steps for batch in step for s in batch) == sorted(
            index.tolist()
        )
    # one model: the workers' weights agree
    for a, b in zip(runs[0]["weights"], runs[1]["weights"], strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6)


def test_a_backup_resumes_on_another_worker_count_with_the_same_global_batch(
    store,  # noqa: F811
    tmp_path: Path,
) -> None:
    # a backup counts global steps: 2 workers of 4 go on where 1 worker of 8 stood
    path, _ = store
    one = Sequence(path, batch_size=8, seed=3)
    saved = shardfit.BackupAndRestore(tmp_path / "b", one)._identity()
    two = Sequence(path, batch_size=4, seed=3, num_shards=2, shard_index=1)
    shardfit.BackupAndRestore(tmp_path / "b", two)._check_same_data(saved)
    # a backup made before num_shards existed named the batch size alone
    legacy = {k: v for k, v in saved.items() if k != "global_batch_size"} | {"batch_size": 8}
    shardfit.BackupAndRestore(tmp_path / "b", two)._check_same_data(legacy)
    other = Sequence(path, batch_size=4, seed=3)
    with pytest.raises(InvalidOptionError, match=r"global_batch_size: 8, now 4"):
        shardfit.BackupAndRestore(tmp_path / "b", other)._check_same_data(saved)
    for seq in (one, two, other):
        seq.close()


@pytest.mark.parametrize(
    "cluster",
    [
        {"worker": ["a:1", "b:1"]},
        {"chief": ["c:1"], "worker": ["a:1", "b:1", "d:1"]},
        {"chief": ["c:1"]},
    ],
)
def test_a_workers_share_from_tf_config_is_tf_distributes_own_numbering(
    cluster: dict[str, list[str]],
) -> None:
    multi_worker_util = pytest.importorskip("tensorflow.python.distribute.multi_worker_util")
    tasks = [(kind, i) for kind in ("chief", "worker") for i in range(len(cluster.get(kind, [])))]
    shares = []
    for kind, i in tasks:
        config = json.dumps({"cluster": cluster, "task": {"type": kind, "index": i}})
        share = shardfit.cluster_shard(config)
        assert share["num_shards"] == len(tasks)
        assert share["shard_index"] == multi_worker_util.id_in_cluster(cluster, kind, i)
        shares.append(share["shard_index"])
    assert sorted(shares) == list(range(len(tasks)))


def test_no_tf_config_is_one_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert shardfit.cluster_shard() == {"num_shards": 1, "shard_index": 0}
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps({"cluster": {"worker": ["a", "b"]}, "task": {"type": "worker", "index": 1}}),
    )
    assert shardfit.cluster_shard() == {"num_shards": 2, "shard_index": 1}


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ("{not json", r"TF_CONFIG must be JSON like"),
        ('{"cluster": {"worker": ["a"]}}', r"TF_CONFIG must be JSON like .*KeyError"),
        (
            '{"cluster": {"worker": ["a"], "ps": ["p"]}, "task": {"type": "ps", "index": 0}}',
            r"names a 'ps' task, which trains on no share",
        ),
        (
            '{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 1}}',
            r"task index must be in \[0, 1\)",
        ),
    ],
)
def test_a_bad_tf_config_names_what_is_wrong(config: str, match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        shardfit.cluster_shard(config)


def test_a_workers_share_from_the_strategys_input_context() -> None:
    tf = pytest.importorskip("tensorflow")
    for pipelines in (1, 2, 4):
        shares = [
            shardfit.cluster_shard(
                input_context=tf.distribute.InputContext(
                    num_input_pipelines=pipelines, input_pipeline_id=i
                )
            )
            for i in range(pipelines)
        ]
        assert shares == [{"num_shards": pipelines, "shard_index": i} for i in range(pipelines)]
    with pytest.raises(InvalidOptionError, match=r"input_context must be a tf\.distribute"):
        shardfit.cluster_shard(input_context=object())
