"""The benchmarks run as plain tests on tiny inputs so that they cannot rot (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_pack_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_pack.py"),
            "--images",
            "12",
            "--unique",
            "4",
            "--reps",
            "1",
            "--size",
            "32",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "pack.json").read_text())
    variants = [row["variant"] for row in doc["rows"]]
    assert variants[:4] == ["bare", "bare-tuned", "write", "pack-1w"]
    assert all(row["median"] > 0 for row in doc["rows"])
    assert all(r["images"] == 12 for runs in doc["raw"].values() for r in runs)
    assert "| pack-1w |" in (tmp_path / "pack.md").read_text()


def test_sequence_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_sequence.py"),
            "--images",
            "40",
            "--size",
            "32",
            "--batch",
            "8",
            "--reps",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "sequence.json").read_text())
    assert [r["variant"] for r in doc["rows"]] == [
        "memmap-copy",
        "reader-into",
        "sequence",
        "sequence-held",
    ]
    assert all(run["images"] == 40 for runs in doc["raw"].values() for run in runs)


def test_memory_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_memory.py"),
            "--sizes",
            "40",
            "--tmp",
            str(tmp_path),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "memory.json").read_text())
    (row,) = doc["rows"]
    assert len(row["epochs"]) == 3
    assert row["baseline_own"] > 0
