"""io="stream": whole shards read ahead along the plan give exactly the batches of the other
read paths, read each shard once per epoch, and name the file when one is bad."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder

from shardfit import DatasetFormatError, InvalidOptionError, SequenceOptions, pack_images
from shardfit.read._reader import SplitReader
from shardfit.read._stage import ShardStager, read_path
from shardfit.store._format import shard_path

pytest.importorskip("keras")
from shardfit import Sequence

SHARD = 8


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage")
    make_folder(root / "src", {"a": 30, "b": 25, "c": 20})  # 75 images: a short last shard
    out = {}
    for name, kw in {
        "float32": {},
        "uint8": {"dtype": "uint8"},
        "zstd": {"dtype": "uint8", "compression": "zstd"},
    }.items():
        out[name] = root / f"{name}.zarr"
        pack_images(root / "src", out[name], image_size=(8, 8), shard_size=SHARD, workers=0, **kw)
    return out


def epochs_of(seq: Sequence, epochs: int) -> list[list[np.ndarray]]:
    """Batches as a training loop with epoch hooks gets them (the way fit asks)."""
    seen = []
    for _ in range(epochs):
        seq.on_epoch_begin()
        seen.append([np.array(seq[i][0]) for i in range(len(seq))])
        seq.on_epoch_end()
    return seen


@pytest.mark.parametrize("kind", ["float32", "uint8", "zstd"])
@pytest.mark.parametrize(
    "options",
    [
        {"batch_size": 8, "shuffle_window": 2},
        {"batch_size": 5, "shuffle_window": 1, "drop_remainder": True},
        {"batch_size": 32, "shuffle_window": 3},  # one batch spans several windows
        {"batch_size": 7, "shuffle": False, "workers": 2},
        {"batch_size": 6, "shuffle_window": 4, "workers": 3, "max_queue_size": 2},
    ],
)
def test_stream_gives_exactly_the_batches_of_mapped_reads(
    stores: dict[str, Path], kind: str, options: dict[str, object]
) -> None:
    streamed = Sequence(stores[kind], seed=3, io="stream", **options)
    mapped = Sequence(stores[kind], seed=3, io="mmap", **options)
    assert streamed.io == "stream" and mapped.io == "mmap"
    for a, b in zip(epochs_of(streamed, 3), epochs_of(mapped, 3), strict=True):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    streamed.close()


def test_stream_reads_each_shard_once_per_epoch(stores: dict[str, Path]) -> None:
    seq = Sequence(stores["float32"], batch_size=8, seed=1, io="stream", shuffle_window=2)
    epochs_of(seq, 4)
    stager = seq._stage
    assert stager is not None
    shards = seq._reader.num_shards
    # the reads ahead run into the next epoch's first shards, at most `ahead` of them
    assert 4 * shards <= stager.shards_read <= 4 * shards + stager.ahead


def test_a_request_outside_an_epoch_starts_reading_the_stream(stores: dict[str, Path]) -> None:
    # Keras's probes come before the first epoch: they are served from the files, and the
    # reads of the stream's first shards start then, while Keras compiles the model
    seq = Sequence(stores["float32"], batch_size=8, io="stream", shuffle_window=2)
    mapped = Sequence(stores["float32"], batch_size=8, io="mmap", shuffle_window=2)
    np.testing.assert_array_equal(seq[3][0], mapped[3][0])
    stager = seq._stage
    assert stager is not None and stager.shards_read == stager.ahead
    seq.close()


def test_stager_lets_go_of_windows_behind_the_stream(stores: dict[str, Path]) -> None:
    reader = SplitReader(stores["float32"])
    stager = ShardStager(
        reader, seed=0, shuffle=True, window=2, batch_size=8, drop_remainder=False, streams=2
    )
    order = np.arange(reader.count)
    for b in range(0, 10):
        stager.advance(0, b)
        with stager.hold(0, order[b * 8 : (b + 1) * 8]) as get:
            get(int(order[b * 8]) // SHARD)
        assert len(stager._slots) <= stager.ahead + 2 * 2
    stager.close()


def test_a_truncated_shard_names_the_file(stores: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(stores["float32"], copy)
    bad = shard_path(str(copy), "train", 2)
    with open(bad, "r+b") as f:
        f.truncate(100)
    seq = Sequence(copy, batch_size=8, io="stream", shuffle=False)
    seq.on_epoch_begin()
    seq[0], seq[1]  # shards 0 and 1 (under an epoch, the n-th request gets the n-th batch)
    with pytest.raises(DatasetFormatError, match=f"shard file {bad} is truncated"):
        seq[2]
    seq.close()


def test_a_missing_shard_names_the_file(stores: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(stores["float32"], copy)
    bad = shard_path(str(copy), "train", 1)
    Path(bad).unlink()
    seq = Sequence(copy, batch_size=8, io="stream", shuffle=False)
    seq.on_epoch_begin()
    seq[0]
    with pytest.raises(DatasetFormatError, match=f"shard file {bad} is missing"):
        seq[1]
    seq.close()


def test_stream_with_worker_processes_is_refused() -> None:
    with pytest.raises(InvalidOptionError, match="io='stream' reads whole shards"):
        SequenceOptions(io="stream", workers=2, use_multiprocessing=True)
    with pytest.raises(InvalidOptionError, match="io must be one of"):
        SequenceOptions(io="fast")  # type: ignore[arg-type]


def test_auto_streams_only_what_cannot_stay_cached(stores: dict[str, Path]) -> None:
    def choose(memory: int, reader_io: str = "pread", mode: str = "in-process") -> str:
        # reader_io: what the reader chose (io="auto") for this much memory
        reader = SplitReader(stores["float32"], io=reader_io)  # type: ignore[arg-type]
        return read_path("auto", reader, mode, 4, memory=memory)  # type: ignore[arg-type]

    reader = SplitReader(stores["float32"])
    shard = -(-reader.data_bytes() // reader.num_shards)
    assert choose(10**9, reader_io="mmap") == "mmap"  # the shards fit: mapped
    # larger than the page cache: streamed if 4 + 4 + 1 shard buffers fit in a third of memory
    assert choose(9 * shard * 3) == "stream"
    assert choose(9 * shard * 3 - 1) == "pread"
    assert choose(9 * shard * 3, mode="processes") == "pread"
