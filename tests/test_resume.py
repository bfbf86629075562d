"""shardfit.BackupAndRestore: after kill -9 mid-epoch, rerunning the same script trains exactly
the batches an uninterrupted run would have trained next, then the same later epochs."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder

from shardfit import pack_images

HERE = Path(__file__).resolve().parent
BATCHES = 32  # per epoch: 128 images, batch 4


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    make_folder(root / "src", {"a": 50, "b": 40, "c": 38})
    out = root / "d.zarr"
    pack_images(root / "src", out, image_size=(8, 8), shard_size=16, workers=0)
    return out


def _run(store: Path, mode: str, backup: Path, log: Path, kill_at: int = -1) -> int:
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "_resume_child.py"),
            str(store),
            mode,
            str(backup),
            str(log),
            str(kill_at),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(proc.stderr[-3000:])
    return proc.returncode


def _batches(log: Path) -> list[list[int]]:
    return [[int(i) for i in line.split()] for line in log.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["in-process", pytest.param("processes", marks=pytest.mark.slow)])
def test_a_rerun_after_kill_9_trains_what_the_uninterrupted_run_would_have(
    store: Path, tmp_path: Path, mode: str
) -> None:
    straight = tmp_path / "straight.log"
    assert _run(store, mode, tmp_path / "b0", straight) == 0
    want = _batches(straight)
    assert len(want) == 3 * BATCHES
    assert sorted(i for b in want[:BATCHES] for i in b) == list(range(128))

    # backups every 5 batches: after batch 14 of epoch 0, and after batch 7 of epoch 1
    # (global 39: Keras counts save_freq across epochs)
    for kill_at, resumes_at in ((18, 15), (40, 40)):
        backup, killed, rerun = (tmp_path / f"{n}{kill_at}" for n in ("b", "killed", "rerun"))
        assert _run(store, mode, backup, killed, kill_at) == -signal.SIGKILL
        assert _batches(killed) == want[: kill_at + 1]  # what it trained before it died
        assert _run(store, mode, backup, rerun) == 0
        assert _batches(rerun) == want[resumes_at:], f"killed after batch {kill_at}"
        np.testing.assert_allclose(
            np.load(f"{rerun}.weights.npy"), np.load(f"{straight}.weights.npy"), rtol=1e-6
        )
        assert not backup.exists()  # Keras's delete_checkpoint=True, once fit completes
