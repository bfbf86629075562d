"""Never train on wrong data: a corpus of damaged stores, each read in every way a user reads.

Every case damages one copy of a small packed store the way the issue's sweep did (a flipped
byte, shards swapped or copied over each other, edited labels and metadata, hostile files) and
checks that every read either returns the packed data or raises a ``ShardfitError`` whose
message names the damaged file, within a few seconds (a FIFO or ``/dev/zero`` must not hang or
exhaust memory).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

from shardfit import (
    ChecksumError,
    ShardfitError,
    StoreChangedError,
    open_split,
    pack_images,
    read_info,
    shard_path,
)
from tests.conftest import decode_index, make_folder

SHARD = 4
IMAGE_BYTES = 8 * 8 * 3 * 4  # float32
CHUNK = IMAGE_BYTES + 4  # the image and its crc32c


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("integrity")
    make_folder(root / "src", {"a": 10, "b": 14})
    stores = {}
    for compression in ("none", "zstd"):
        stores[compression] = root / f"{compression}.zarr"
        pack_images(
            root / "src",
            stores[compression],
            image_size=(8, 8),
            shard_size=SHARD,
            val_fraction=0.25,
            compression=compression,
            workers=0,
        )
    return stores


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: a blocking open() of a FIFO is interrupted by the alarm."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def read_everything(path: Path, io: str) -> None:
    """Every read a user makes of a store: its info, then each split's labels and images
    (``io="stream"``: through a Sequence, whole shards read ahead)."""
    info = read_info(path)
    for split in info.splits:
        if io == "stream":
            from shardfit import Sequence

            seq = Sequence(path, split, batch_size=5, io="stream", shuffle=False)
            try:
                assert seq.labels.size == seq.num_samples
                assert sum(len(seq[i][0]) for i in range(len(seq))) == seq.num_samples
            finally:
                seq.close()
            continue
        reader = open_split(path, split, io=io)  # type: ignore[arg-type]
        reader.labels()
        images = reader.read(np.arange(reader.count))
        assert images.shape[0] == reader.count


# -- the damages: each takes a store copy, damages it, returns the file the error must name ----


def _shard(store: Path, k: int = 0, split: str = "train") -> Path:
    return Path(shard_path(str(store), split, k))


def _patch(file: Path, offset: int, data: bytes) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip_image_byte(store: Path) -> Path:
    file = _shard(store, 1)
    with open(file, "r+b") as f:
        f.seek(CHUNK + 100)
        byte = f.read(1)[0]
        f.seek(CHUNK + 100)
        f.write(bytes([byte ^ 0x01]))
    return file


def fill_image_with_ff(store: Path) -> Path:
    file = _shard(store, 2)
    _patch(file, 2 * CHUNK, b"\xff" * IMAGE_BYTES)  # NaN in float32
    return file


def swap_shards(store: Path) -> Path:
    a, b = _shard(store, 0), _shard(store, 1)
    tmp = a.with_name("swap")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)
    return store / "train" / "images" / "c"  # either shard may be read first


def copy_shard_over_another(store: Path) -> Path:
    shutil.copyfile(_shard(store, 2), _shard(store, 0))
    return _shard(store, 0)


def replace_shard_by_a_val_shard(store: Path) -> Path:
    shutil.copyfile(_shard(store, 0, "val"), _shard(store, 0))
    return _shard(store, 0)


def truncate_shard(store: Path) -> Path:
    file = _shard(store, 1)
    os.truncate(file, file.stat().st_size - 10)
    return file


def empty_shard(store: Path) -> Path:
    file = _shard(store, 1)
    os.truncate(file, 0)
    return file


def remove_shard(store: Path) -> Path:
    file = _shard(store, 3)
    file.unlink()
    return file


def grow_shard(store: Path) -> Path:
    file = _shard(store, 1)
    with open(file, "ab") as f:
        f.truncate(10**12)  # a sparse terabyte: must be refused before anything is sized by it
    return file


def shard_is_a_fifo(store: Path) -> Path:
    file = _shard(store, 2)
    file.unlink()
    os.mkfifo(file)
    return file


def flip_label_byte(store: Path) -> Path:
    file = store / "train" / "labels" / "c" / "0"
    _patch(file, 0, (1).to_bytes(4, "little") if _label0(store) == 0 else bytes(4))
    return file


def _label0(store: Path) -> int:
    return int(zarr.open_array(str(store / "train" / "labels"), mode="r")[0])


def label_minus_one(store: Path) -> Path:
    arr = zarr.open_array(str(store / "train" / "labels"), mode="r+")
    arr[3] = -1  # written by zarr: its chunk checksum is right, the value is not
    return store / "train" / "labels"


def label_of_another_class(store: Path) -> Path:
    arr = zarr.open_array(str(store / "train" / "labels"), mode="r+")
    arr[0] = 1 - int(arr[0])
    return store / "train" / "labels"


def flip_checksums_byte(store: Path) -> Path:
    file = store / "train" / "checksums" / "c" / "0"
    _patch(file, 5, b"\x00\x00")
    return file


def _edit_attrs(store: Path, **changes: object) -> Path:
    file = store / "zarr.json"
    doc = json.loads(file.read_text())
    attrs = doc["attributes"]["shardfit"]
    for key, value in changes.items():
        if value is _DROP:
            attrs.pop(key)
        else:
            attrs[key] = value
    file.write_text(json.dumps(doc))
    return file


def _edit_split(store: Path, **changes: object) -> Path:
    file = store / "zarr.json"
    doc = json.loads(file.read_text())
    doc["attributes"]["shardfit"]["splits"]["train"].update(changes)
    file.write_text(json.dumps(doc))
    return file


def _edit_array(store: Path, name: str, **changes: object) -> Path:
    file = store / "train" / name / "zarr.json"
    doc = json.loads(file.read_text())
    doc.update(changes)
    file.write_text(json.dumps(doc))
    return file


_DROP = object()


def _replace_root_json(store: Path, make: Callable[[Path], None]) -> Path:
    file = store / "zarr.json"
    file.unlink()
    make(file)
    return file


DAMAGES: dict[str, Callable[[Path], Path]] = {
    "a flipped byte in an image": flip_image_byte,
    "an image overwritten with 0xFF": fill_image_with_ff,
    "two shard files swapped": swap_shards,
    "a shard copied over another": copy_shard_over_another,
    "a shard replaced by another split's": replace_shard_by_a_val_shard,
    "a truncated shard": truncate_shard,
    "an empty shard": empty_shard,
    "a missing shard": remove_shard,
    "a shard that is a FIFO": shard_is_a_fifo,
    "a shard of a terabyte": grow_shard,
    "a flipped byte in the labels": flip_label_byte,
    "a label of -1": label_minus_one,
    "a label of another class": label_of_another_class,
    "a flipped byte in the checksums": flip_checksums_byte,
    "dtype int32": lambda s: _edit_attrs(s, dtype="int32"),
    "dtype >f4": lambda s: _edit_attrs(s, dtype=">f4"),
    "image_size 4x16": lambda s: _edit_attrs(s, image_size=[4, 16]),
    "image_size 0": lambda s: _edit_attrs(s, image_size=[0, 8]),
    "image_size 10**12": lambda s: _edit_attrs(s, image_size=[10**12, 8]),
    "image_size as strings": lambda s: _edit_attrs(s, image_size=["8", "8"]),
    "shard_size 0": lambda s: _edit_attrs(s, shard_size=0),
    "shard_size negative": lambda s: _edit_attrs(s, shard_size=-4),
    "shard_size true": lambda s: _edit_attrs(s, shard_size=True),
    "no class_names": lambda s: _edit_attrs(s, class_names=_DROP),
    "no splits": lambda s: _edit_attrs(s, splits=_DROP),
    "no image_size": lambda s: _edit_attrs(s, image_size=_DROP),
    "no pack_id": lambda s: _edit_attrs(s, pack_id=_DROP),
    "class_names not strings": lambda s: _edit_attrs(s, class_names=[1, 2]),
    "count lowered": lambda s: _edit_split(s, count=16),
    "count and num_shards lowered": lambda s: _edit_split(s, count=14, num_shards=4),
    "count 10**12": lambda s: _edit_split(s, count=10**12),
    "count negative": lambda s: _edit_split(s, count=-1),
    "count 1.5": lambda s: _edit_split(s, count=1.5),
    "counts_per_class wrong": lambda s: _edit_split(s, counts_per_class=[17, 0]),
    "images data_type int32": lambda s: _edit_array(s, "images", data_type="int32"),
    "images shape changed": lambda s: _edit_array(s, "images", shape=[18, 4, 16, 3]),
    "labels shape shorter": lambda s: _edit_array(s, "labels", shape=[10]),
    "labels zarr.json missing": lambda s: _unlink(s / "train" / "labels" / "zarr.json"),
    "checksums zarr.json missing": lambda s: _unlink(s / "train" / "checksums" / "zarr.json"),
    "split zarr.json count edited": lambda s: _edit_group(s, count=10),
    "deep JSON": lambda s: _replace_root_json(s, lambda f: f.write_text("[" * 100_000)),
    "not JSON": lambda s: _replace_root_json(s, lambda f: f.write_text('{"attributes": ')),
    "not UTF-8": lambda s: _replace_root_json(s, lambda f: f.write_bytes(b'{"a": "\xff"}')),
    "a link to /dev/zero": lambda s: _replace_root_json(s, lambda f: f.symlink_to("/dev/zero")),
    "a FIFO": lambda s: _replace_root_json(s, lambda f: os.mkfifo(f)),
    "a directory": lambda s: _replace_root_json(s, lambda f: f.mkdir()),
}


def _unlink(file: Path) -> Path:
    file.unlink()
    return file


def _edit_group(store: Path, **changes: object) -> Path:
    file = store / "train" / "zarr.json"
    doc = json.loads(file.read_text())
    doc["attributes"]["shardfit"].update(changes)
    file.write_text(json.dumps(doc))
    return file


@pytest.mark.parametrize("io", ["mmap", "pread", "stream"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_every_damaged_store_raises_an_error_naming_the_file(
    packed: dict[str, Path], tmp_path: Path, damage: str, io: str
) -> None:
    store = tmp_path / "copy.zarr"
    shutil.copytree(packed["none"], store)
    named = DAMAGES[damage](store)
    with deadline(20), pytest.raises(ShardfitError, match=re.escape(str(named))):
        read_everything(store, io)


@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_a_corrupt_compressed_chunk_fails_its_checksum_before_it_is_decoded(
    packed: dict[str, Path], tmp_path: Path, io: str
) -> None:
    store = tmp_path / "copy.zarr"
    shutil.copytree(packed["zstd"], store)
    file = _shard(store, 1)
    _patch(file, 10, b"\x00\xff\x00")
    with pytest.raises(ChecksumError, match=re.escape(str(file))):
        read_everything(store, io)


def test_an_undamaged_store_reads_exactly_in_every_mode(packed: dict[str, Path]) -> None:
    want = zarr.open_array(str(packed["none"] / "train" / "images"), mode="r")[:]
    for io in ("mmap", "pread"):
        for verify in ("once", "always", "off"):
            reader = open_split(packed["none"], io=io, verify=verify)  # type: ignore[arg-type]
            order = np.random.default_rng(0).permutation(reader.count)
            np.testing.assert_array_equal(reader.read(order), want[order])


def test_verify_once_checks_each_sample_on_first_read_only(
    packed: dict[str, Path], tmp_path: Path
) -> None:
    store = tmp_path / "copy.zarr"
    shutil.copytree(packed["none"], store)
    once = open_split(store, io="pread", verify="once")
    always = open_split(store, io="pread", verify="always")
    once.read(np.arange(8))
    always.read(np.arange(8))
    # flip a byte of sample 1 after both have read it once
    _patch(_shard(store, 0), CHUNK + 40, b"\x7f")
    once.read(np.arange(8))  # already verified in this process: not read-checked again
    with pytest.raises(ChecksumError, match="sample 1 "):
        always.read(np.arange(8))


def test_a_store_repacked_under_a_reader_is_never_mixed_with_it(
    packed: dict[str, Path], tmp_path: Path
) -> None:
    """Re-packed with another seed: a reader that opened the old store serves the old data
    (its open mappings) or stops naming the store; never the new images under old labels."""
    src = packed["none"].parent / "src"
    store = tmp_path / "s.zarr"
    pack_images(src, store, image_size=(8, 8), shard_size=SHARD, val_fraction=0.25, workers=0)
    want = zarr.open_array(str(store / "train" / "images"), mode="r")[:]
    for io in ("mmap", "pread"):
        if store.exists():
            shutil.rmtree(store)
        pack_images(src, store, image_size=(8, 8), shard_size=SHARD, val_fraction=0.25, workers=0)
        reader = open_split(store, io=io)  # type: ignore[arg-type]
        labels = reader.labels()
        reader.read(np.arange(2 * SHARD))  # the first two shards opened now
        pack_images(
            src,
            store,
            image_size=(8, 8),
            shard_size=SHARD,
            val_fraction=0.25,
            seed=7,
            overwrite=True,
            workers=0,
        )
        try:
            got = reader.read(np.arange(reader.count))
        except (ChecksumError, StoreChangedError) as err:
            assert str(store) in str(err)
        else:  # only possible if every shard was open before: then all of it is the old data
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(reader.labels(), labels)
        # a new reader in a new process (fresh state) of the same object sees the change
        fresh = open_split(store, io=io)  # type: ignore[arg-type]
        assert fresh.pack_id != reader.pack_id
        reader._open = None  # as a worker process forked now would start
        with pytest.raises(StoreChangedError, match=re.escape(str(store))):
            reader.labels()


def test_the_stored_images_match_what_was_packed(packed: dict[str, Path]) -> None:
    reader = open_split(packed["none"])
    images = reader.read(np.arange(reader.count))
    labels = reader.labels()
    assert [decode_index(im)[1] for im in images] == labels.tolist()


def test_plain_zarr_checks_the_same_checksums(packed: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "copy.zarr"
    shutil.copytree(packed["none"], store)
    flip_image_byte(store)
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(str(store / "train" / "images"), mode="r")[:]


# -- under model.fit -----------------------------------------------------------------------------

FIT_MODES = {
    "in-process, streamed": {"io": "stream"},
    "threads": {"workers": 2},
    "processes": {"workers": 2, "use_multiprocessing": True},
}


@pytest.mark.parametrize("mode", list(FIT_MODES))
@pytest.mark.parametrize("damage", ["a flipped byte in an image", "two shard files swapped"])
def test_fit_on_a_damaged_store_stops_naming_the_file(
    packed: dict[str, Path], tmp_path: Path, damage: str, mode: str
) -> None:
    keras = pytest.importorskip("keras")
    from shardfit import Sequence

    store = tmp_path / "copy.zarr"
    shutil.copytree(packed["none"], store)
    named = DAMAGES[damage](store)
    seq = Sequence(store, batch_size=4, **FIT_MODES[mode])  # type: ignore[arg-type]
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    model.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    with deadline(60), pytest.raises(Exception, match=re.escape(str(named))) as err:
        model.fit(seq, epochs=2, verbose=0)
    # the batch Keras takes to build the model raises ChecksumError itself; later ones come
    # through tf.data, which re-raises them as its own error type, with their text
    assert err.type is ChecksumError or "ChecksumError: " in str(err.value)
    seq.close()


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_streamed_reads_are_verified_as_they_arrive(
    packed: dict[str, Path], tmp_path: Path, compression: str
) -> None:
    pytest.importorskip("keras")
    from shardfit import Sequence

    store = tmp_path / "copy.zarr"
    shutil.copytree(packed[compression], store)
    clean = Sequence(store, batch_size=4, io="stream", shuffle=False)
    want = [clean[i][0].copy() for i in range(len(clean))]
    clean.close()
    file = _shard(store, 2)
    _patch(file, 3, b"\x55")  # inside the first image (or its compressed frame)
    seq = Sequence(store, batch_size=4, io="stream", shuffle=False)
    with pytest.raises(ChecksumError, match=re.escape(str(file)) + ".* sample 8 "):
        for i in range(len(seq)):
            got = seq[i][0]
            np.testing.assert_array_equal(got, want[i])  # until the damaged shard: exact
    seq.close()


def test_checksums_computed_piece_by_piece_equal_whole_ones() -> None:
    from shardfit.read._reader import PieceChecksums
    from shardfit.store._shardio import crc32c

    stride, payload, count = 1000, 996, 7
    data = np.random.default_rng(0).integers(0, 256, stride * count + 50, dtype=np.uint8)
    for seed in range(20):
        cuts = np.sort(np.random.default_rng(seed).integers(0, data.size, 5)).tolist()
        checker = PieceChecksums(data, stride, payload, count)
        for start, end in zip([0, *cuts], [*cuts, data.size], strict=True):
            checker.feed(start, end)
        want = [crc32c(data[j * stride : j * stride + payload]) for j in range(count)]
        assert checker.crcs.tolist() == want


_SHRINK_CHILD = """
import os, sys
import numpy as np
import shardfit
store = sys.argv[1]
reader = shardfit.open_split(store, io="mmap")
reader.read(np.arange(8))  # shards 0 and 1 mapped
path = shardfit.shard_path(store, "train", 1)
os.truncate(path, 100)  # cut short in place, under the mapping
try:
    reader.read(np.arange(8))
