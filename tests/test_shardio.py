"""The shard writer: direct (O_DIRECT) and plain writes give the same bytes, zarr reads both."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest

from shardfit.store import _shardio
from shardfit.store._shardio import MISSING, ShardFileWriter, read_shard_index


def _chunks() -> list[bytes]:
    # ~20 MiB in chunks of odd sizes: spans several 8 MiB staging buffers, none aligned
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, 400_013 + i, dtype=np.uint8).tobytes() for i in range(50)]


def _write(path: Path, chunks: list[bytes], direct: bool) -> bytes:
    writer = ShardFileWriter(str(path), 64, direct=direct)
    for chunk in chunks:
        writer.append(chunk)
    size = writer.close()
    data = path.read_bytes()
    assert size == len(data)
    return data


def test_direct_and_plain_writes_give_identical_shards(tmp_path: Path) -> None:
    chunks = _chunks()
    direct = _write(tmp_path / "d" / "0", chunks, direct=True)
    plain = _write(tmp_path / "p" / "0", chunks, direct=False)
    assert direct == plain
    index = read_shard_index(str(tmp_path / "d" / "0"), 64)
    for j, chunk in enumerate(chunks):
        off, n = (int(v) for v in index[j])
        assert direct[off : off + n] == chunk
    assert (index[len(chunks) :] == MISSING).all()


def test_a_refused_direct_write_falls_back_without_losing_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = _chunks()
    real = ShardFileWriter._pwrite_all
    calls = {"n": 0}

    def refuse_second_big_write(self: ShardFileWriter, data, offset: int) -> None:  # type: ignore[no-untyped-def]
        if len(data) >= _shardio._STAGE_BYTES:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        real(self, data, offset)

    monkeypatch.setattr(ShardFileWriter, "_pwrite_all", refuse_second_big_write)
    fallback = _write(tmp_path / "f" / "0", chunks, direct=True)
    monkeypatch.undo()
    assert calls["n"] >= 2, "the refused write never happened"
    assert fallback == _write(tmp_path / "p" / "0", chunks, direct=False)


def test_an_aborted_shard_leaves_no_file(tmp_path: Path) -> None:
    writer = ShardFileWriter(str(tmp_path / "a" / "0"), 4)
    writer.append(b"x" * 5000)
    writer.abort()
    assert list((tmp_path / "a").iterdir()) == []


def test_too_many_chunks_is_an_error(tmp_path: Path) -> None:
    writer = ShardFileWriter(str(tmp_path / "a" / "0"), 1)
    writer.append(b"x")
    with pytest.raises(ValueError, match="already holds 1 chunks"):
        writer.append(b"y")
    writer.abort()


def test_a_shard_missing_an_image_is_refused_by_name(tmp_path: Path) -> None:
    from shardfit.errors import DatasetFormatError
    from shardfit.store._shardio import read_full_shard_index

    writer = ShardFileWriter(str(tmp_path / "s" / "0"), 4)
    for _ in range(3):
        writer.append(b"x" * 12)
    writer.close()
    assert read_full_shard_index(str(tmp_path / "s" / "0"), 4, 3).shape == (4, 2)
    with pytest.raises(DatasetFormatError, match=r"s/0 holds 3 of its 4 images"):
        read_full_shard_index(str(tmp_path / "s" / "0"), 4, 4)
