"""A plain ``pip install`` (no extras) in a fresh virtual environment: no deep-learning
framework comes with it, packing works, and asking for ``Sequence`` says which extra to add.

Slow (it installs from the package index): run by ``.ci/run`` with ``pytest -m slow``.
"""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest
from conftest import REPO, make_folder

pytestmark = pytest.mark.slow


def test_a_plain_install_packs_without_any_framework(tmp_path: Path) -> None:
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    py = str(env / "bin" / "python")
    subprocess.run(
        [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(REPO)],
        check=True,
        timeout=900,
    )
    installed = subprocess.run(
        [py, "-m", "pip", "list", "--format=freeze"], check=True, capture_output=True, text=True
    ).stdout.lower()
    names = {line.split("==")[0] for line in installed.splitlines()}
    assert "keras" in names
    assert not names & {"tensorflow", "tensorflow-cpu", "jax", "jaxlib", "torch"}, names

    src = tmp_path / "src"
    make_folder(src, {"a": 3, "b": 3})
    out = tmp_path / "d.zarr"
    packed = subprocess.run(
        [
            py,
            str(REPO / "tools" / "pack_images.py"),
            str(src),
            str(out),
            "--image-size",
            "8",
            "8",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the checkout: the installed package must be the one imported
    )
    assert packed.returncode == 0, packed.stderr
    assert (out / "zarr.json").is_file()

    hint = subprocess.run(
        [py, "-c", "import shardfit; shardfit.Sequence"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert hint.returncode != 0
    assert "pip install 'shardfit[tensorflow]'" in hint.stderr, hint.stderr[-2000:]
