"""shardfit.Sequence under Keras's JAX and PyTorch backends: every sample exactly once per epoch,
in the same order as under TensorFlow, the first fit included (Keras builds the model from a
batch first there), in-process, with threads and with worker processes; and no hang at exit.

Each run is a child process with ``KERAS_BACKEND`` set (Keras picks its backend at import).
A backend that is not installed fails the test rather than skipping it when
``SHARDFIT_REQUIRE_BACKENDS=1`` (as ``.ci/run`` sets, after installing both).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import decode_index, make_folder

import shardfit

CHILD = Path(__file__).with_name("_backend_child.py")
BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("backends")
    make_folder(root / "src", {"a": 30, "b": 25, "c": 20})
    shardfit.pack_images(
        root / "src",
        root / "d.zarr",
        image_size=(8, 8),
        shard_size=8,
        val_fraction=0.2,
        workers=0,
    )
    return root / "d.zarr"


def _plan(store: Path, epoch: int) -> list[int]:
    import zarr

    images = zarr.open_group(str(store), mode="r")["train/images"][:]
    index = np.array([decode_index(im)[0] for im in images])
    reader = shardfit.open_split(store, "train")
    order = shardfit.epoch_order(
        reader.count, reader.shard_size, seed=6, epoch=epoch, shuffle=True, window=4
    )
    return index[order].tolist()


def _run(store: Path, backend: str, mode: str) -> dict[str, object]:
    if importlib.util.find_spec(BACKENDS[backend]) is None:
        if os.environ.get("SHARDFIT_REQUIRE_BACKENDS") == "1":
            pytest.fail(f"{backend} is not installed, and SHARDFIT_REQUIRE_BACKENDS=1")
        pytest.skip(f"{backend} is not installed (pip install 'shardfit[{backend}]')")
    env = {**os.environ, "KERAS_BACKEND": backend}
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(store), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,  # a hang at exit fails here
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out: dict[str, object] = json.loads(lines[0][7:])
    return out


@pytest.mark.parametrize("mode", ["in-process", "threads", "processes"])
@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_fit_trains_the_plan_exactly_once_per_epoch_under_each_backend(
    store: Path, backend: str, mode: str
) -> None:
    got = _run(store, backend, mode)
    assert got["backend"] == backend
    epochs = got["epochs"]
    assert isinstance(epochs, dict)
    for e in range(2):
        assert epochs[str(e)] == _plan(store, e), f"epoch {e} under {backend}, {mode}"
    assert got["epoch_after"] == 2
    if mode == "processes":
        # every batch came through the shared-memory ring, none pickled, under every backend
        shared, pickled = got["transport"]  # type: ignore[misc]
        assert shared > 0 and pickled == 0, got["transport"]
        # handed over without a copy where the backend allows: JAX's device_put (CPU) aliases
        # the slot; Keras's torch backend copies every numpy batch (np.array in its
        # convert_to_tensor) before torch.as_tensor. Pinned, so that a change in either shows
        assert got["zero_copy"] == {"torch": False, "jax": True, "tensorflow": None}[backend]
