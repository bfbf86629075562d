"""SplitReader: both read paths (mmap, pread) against the stored values, the choice between
them, truncated files, pickling and fork, threads."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import make_folder

from shardfit import DatasetFormatError, InvalidOptionError, pack_images
from shardfit.read import _reader as reader_module
from shardfit.read._reader import SplitReader, _choose_io, memory_bytes
from shardfit.store._format import shard_path

N_PER_CLASS = {"a": 13, "b": 10}  # 23 images
SHARD = 8
SIZE = (6, 10)  # not square: a mixed-up height and width shows
MODES = ("mmap", "pread")
#: (dtype, compression) of the stores read here
KINDS = [("float32", "none"), ("uint8", "none"), ("float32", "zstd"), ("uint8", "blosc-lz4")]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """One small store per kind, packed from the same folder."""
    root = tmp_path_factory.mktemp("reader")
    make_folder(root / "src", N_PER_CLASS, size=SIZE)
    out = {}
    for dtype, compression in KINDS:
        path = root / f"{dtype}-{compression}.zarr"
        pack_images(
            root / "src",
            path,
            image_size=SIZE,
            shard_size=SHARD,
            val_fraction=0.2,
            workers=0,
            dtype=dtype,
            compression=compression,
        )
        out[(dtype, compression)] = path
    return out


def stored(path: Path) -> np.ndarray:
    """The train images as zarr-python reads them, in the stored dtype."""
    return np.asarray(zarr.open_group(str(path), mode="r")["train/images"][:])


def orders(count: int) -> list[np.ndarray]:
    """Index orders to read: storage order, reversed, shuffled, repeats, the partial shard."""
    last = count - 1
    rng = np.random.default_rng(0)
    return [
        np.arange(count),
        np.arange(count)[::-1],
        rng.permutation(count),
        np.array([0, 0, last, last, 5, 0, 5, last]),
        np.arange((count // SHARD) * SHARD, count),  # the last shard, which is not full
        rng.integers(0, count, size=3 * count),
        np.array([], dtype=np.int64),
    ]


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(k))
@pytest.mark.parametrize("io", MODES)
def test_both_modes_read_the_stored_values(stores, kind: tuple[str, str], io: str) -> None:
    path = stores[kind]
    images = stored(path)
    reader = SplitReader(path, io=io)  # type: ignore[arg-type]
    assert reader.io_mode == io
    assert reader.count == len(images) and reader.count % SHARD != 0  # a partial last shard
    as_float = images.astype(np.float32) / 255 if images.dtype == np.uint8 else images
    for order in orders(reader.count):
        out = np.full((len(order) + 1, *reader.image_shape), -1, np.float32)
        reader.read_into(order, out)
        np.testing.assert_array_equal(out[: len(order)], as_float[order])
        assert (out[len(order)] == -1).all()  # only out[:len(indices)] is written
        raw = np.empty((len(order), *reader.image_shape), images.dtype)
        reader.read_into(order, raw)
        np.testing.assert_array_equal(raw, images[order])


@pytest.mark.parametrize("io", MODES)
def test_a_non_contiguous_destination_is_filled_too(stores, io: str) -> None:
    path = stores[("float32", "none")]
    images = stored(path)
    reader = SplitReader(path, io=io)  # type: ignore[arg-type]
    order = np.random.default_rng(1).permutation(reader.count)
    wide = np.zeros((len(order), *reader.image_shape[:2], 4), np.float32)
    reader.read_into(order, wide[..., :3])  # each out[b] is strided
    np.testing.assert_array_equal(wide[..., :3], images[order])
    assert (wide[..., 3] == 0).all()


@pytest.mark.parametrize("io", MODES)
def test_out_of_range_indices_raise(stores, io: str) -> None:
    reader = SplitReader(stores[("float32", "none")], io=io)  # type: ignore[arg-type]
    out = np.empty((2, *reader.image_shape), np.float32)
    for bad in (reader.count, -1):
        with pytest.raises(IndexError, match=f"sample {bad} out of range"):
            reader.read_into(np.array([0, bad]), out)


@pytest.mark.parametrize("io", MODES)
def test_a_read_ahead_hint_changes_nothing_read_and_checks_its_indices(stores, io: str) -> None:
    reader = SplitReader(stores[("float32", "none")], io=io)  # type: ignore[arg-type]
    images = stored(stores[("float32", "none")])
    reader.will_need(np.arange(reader.count)[::-1])
    out = np.empty((3, *reader.image_shape), np.float32)
    reader.read_into(np.array([2, 0, 5]), out)
    np.testing.assert_array_equal(out, images[[2, 0, 5]])
    if io == "pread":  # mapped shards take no hint, so they check nothing either
        with pytest.raises(IndexError, match=f"sample {reader.count} out of range"):
            reader.will_need(np.array([reader.count]))


def test_a_bad_io_option_is_refused(stores) -> None:
    path = stores[("float32", "none")]
    with pytest.raises(
        InvalidOptionError, match=r"io must be one of 'auto', 'mmap', 'pread'\. Received: 'bad'"
    ):
        SplitReader(path, io="bad")  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match=r"Received: None"):
        SplitReader(path, io=None)  # type: ignore[arg-type]


def test_choose_io_reads_with_pread_when_data_is_over_half_the_memory() -> None:
    assert _choose_io(0, 1000) == "mmap"
    assert _choose_io(500, 1000) == "mmap"  # exactly half may still stay cached
    assert _choose_io(501, 1000) == "pread"
    assert _choose_io(5000, 1000) == "pread"
    assert _choose_io(10**15, None) == "mmap"  # memory unknown: the previous behaviour


def test_auto_follows_the_memory_available(stores, monkeypatch: pytest.MonkeyPatch) -> None:
    path = stores[("float32", "none")]
    shards = SplitReader(path, io="mmap").num_shards
    data = sum(os.path.getsize(shard_path(str(path), "train", k)) for k in range(shards))
    monkeypatch.setattr(reader_module, "memory_bytes", lambda: 2 * data)
    assert SplitReader(path).io_mode == "mmap"
    monkeypatch.setattr(reader_module, "memory_bytes", lambda: 2 * data - 1)
    assert SplitReader(path).io_mode == "pread"
    assert SplitReader(path, io="mmap").io_mode == "mmap"  # an explicit choice stands
    monkeypatch.setattr(reader_module, "memory_bytes", lambda: None)
    assert SplitReader(path).io_mode == "mmap"


def _fake_system(root: Path, cgroup: str, files: dict[str, str], mem_kb: int | None) -> tuple:
    proc, fs = root / "proc", root / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    if mem_kb is not None:
        (proc / "meminfo").write_text(f"MemTotal:       {mem_kb} kB\nMemFree:  1 kB\n")
    for rel, text in files.items():
        (fs / rel).parent.mkdir(parents=True, exist_ok=True)
        (fs / rel).write_text(text)
    return str(proc), str(fs)


GIB = 1 << 30


@pytest.mark.parametrize(
    ("cgroup", "files", "mem_kb", "expect"),
    [
        # no limit anywhere: RAM
        ("0::/user.slice\n", {"user.slice/memory.max": "max\n"}, 8 << 20, 8 * GIB),
        # v2, limit on the process's group
        ("0::/a/b\n", {"a/b/memory.max": f"{GIB}\n"}, 8 << 20, GIB),
        # v2, a tighter limit on an ancestor applies too
        (
            "0::/a/b\n",
            {"a/b/memory.max": "max\n", "a/memory.max": f"{GIB // 2}\n"},
            8 << 20,
            GIB // 2,
        ),
        # hybrid: v2 mounted under unified/
        ("0::/a\n", {"unified/a/memory.max": f"{3 * GIB}\n"}, 8 << 20, 3 * GIB),
        # v1 memory controller, limited
        (
            "4:memory:/bench\n1:cpu:/\n0::/\n",
            {"memory/bench/memory.limit_in_bytes": f"{2 * GIB}\n"},
            8 << 20,
            2 * GIB,
        ),
        # v1 "unlimited" is a huge number
        (
            "4:memory:/x\n",
            {"memory/x/memory.limit_in_bytes": "9223372036854771712\n"},
            8 << 20,
            8 * GIB,
        ),
        # a limit above RAM: RAM
        ("0::/a\n", {"a/memory.max": f"{64 * GIB}\n"}, 8 << 20, 8 * GIB),
        # nothing readable but the cgroup limit
        ("0::/a\n", {"a/memory.max": f"{GIB}\n"}, None, GIB),
        # garbage everywhere: unknown
        ("not a cgroup line\n", {"a/memory.max": "lots\n"}, None, None),
    ],
)
def test_memory_bytes_reads_ram_and_cgroup_limits(
    tmp_path: Path, cgroup: str, files: dict[str, str], mem_kb: int | None, expect: int | None
) -> None:
    proc, fs = _fake_system(tmp_path, cgroup, files, mem_kb)
    assert memory_bytes(proc, fs) == expect


def test_memory_bytes_without_proc_or_cgroups_is_unknown(tmp_path: Path) -> None:
    assert memory_bytes(str(tmp_path / "nope"), str(tmp_path / "none")) is None
    assert memory_bytes() is None or memory_bytes() > 0  # this machine: no exception


def test_a_file_truncated_before_opening_is_named(stores, tmp_path: Path) -> None:
    path = Path(shutil.copytree(stores[("float32", "none")], tmp_path / "copy.zarr"))
    shard = shard_path(str(path), "train", 1)
    Path(shard).write_bytes(Path(shard).read_bytes()[:100])
    reader = SplitReader(path, io="pread")
    out = np.empty((1, *reader.image_shape), np.float32)
    with pytest.raises(DatasetFormatError, match=f"shard file {shard} is truncated"):
        reader.read_into(np.array([SHARD]), out)


@pytest.mark.parametrize("kind", [("float32", "none"), ("uint8", "none"), ("float32", "zstd")])
def test_a_file_truncated_while_open_is_named_in_pread_mode(
    stores, tmp_path: Path, kind: tuple[str, str]
) -> None:
    path = Path(shutil.copytree(stores[kind], tmp_path / "copy.zarr"))
    reader = SplitReader(path, io="pread")
    out = np.empty((1, *reader.image_shape), np.float32)
    reader.read_into(np.array([SHARD]), out)  # opens shard 1 and reads its index
    shard = shard_path(str(path), "train", 1)
    os.truncate(shard, 10)  # the same file, now shorter: every sample is cut
    for j in (SHARD, SHARD + 3):
        with pytest.raises(
            DatasetFormatError, match=f"shard file {shard} is truncated: re-pack the dataset"
        ):
            reader.read_into(np.array([j]), out)


def _read_in_child(blob: bytes, original: SplitReader, order: list[int], queue: mp.Queue) -> None:
    results = []
    for reader in (pickle.loads(blob), original):
        out = np.empty((len(order), *reader.image_shape), np.float32)
        reader.read_into(np.array(order), out)
        results.append((out, reader._open is not None and reader._open.pid == os.getpid()))
    queue.put(results)


@pytest.mark.parametrize("io", MODES)
def test_a_reader_pickles_small_and_reads_in_a_forked_child(stores, io: str) -> None:
    path = stores[("uint8", "none")]
    reader = SplitReader(path, io=io)  # type: ignore[arg-type]
    order = np.random.default_rng(2).permutation(reader.count)
    first = np.empty((len(order), *reader.image_shape), np.float32)
    reader.read_into(order, first)  # opens every shard in this process
    blob = pickle.dumps(reader)
    assert len(blob) < 4096
    assert pickle.loads(blob).io_mode == io
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(blob, reader, order.tolist(), queue))
    child.start()
    results = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    for out, own_handles in results:
        np.testing.assert_array_equal(out, first)
        assert own_handles  # the child opened its own files, not the parent's
    again = np.empty_like(first)
    reader.read_into(order, again)  # the parent's handles still work after the child is gone
    np.testing.assert_array_equal(again, first)


@pytest.mark.parametrize("kind", [("uint8", "none"), ("float32", "none"), ("uint8", "blosc-lz4")])
def test_threads_reading_at_once_in_pread_mode(stores, kind: tuple[str, str]) -> None:
    path = stores[kind]
    images = stored(path)
    expect = images.astype(np.float32) / 255 if images.dtype == np.uint8 else images
    reader = SplitReader(path, io="pread")

    def work(seed: int) -> int:
        rng = np.random.default_rng(seed)
        out = np.empty((16, *reader.image_shape), np.float32)
        for _ in range(200):
            order = rng.integers(0, reader.count, size=16)
            reader.read_into(order, out)
            np.testing.assert_array_equal(out, expect[order])
        return seed

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(work, range(8))) == list(range(8))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_pread_files_are_closed_with_the_reader(stores) -> None:
    store = str(stores[("float32", "none")])

    def open_fds() -> int:
        """Descriptors of this process open on the store's files (other tests' threads may
        open and close other files meanwhile)."""
        found = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                found += os.readlink(f"/proc/self/fd/{fd}").startswith(store)
        return found

    before = open_fds()
    reader = SplitReader(store, io="pread")
    out = np.empty((reader.count, *reader.image_shape), np.float32)
    reader.read_into(np.arange(reader.count), out)
    assert open_fds() == before + reader.num_shards  # one descriptor per shard
    reader.read_into(np.arange(reader.count), out)
    assert open_fds() == before + reader.num_shards  # and only one
    del reader
    gc.collect()
    assert open_fds() == before
