"""Pillow's own odd and broken test images (../shared/testdata/pillow-edge), split into two
class folders, pack without a crash: every file an independent decode can read is stored,
every other file is listed with its reason. Skipped when that folder is absent."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import PILLOW_EDGE, REPO
from PIL import Image, ImageOps

from shardfit import pack_images, read_info

pytestmark = pytest.mark.skipif(not PILLOW_EDGE.is_dir(), reason=f"{PILLOW_EDGE} not present")


def _independent_decode_ok(path: Path) -> bool:
    """Can Pillow open, load and convert the first frame? (no shardfit code involved)"""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
                ImageOps.exif_transpose(im).convert("RGB")
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def edge_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("edge") / "src"
    files = sorted(p for p in PILLOW_EDGE.iterdir() if p.name not in ("INDEX.md", "manifest.json"))
    for i, path in enumerate(files):
        cls = src / ("even" if i % 2 == 0 else "odd")
        cls.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, cls / path.name)
    (src / "odd" / "zero_bytes.jpg").write_bytes(b"")
    return src


def test_pillow_edge_corpus_packs_every_decodable_file(edge_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "edge.zarr"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "pack_images.py"),
            str(edge_folder),
            str(out),
            "--image-size",
            "32",
            "32",
            "--shard-size",
            "16",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    info = read_info(out)
    stored = {
        bytes(p).rstrip(b"\0").decode()
        for p in zarr.open_group(str(out), mode="r")["train/paths"][:]
    }
    skipped = {d["path"]: d["reason"] for d in info.attrs["skipped"]}
    ignored = {d["path"]: d["reason"] for d in info.attrs["ignored"]}
    every = {str(p.relative_to(edge_folder)) for p in edge_folder.rglob("*") if p.is_file()}
    assert stored | set(skipped) | set(ignored) == every
    assert not (stored & set(skipped)) and not (stored & set(ignored))
    for rel in every - set(ignored):
        assert (rel in stored) == _independent_decode_ok(edge_folder / rel), rel
    assert all(reason for reason in skipped.values())
    assert skipped["odd/zero_bytes.jpg"] == "OSError: empty file (0 bytes)"
    assert (
        "DecompressionBombError" in skipped[next(p for p in skipped if p.endswith("reallybig.bmp"))]
    )
    assert ignored[next(p for p in ignored if p.endswith("pngtest_bad.png.bin"))].startswith(
        "not an image file extension"
    )
    assert len(stored) >= 110
    images = zarr.open_group(str(out), mode="r")["train/images"][:]
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0


def test_pillow_edge_16_bit_files_keep_their_range(edge_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "edge.zarr"
    pack_images(edge_folder, out, image_size=(16, 16), workers=2)
    root = zarr.open_group(str(out), mode="r")
    paths = [bytes(p).rstrip(b"\0").decode() for p in root["train/paths"][:]]
    i = next(k for k, p in enumerate(paths) if p.endswith("16bit.cropped.tif"))
    image = root["train/images"][i]
    # values 291-694 of 65535: dark, not clipped to white as convert("RGB") would
    assert image.min() > 0.003 and image.max() < 0.012


def test_pillow_edge_on_error_raise_stops_with_one_line(edge_folder: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "pack_images.py"),
            str(edge_folder),
            str(tmp_path / "e.zarr"),
            "--image-size",
            "8",
            "8",
            "--on-error",
            "raise",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pack_images.py: error: cannot decode ")
    assert str(edge_folder) in lines[0]
