"""The benchmarks run as plain tests on tiny inputs so that they cannot rot (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

# each runs a benchmark end to end on tiny inputs: minutes together, so run by .ci/run's
# `pytest -m slow` rather than the default suite
pytestmark = pytest.mark.slow


def run_benchmark(script: str, out: Path, *args: str, result: str | None = None) -> Any:
    """Run ``benchmarks/SCRIPT`` with ``args``; return the JSON document it wrote
    (``RESULT.json``, by default named after the script)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = result or script.replace("bench_", "").replace(".py", "")
    return json.loads((out / f"{name}.json").read_text())


def test_pack_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    doc = run_benchmark(
        "bench_pack.py", tmp_path, "--images", "12", "--unique", "4", "--reps", "1", "--size", "32"
    )
    variants = [row["variant"] for row in doc["rows"]]
    assert variants[:4] == ["bare", "bare-tuned", "write", "pack-1w"]
    assert all(row["median"] > 0 for row in doc["rows"])
    assert all(r["images"] == 12 for runs in doc["raw"].values() for r in runs)
    assert "| pack-1w |" in (tmp_path / "pack.md").read_text()


def test_sequence_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    doc = run_benchmark(
        "bench_sequence.py",
        tmp_path,
        "--images",
        "40",
        "--size",
        "32",
        "--batch",
        "8",
        "--reps",
        "1",
    )
    assert [r["variant"] for r in doc["rows"]] == [
        "memmap-copy",
        "reader-into",
        "sequence",
        "sequence-held",
    ]
    assert all(run["images"] == 40 for runs in doc["raw"].values() for run in runs)


def test_memory_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    doc = run_benchmark("bench_memory.py", tmp_path, "--sizes", "40", "--tmp", str(tmp_path))
    (row,) = doc["rows"]
    assert len(row["epochs"]) == 3
    assert row["baseline_own"] > 0


def test_loader_benchmark_small_runs_every_variant_peers_and_backends(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _loaders import FIT_VARIANTS, VARIANTS
    from run import NOT_WARM, PEERS

    # the peers' libraries and Keras's other backends: .ci/run installs them all
    needed = ("grain", "streaming", "litdata", "webdataset", "torch", "jax")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing and os.environ.get("SHARDFIT_REQUIRE_BACKENDS") == "1":
        pytest.fail(f"{missing} not installed, and SHARDFIT_REQUIRE_BACKENDS=1")
    if missing:
        pytest.skip(f"{missing} not installed (pip install -e '.[test,jax,torch,peers]')")
    doc = run_benchmark("run.py", tmp_path, "--size", "small", "--peers", result="loaders")
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) == (set(VARIANTS) | set(FIT_VARIANTS)) - NOT_WARM  # small runs warm only
    for name, row in rows.items():
        assert not row["errors"], (name, row["errors"])
        assert row["median"] > 0
        assert row["shm_left"] == []
    assert set(doc["regimes_not_run"]) == {"cold", "constrained"}  # small runs warm only
    assert (tmp_path / "loaders.png").stat().st_size > 0
    # every row names the Keras backend its process ran, checked by the child itself
    assert rows["fit: shardfit (jax)"]["backend"] == "jax"
    assert rows["fit: shardfit (torch)"]["backend"] == "torch"
    assert rows["fit: shardfit"]["backend"] == "tensorflow"
    assert rows["fit: grain"]["backend"] == "tensorflow"
    assert rows["ceiling: memmap copy"]["backend"] == "none"
    assert rows["grain"]["backend"] == "none"
    # each format packed with its own writer: time and bytes on disk
    packs = doc["packs"]
    for name in ("shardfit float32", *PEERS):
        rec = packs[f"{name} (192 images)"]
        assert rec["images"] == 192 and rec["seconds"] > 0, (name, rec)
        # float32 formats hold 64 x 64 x 3 x 4 bytes per image at least; JPEG far less
        if name == "webdataset jpeg":
            assert 0 < rec["bytes"] < 192 * 49152 / 2
        else:
            assert rec["bytes"] >= 192 * 49152, (name, rec)
    assert "| webdataset jpeg (192 images) |" in (tmp_path / "loaders.md").read_text()


def test_loader_benchmark_constrained_regime_reports_oom_or_why_not(tmp_path: Path) -> None:
    # The small store's limit (a third of 9.4 MB) is far below what Python needs: a certain OOM.
    doc = run_benchmark(
        "run.py",
        tmp_path,
        "--size",
        "small",
        "--variants",
        "ceiling: parallel reads",
        "--regimes",
        "constrained",
        result="loaders",
    )
    if "constrained" in doc["regimes_not_run"]:
        assert doc["regimes_not_run"]["constrained"].startswith("no memory limit possible here")
        assert doc["rows"] == []
    else:
        (row,) = doc["rows"]
        assert row["errors"] and row["errors"][0].startswith("OOM at ")


def test_remote_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    doc = run_benchmark(
        "bench_remote.py", tmp_path, "--images", "48", "--shard-size", "8", "--pack-images", "12"
    )
    assert set(doc["read"]) == {"local", "s3, cache holds the store", "s3, cache of half the store"}
    full = doc["read"]["s3, cache holds the store"]
    assert full[0]["fetched"] == doc["store_bytes"] and full[1]["fetched"] == 0
    half = doc["read"]["s3, cache of half the store"]
    assert all(0 < row["cache_peak"] <= doc["store_bytes"] // 2 for row in half)
    assert all(row["same"] for row in doc["pack"])