except shardfit.DatasetFormatError as err:
    print("ERROR", err)
"""


def test_a_shard_cut_short_under_its_mapping_is_an_error_not_sigbus(
    packed: dict[str, Path], tmp_path: Path
) -> None:
    import subprocess
    import sys

    store = tmp_path / "copy.zarr"
    shutil.copytree(packed["none"], store)
    proc = subprocess.run(
        [sys.executable, "-c", _SHRINK_CHILD, str(store)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]  # not killed by SIGBUS (-7)
    assert f"ERROR shard file {_shard(store, 1)} shrank from" in proc.stdout


@pytest.mark.parametrize("mode", ["in-process", "processes"])
def test_a_sequence_reading_while_its_store_is_repacked_never_mixes_two_stores(
    packed: dict[str, Path], tmp_path: Path, mode: str
) -> None:
    """``--overwrite`` with another seed while a Sequence reads: every batch served is the old
    store's (images and labels of the same samples) until it stops with an error naming it."""
    pytest.importorskip("keras")
    from shardfit import Sequence

    src = packed["none"].parent / "src"
    store = tmp_path / "s.zarr"
    kw = {"image_size": (8, 8), "shard_size": SHARD, "val_fraction": 0.25, "workers": 0}
    pack_images(src, store, **kw)  # type: ignore[arg-type]
    extra = {"workers": 2, "use_multiprocessing": True} if mode == "processes" else {}
    before = Sequence(store, batch_size=3, shuffle=True, seed=1, **extra)  # type: ignore[arg-type]
    want = [(x.copy(), y.copy()) for x, y in (before[i] for i in range(len(before)))]
    before.close()
    seq = Sequence(store, batch_size=3, shuffle=True, seed=1, **extra)  # type: ignore[arg-type]
    served = 0
    for i in range(2):
        x, y = seq[i]
        np.testing.assert_array_equal(x, want[i][0])
        served += 1
    pack_images(src, store, seed=7, overwrite=True, **kw)  # type: ignore[arg-type]
    try:
        for i in range(2, len(seq)):
            x, y = seq[i]
            np.testing.assert_array_equal(x, want[i][0])  # never the new store's images
            np.testing.assert_array_equal(y, want[i][1])  # under the old store's labels
            served += 1
    except ShardfitError as err:
        assert str(store) in str(err)
    seq.close()
    assert served >= 2
