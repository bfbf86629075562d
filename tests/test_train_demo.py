"""The main job end to end: synthetic folder -> pack -> fit with process workers -> accuracy."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_train_demo_reaches_high_validation_accuracy(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "train.py"),
            "--workdir",
            str(tmp_path),
            "--epochs",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"final validation accuracy: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout
    assert float(match.group(1)) >= 0.9
    assert (tmp_path / "best.keras").exists()


def test_train_refuses_a_store_without_val_split(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from conftest import make_folder

    from shardfit import pack_images

    make_folder(tmp_path / "src", {"a": 4, "b": 4})
    pack_images(tmp_path / "src", tmp_path / "d.zarr", image_size=(8, 8), workers=0)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), "--data", str(tmp_path / "d.zarr")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "has no 'val' split" in proc.stderr
    assert "Traceback" not in proc.stderr
