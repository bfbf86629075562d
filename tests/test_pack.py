"""Packing end to end: real folders, real worker processes, read back with plain zarr."""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import REPO, bomb_gif, decode_index, tree_bytes
from PIL import Image, ImageFile

from shardfit import (
    DatasetFormatError,
    ImageDecodeError,
    IncompleteDatasetError,
    OutputExistsError,
    ResumeMismatchError,
    pack_images,
    read_info,
)
from shardfit.store._format import shard_path
from shardfit.store._shardio import read_shard_index


def stored(out: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images, labels and paths of ``split`` read with plain zarr, no shardfit code."""
    root = zarr.open_group(str(out), mode="r")
    return (
        root[f"{split}/images"][:],
        root[f"{split}/labels"][:],
        [bytes(p).rstrip(b"\0").decode() for p in root[f"{split}/paths"][:]],
    )


def test_every_image_is_stored_once_with_its_label_and_path(folder, tmp_path: Path) -> None:
    src, truth = folder({"ants": 23, "bees": 17, "cats": 9})
    out = tmp_path / "d.zarr"
    report = pack_images(src, out, image_size=(8, 8), shard_size=5, val_fraction=0.25, workers=2)
    seen: dict[str, tuple[int, int]] = {}
    for split in ("train", "val"):
        images, labels, paths = stored(out, split)
        assert images.dtype == np.float32 and images.shape[1:] == (8, 8, 3)
        assert len(images) == len(labels) == len(paths) == report.counts[split]
        for img, label, path in zip(images, labels, paths, strict=True):
            assert path not in seen
            index, enc_label = decode_index(img)
            assert (index, enc_label) == truth[path]
            assert label == enc_label
            seen[path] = (index, label)
            # uniform source image, no resampling: the whole image is the colour
            assert np.all(img == img[0, 0])
    assert seen.keys() == truth.keys()
    assert report.class_names == ("ants", "bees", "cats")
    # the all-black image (index 0, label 0) is on disk, not skipped as a fill-value chunk
    assert truth["ants/img00000.png"] == (0, 0)


def test_validation_split_is_stratified_and_disjoint(folder, tmp_path: Path) -> None:
    src, _ = folder({"a": 40, "b": 20})
    out = tmp_path / "d.zarr"
    report = pack_images(src, out, image_size=(8, 8), val_fraction=0.2, workers=1)
    assert report.counts == {"train": 48, "val": 12}
    assert report.counts_per_class == {"train": [32, 16], "val": [8, 4]}
    _, _, train_paths = stored(out, "train")
    _, _, val_paths = stored(out, "val")
    assert not set(train_paths) & set(val_paths)
    info = read_info(out)
    assert info.splits["val"].counts_per_class == (8, 4)
    assert info.attrs["val_fraction"] == 0.2


def test_no_shard_holds_a_single_class(folder, tmp_path: Path) -> None:
    src, _ = folder({"a": 40, "b": 40, "c": 40})
    out = tmp_path / "d.zarr"
    pack_images(src, out, image_size=(8, 8), shard_size=10, workers=2)
    _, labels, _ = stored(out, "train")
    for start in range(0, len(labels), 10):
        assert len(set(labels[start : start + 10].tolist())) > 1


def test_attributes_describe_the_pack(folder, tmp_path: Path) -> None:
    src, _ = folder({"a": 3, "b": 2})
    (src / "stray.txt").write_text("not an image")
    out = tmp_path / "d.zarr"
    pack_images(src, out, image_size=(8, 8), workers=0, seed=7)
    attrs = zarr.open_group(str(out), mode="r").attrs.asdict()["shardfit"]
    assert attrs["format_version"] == 3
    assert attrs["complete"] is True
    assert attrs["class_names"] == ["a", "b"]
    assert attrs["image_size"] == [8, 8]
    assert attrs["resize"] == "stretch" and attrs["interpolation"] == "bilinear"
    assert attrs["dtype"] == "float32" and attrs["scale"] == "pixel / 255"
    assert attrs["seed"] == 7
    assert attrs["splits"]["train"]["counts_per_class"] == [3, 2]
    assert attrs["source_root"] == str(src)
    assert attrs["shardfit_version"]
    assert attrs["ignored"] == [
        {
            "path": "stray.txt",
            "reason": "loose file at the root: images must be in class subfolders",
        }
    ]
    assert attrs["skipped"] == []


def test_same_seed_gives_identical_stores_whatever_the_worker_count(folder, tmp_path: Path) -> None:
    src, _ = folder({"a": 30, "b": 25})
    (src / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    trees = []
    for workers in (0, 1, 2):
        out = tmp_path / f"w{workers}.zarr"
        pack_images(src, out, image_size=(8, 8), shard_size=7, val_fraction=0.1, workers=workers)
        trees.append(tree_bytes(out))
    assert trees[0] == trees[1] == trees[2]
    other = tmp_path / "seed1.zarr"
    pack_images(src, other, image_size=(8, 8), shard_size=7, val_fraction=0.1, seed=1, workers=2)
    assert stored(other, "train")[2] != stored(tmp_path / "w0.zarr", "train")[2]


@pytest.mark.parametrize("compression", ["zstd", "blosc-lz4"])
def test_compressed_stores_read_back_equal(folder, tmp_path: Path, compression: str) -> None:
    src, _ = folder({"a": 6, "b": 6}, size=(16, 12))
    plain, packed = tmp_path / "plain.zarr", tmp_path / "c.zarr"
    pack_images(src, plain, image_size=(16, 12), shard_size=4, workers=1)
    pack_images(src, packed, image_size=(16, 12), shard_size=4, workers=1, compression=compression)
    np.testing.assert_array_equal(stored(packed, "train")[0], stored(plain, "train")[0])
    shard = shard_path(str(packed), "train", 0)
    assert os.path.getsize(shard) < os.path.getsize(shard_path(str(plain), "train", 0))


def test_uint8_stores_raw_pixels(folder, tmp_path: Path) -> None:
    src, truth = folder({"a": 5, "b": 5})
    out = tmp_path / "u.zarr"
    pack_images(src, out, image_size=(8, 8), dtype="uint8", workers=1)
    images, _labels, paths = stored(out, "train")
    assert images.dtype == np.uint8
    for img, path in zip(images, paths, strict=True):
        assert decode_index(img) == truth[path]
    assert read_info(out).attrs["value_range"] == [0, 255]


def test_stored_values_match_an_independent_pil_decode(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    files = []
    for i, (h, w) in enumerate([(50, 70), (33, 33), (90, 41), (64, 64)]):
        (src / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        path = src / f"c{i % 2}" / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=85)
        files.append(path)
    out = tmp_path / "d.zarr"
    pack_images(src, out, image_size=(24, 32), workers=2)
    images, _, paths = stored(out, "train")
    for img, rel in zip(images, paths, strict=True):
        with Image.open(src / rel) as im:
            ref = im.convert("RGB").resize((32, 24), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(img, np.asarray(ref, dtype=np.float32) / 255)


def _bad_files(src: Path) -> dict[str, str]:
    """Write broken files into ``src/a``; return {relative path: expected reason fragment}."""
    good = src / "a" / "img00000.png"
    truncated = src / "a" / "truncated.jpg"
    buf = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(buf).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:600])
    (src / "a" / "zero.png").write_bytes(b"")
    (src / "a" / "text.jpg").write_text("this is not a jpeg")
    (src / "a" / "bomb.gif").write_bytes(bomb_gif())
    (src / "a" / "header_only.png").write_bytes(good.read_bytes()[:40])
    return {
        "a/truncated.jpg": "truncated",
        "a/zero.png": "empty file (0 bytes)",
        "a/text.jpg": "UnidentifiedImageError",
        "a/bomb.gif": "DecompressionBombError",
        "a/header_only.png": "",
    }


def test_bad_files_are_skipped_listed_and_the_rest_is_stored(folder, tmp_path: Path) -> None:
    src, truth = folder({"a": 10, "b": 10})
    bad = _bad_files(src)
    out = tmp_path / "d.zarr"
    report = pack_images(src, out, image_size=(8, 8), shard_size=3, workers=2)
    reasons = dict(report.skipped)
    assert reasons.keys() == bad.keys()
    for path, fragment in bad.items():
        assert fragment.lower() in reasons[path].lower()
    assert sorted(stored(out, "train")[2]) == sorted(truth)
    attrs = read_info(out).attrs
    assert {d["path"] for d in attrs["skipped"]} == set(bad)


def test_on_error_raise_stops_at_the_first_bad_file(folder, tmp_path: Path) -> None:
    src, _ = folder({"a": 4, "b": 4})
    (src / "b" / "zzz.jpg").write_bytes(b"")
    out = tmp_path / "d.zarr"
    with pytest.raises(ImageDecodeError, match=r"cannot decode .*b/zzz\.jpg: OSError: empty file"):
        pack_images(src, out, image_size=(8, 8), workers=2, on_error="raise")
    assert not out.exists()
    with pytest.raises(IncompleteDatasetError, match="resume=True"):
        read_info(out)


class _CrashFile(ImageFile.ImageFile):
    """A Pillow format whose decoder kills the process, as a buggy C decoder would."""

    format = "CRASHTEST"

    def _open(self) -> None:
        self._size = (4, 4)
        self._mode = "RGB"

    def load(self):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), 11)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_a_decoder_that_kills_its_worker_is_skipped_and_the_pack_goes_on(
    folder, tmp_path: Path
) -> None:
    # Workers are forked from this process, so they inherit the plugin registered here.
    assert mp.get_start_method() == "fork"
    Image.register_open("CRASHTEST", _CrashFile, lambda prefix: prefix[:8] == b"CRASHME!")
    Image.register_extension("CRASHTEST", ".crash")
    faulthandler_was_on = faulthandler.is_enabled()
    faulthandler.disable()  # else each forked worker prints pytest's crash dump
    try:
        src, truth = folder({"a": 12, "b": 12})
        (src / "a" / "boom1.crash").write_bytes(b"CRASHME!")
        (src / "b" / "boom2.crash").write_bytes(b"CRASHME!")
        out = tmp_path / "d.zarr"
        report = pack_images(src, out, image_size=(8, 8), shard_size=4, workers=2)
    finally:
        Image.OPEN.pop("CRASHTEST", None)
        Image.EXTENSION.pop(".crash", None)
        if faulthandler_was_on:
            faulthandler.enable()
    reasons = dict(report.skipped)
    assert set(reasons) == {"a/boom1.crash", "b/boom2.crash"}
    assert all(
        "decoder crashed its worker process (killed by signal SIGSEGV)" in r
        for r in reasons.values()
    )
    assert sorted(stored(out, "train")[2]) == sorted(truth)


def test_existing_output_needs_overwrite(folder, tmp_path: Path) -> None:
    src, _ = folder({"a": 3, "b": 3})
    out = tmp_path / "d.zarr"
    pack_images(src, out, image_size=(8, 8), workers=0)
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        pack_images(src, out, image_size=(8, 8), workers=0)
    report = pack_images(src, out, image_size=(4, 4), workers=0, overwrite=True)
    assert read_info(out).image_size == (4, 4)
    assert report.counts == {"train": 6}
    assert not any(p.name.startswith("d.zarr.") for p in tmp_path.iterdir())


def test_dry_run_plans_and_writes_nothing(folder, tmp_path: Path) -> None:
    src, _ = folder({"a": 10, "b": 5})
    out = tmp_path / "d.zarr"
    report = pack_images(src, out, image_size=(8, 8), shard_size=4, val_fraction=0.2, dry_run=True)
    assert report.dry_run
    assert report.counts == {"train": 12, "val": 3}
    assert report.num_shards == {"train": 3, "val": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_resume_with_changed_folder_is_refused(folder, tmp_path: Path) -> None:
    src, _ = folder({"a": 4, "b": 4})
    (src / "b" / "zzz.jpg").write_bytes(b"")
    out = tmp_path / "d.zarr"
    with pytest.raises(ImageDecodeError):
        pack_images(src, out, image_size=(8, 8), workers=1, on_error="raise")
    with pytest.raises(ResumeMismatchError, match="overwrite=True"):
        pack_images(src, out, image_size=(6, 6), workers=1, resume=True)
    with pytest.raises(OutputExistsError, match="resume=True"):
        pack_images(src, out, image_size=(8, 8), workers=1)
    # fixing the file changes the folder; skipping it instead resumes the same pack
    report = pack_images(src, out, image_size=(8, 8), workers=1, resume=True)
    assert dict(report.skipped) == {"b/zzz.jpg": "OSError: empty file (0 bytes)"}
    assert read_info(out).splits["train"].count == 8


def test_read_info_refuses_what_is_not_a_complete_shardfit_store(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="does not exist"):
        read_info(tmp_path / "nope.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(DatasetFormatError, match="not a shardfit dataset"):
        read_info(tmp_path / "plain.zarr")
    g = zarr.open_group(str(tmp_path / "future.zarr"), mode="w")
    g.attrs["shardfit"] = {"format_version": 99, "complete": True}
    with pytest.raises(DatasetFormatError, match="format version 99"):
        read_info(tmp_path / "future.zarr")


def test_shard_index_counts_every_image(folder, tmp_path: Path) -> None:
    src, _ = folder({"a": 7, "b": 4})
    out = tmp_path / "d.zarr"
    pack_images(src, out, image_size=(8, 8), shard_size=4, workers=1)
    present = [
        int(
            np.count_nonzero(
                read_shard_index(shard_path(str(out), "train", k), 4)[:, 0] != 2**64 - 1
            )
        )
        for k in range(3)
    ]
    assert present == [4, 4, 3]


def test_a_corrupt_shard_index_is_named_in_the_error(folder, tmp_path: Path) -> None:
    src, _ = folder({"a": 4, "b": 4})
    out = tmp_path / "d.zarr"
    pack_images(src, out, image_size=(8, 8), shard_size=4, workers=0)
    path = shard_path(str(out), "train", 1)
    data = bytearray(Path(path).read_bytes())
    data[-10] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    with pytest.raises(DatasetFormatError, match=r"c/1/0/0/0 fails its index checksum"):
        read_shard_index(path, 4)
    Path(path).write_bytes(bytes(data[:20]))
    with pytest.raises(DatasetFormatError, match="is truncated"):
        read_shard_index(path, 4)


def test_packing_and_reading_never_import_a_framework(folder, tmp_path: Path) -> None:
    src, _ = folder({"a": 2, "b": 2})
    out = str(tmp_path / "d.zarr")
    code = (
        "import sys, shardfit; "
        f"shardfit.pack_images({str(src)!r}, {out!r}, image_size=(4, 4)); "
        f"r = shardfit.open_split({out!r}); r.read([0, 1]); r.labels(); "
        "shardfit.epoch_order(r.count, r.shard_size, seed=0, epoch=1, shuffle=True, window=4); "
        "shardfit.SequenceOptions(batch_size=2, workers=2, use_multiprocessing=True); "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras', 'jax', 'torch')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
