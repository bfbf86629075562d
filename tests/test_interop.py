"""A store opens, bit-identical, in other Zarr v3 readers (skipped where they are not installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from shardfit import open_split, pack_images

NAMES = ("images", "labels", "paths")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (src / c).mkdir()
        for i in range(7):
            Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(
                src / c / f"{i}é.png"
            )
    out = tmp_path_factory.mktemp("out") / "d.zarr"
    pack_images(src, out, image_size=(8, 8), val_fraction=0.3, shard_size=4, workers=1)
    return out


def _zarr(store: Path, split: str) -> dict[str, np.ndarray]:
    return {n: zarr.open_array(str(store / split / n), mode="r")[:] for n in NAMES}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_paths_decode_to_the_source_files(store: Path) -> None:
    paths = [bytes(r).rstrip(b"\0").decode() for r in _zarr(store, "train")["paths"]]
    assert all(p.endswith("é.png") and p[0] in "ab" for p in paths)
    assert open_split(store, "train").paths() == paths


@pytest.mark.parametrize("split", ["train", "val"])
def test_zarr_reads_what_shardfit_serves(store: Path, split: str) -> None:
    reader = open_split(store, split)
    ref = _zarr(store, split)
    assert _same(reader.read(np.arange(reader.count)), ref["images"])
    assert _same(reader.labels(), ref["labels"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_xarray(store: Path, split: str) -> None:
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(store, group=split, consolidated=False, chunks=None)
    ref = _zarr(store, split)
    for n in NAMES:
        assert _same(ds[n].values, ref[n]), n


@pytest.mark.parametrize("split", ["train", "val"])
def test_tensorstore(store: Path, split: str) -> None:
    ts = pytest.importorskip("tensorstore")
    ref = _zarr(store, split)
    for n in NAMES:
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / split / n)}}
        assert _same(ts.open(spec, read=True).result().read().result(), ref[n]), n


@pytest.mark.parametrize("split", ["train", "val"])
def test_dask(store: Path, split: str) -> None:
    da = pytest.importorskip("dask.array")
    ref = _zarr(store, split)
    for n in NAMES:
        assert _same(da.from_zarr(str(store / split / n)).compute(), ref[n]), n
