"""Packing on a real ``dask.distributed`` cluster (a ``LocalCluster`` of worker processes):
the store equals the local packer's byte for byte, through a killed worker and a killed client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, make_folder, tree_bytes

import shardfit
from shardfit import InvalidOptionError

distributed = pytest.importorskip("distributed")

OPTIONS = {"image_size": (8, 8), "shard_size": 8, "val_fraction": 0.2}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    make_folder(root, {"a": 60, "b": 45, "c": 30})
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # a skip
    return root


@pytest.fixture(scope="module")
def reference(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref") / "local.zarr"
    shardfit.pack_images(source, out, **OPTIONS)  # type: ignore[arg-type]
    return tree_bytes(out)


def test_a_local_cluster_pack_equals_the_local_pack(
    source: Path, reference: dict[str, bytes], tmp_path: Path
) -> None:
    report = shardfit.pack_images(source, tmp_path / "d.zarr", dask="local:2", **OPTIONS)  # type: ignore[arg-type]
    assert tree_bytes(tmp_path / "d.zarr") == reference
    assert [p for p, _ in report.skipped] == ["b/broken.png"]


@pytest.mark.slow  # a cluster of its own, and a pack run twice
def test_a_worker_killed_mid_pack_changes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_folder(src, {"a": 300, "b": 260})
    ref = tmp_path / "ref.zarr"
    shardfit.pack_images(src, ref, image_size=(8, 8), shard_size=4)
    out = tmp_path / "d.zarr"
    records = Path(str(out) + ".partial") / ".shardfit-pack"
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = distributed.Client(cluster)
    pids = list(client.run(os.getpid).values())
    killed_mid_pack: list[bool] = []

    def kill_one_once_shards_are_written() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if records.is_dir() and len(list(records.rglob("*.json"))) >= 5:
                os.kill(pids[0], signal.SIGKILL)  # the nanny starts another; its tasks rerun
                killed_mid_pack.append(not out.exists())
                return
            time.sleep(0.002)

    killer = threading.Thread(target=kill_one_once_shards_are_written)
    killer.start()
    try:
        shardfit.pack_images(src, out, image_size=(8, 8), shard_size=4, dask=client)
    finally:
        killer.join()
        client.close()
        cluster.close()
    assert killed_mid_pack == [True]
    assert tree_bytes(out) == tree_bytes(ref)


@pytest.mark.slow  # a cluster of its own, and a pack run twice
def test_a_client_killed_mid_pack_resumes_to_the_same_store(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    src = tmp_path / "src"
    make_folder(src, {"a": 300, "b": 260})
    ref = tmp_path / "ref.zarr"
    shardfit.pack_images(src, ref, image_size=(8, 8), shard_size=4)
    out = tmp_path / "d.zarr"
    cmd = _cli_args(src, out, "--shard-size", "4", "--dask", "local:2", "--quiet")
    proc = subprocess.Popen(cmd, start_new_session=True)
    records = Path(str(out) + ".partial") / ".shardfit-pack"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if records.is_dir() and len(list(records.rglob("*.json"))) >= 10:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the pack ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the client and its local cluster, at once
    proc.wait()
    assert not out.exists()
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert tree_bytes(out) == tree_bytes(ref)


def test_a_bad_dask_argument_is_one_line(source: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match=r"dask='local:N' needs N.*'local:x'"):
        shardfit.pack_images(source, tmp_path / "x.zarr", dask="local:x", **OPTIONS)  # type: ignore[arg-type]
    done = _cli(source, tmp_path / "y.zarr", "--dask", "local:0")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "needs N, the worker processes" in done.stderr


@pytest.mark.slow  # the client waits for the scheduler before it gives up
def test_an_unreachable_scheduler_is_one_line(source: Path, tmp_path: Path) -> None:
    done = _cli(source, tmp_path / "y.zarr", "--dask", "tcp://127.0.0.1:1")
    assert done.returncode == 2
    assert (
        done.stderr.count("\n") == 1 and "no scheduler answers at tcp://127.0.0.1:1" in done.stderr
    )


def _cli_args(src: Path, out: Path, *args: str) -> list[str]:
    script = str(REPO / "tools" / "pack_images.py")
    return [sys.executable, script, str(src), str(out), "--image-size", "8", "8", *args]


def _cli(src: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cli_args(src, out, *args), capture_output=True, text=True, timeout=120)
