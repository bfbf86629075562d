"""Stores in object storage, against a real S3-compatible server on loopback (moto's server mode,
started here): packed to ``s3://``, read through the bounded local shard cache, in-process and
in worker processes, through a server that stops and comes back."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _s3server import CuttingProxy, S3Server, cached_shard_bytes
from conftest import decode_index, make_folder, tree_bytes

import shardfit
from shardfit import (
    CacheFullError,
    ChecksumError,
    DatasetFormatError,
    InvalidOptionError,
    OutputExistsError,
    RemoteStoreError,
)

pytest.importorskip("moto")
pytest.importorskip("obstore")

SHARD = 8
#: bytes of one shard file of 8 images of 8x8x3 float32: images, their crc32c, the index
SHARD_BYTES = SHARD * (8 * 8 * 3 * 4 + 4) + 16 * SHARD + 4
#: fail fast when the server is gone: one retry inside obstore, 2 s per request
FAST_FAIL = {"retry_config": {"max_retries": 1, "retry_timeout": timedelta(seconds=2)}}


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    s = S3Server()
    s.start()
    yield s
    s.stop()


@pytest.fixture
def s3(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server, with the standard AWS variables pointing at it."""
    if server.proc is None:
        server.start()
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return server


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    make_folder(root, {"cat": 40, "dog": 37})
    return root


@pytest.fixture(scope="module")
def local_store(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "data.zarr"
    shardfit.pack_images(source, out, image_size=(8, 8), shard_size=SHARD, val_fraction=0.2)
    return out


def packed(s3: S3Server, source: Path, tmp_path: Path, **how: Any) -> str:
    """``source`` packed to a new bucket as the local store is (``how``: more arguments of
    ``pack_images``); its URL."""
    url = f"s3://{s3.new_bucket()}/sets/data.zarr"
    pack_to(url, source, tmp_path, **how)
    return url


def pack_to(url: str, source: Path, tmp_path: Path, **how: Any) -> shardfit.PackReport:
    """``source`` packed to ``url`` as the local store is."""
    return shardfit.pack_images(
        source,
        url,
        image_size=(8, 8),
        shard_size=SHARD,
        val_fraction=0.2,
        staging_dir=tmp_path / "staging",
        **how,
    )


# -- packing -------------------------------------------------------------------------------------


def test_a_store_packed_to_s3_holds_the_local_packs_bytes(
    s3: S3Server, source: Path, local_store: Path, tmp_path: Path
) -> None:
    url = packed(s3, source, tmp_path)
    bucket = url.split("/")[2]
    objects = s3.objects(bucket, "sets/data.zarr")
    local = tree_bytes(local_store)
    assert objects == local  # every array, label, checksum and attribute: the same bytes
    assert not (tmp_path / "staging").exists() or not any((tmp_path / "staging").rglob("*.json"))


def test_packing_over_a_published_store_needs_overwrite(
    s3: S3Server, source: Path, tmp_path: Path
) -> None:
    url = packed(s3, source, tmp_path)
    with pytest.raises(OutputExistsError, match=re.escape(url) + ".*overwrite=True"):
        shardfit.pack_images(source, url, image_size=(8, 8), shard_size=SHARD)
    shardfit.pack_images(
        source, url, image_size=(8, 8), shard_size=4, overwrite=True, staging_dir=tmp_path / "s"
    )
    reader = shardfit.open_split(url, cache_dir=tmp_path / "cache")
    assert reader.shard_size == 4 and reader.count == 77


def test_the_cli_packs_to_s3(s3: S3Server, source: Path, tmp_path: Path) -> None:
    from shardfit.cli import pack_main

    url = f"s3://{s3.new_bucket()}/cli.zarr"
    args = [str(source), url, "--image-size", "8", "8", "--shard-size", "8"]
    assert pack_main([*args, "--staging-dir", str(tmp_path / "st")]) == 0
    assert shardfit.open_split(url, cache_dir=tmp_path / "c").count == 77
    assert pack_main(args) == 2  # published already: one line, no traceback


# -- reading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_sample_read_from_s3_equals_the_local_stores(
    s3: S3Server, source: Path, local_store: Path, tmp_path: Path, split: str
) -> None:
    url = packed(s3, source, tmp_path)
    remote = shardfit.open_split(url, split, cache_dir=tmp_path / "cache")
    local = shardfit.open_split(local_store, split)
    order = np.random.default_rng(0).permutation(local.count)
    np.testing.assert_array_equal(remote.read(order), local.read(order))
    np.testing.assert_array_equal(remote.labels(), local.labels())
    assert remote.paths() == local.paths()
    assert remote.io_mode == "mmap"  # an unbounded cache holds the split: mapped, as a local one
    stats = remote.cache_stats()
    assert stats is not None and stats["misses"] == remote.num_shards


MODES: dict[str, dict[str, Any]] = {
    "in-process, streamed": {"io": "stream"},
    "in-process, pread": {"io": "pread"},
    "threads": {"workers": 2},
    "2 worker processes": {"workers": 2, "use_multiprocessing": True},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_sequence_over_s3_serves_the_local_stores_batches(
    s3: S3Server, source: Path, local_store: Path, tmp_path: Path, mode: str
) -> None:
    pytest.importorskip("keras")
    from shardfit import Sequence

    url = packed(s3, source, tmp_path)
    kw = {"batch_size": 5, "seed": 3, **MODES[mode]}
    remote = Sequence(url, cache_dir=tmp_path / "cache", cache_limit=6 * SHARD_BYTES, **kw)
    local = Sequence(local_store, **kw)
    try:
        for _ in range(2):
            remote.on_epoch_begin()
            local.on_epoch_begin()
            for i in range(len(local)):
                x_r, y_r = remote[i]
                x_l, y_l = local[i]
                np.testing.assert_array_equal(x_r, x_l)
                np.testing.assert_array_equal(y_r, y_l)
            remote.on_epoch_end()
            local.on_epoch_end()
    finally:
        remote.close()
        local.close()


def test_a_cache_that_holds_the_split_is_read_through_mappings(
    s3: S3Server, source: Path, local_store: Path, tmp_path: Path
) -> None:
    url = packed(s3, source, tmp_path)
    small = 4 * SHARD_BYTES  # the train split has 8 shards
    with pytest.raises(InvalidOptionError, match=rf"io='mmap' keeps .* cache_limit={small} "):
        shardfit.open_split(url, io="mmap", cache_dir=tmp_path / "a", cache_limit=small)
    assert shardfit.open_split(url, cache_dir=tmp_path / "a", cache_limit=small).io_mode == "pread"
    remote = shardfit.open_split(url, io="mmap", cache_dir=tmp_path / "b")
    local = shardfit.open_split(local_store)
    order = np.random.default_rng(1).permutation(local.count)
    np.testing.assert_array_equal(remote.read(order), local.read(order))


def test_fit_in_two_worker_processes_trains_from_s3(
    s3: S3Server, source: Path, tmp_path: Path
) -> None:
    keras = pytest.importorskip("keras")
    from shardfit import Sequence

    url = packed(s3, source, tmp_path)
    seq = Sequence(
        url,
        batch_size=8,
        workers=2,
        use_multiprocessing=True,
        cache_dir=tmp_path / "cache",
        cache_limit=8 * SHARD_BYTES,
    )
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    try:
        history = model.fit(seq, epochs=2, verbose=0)
        seen = [decode_index(img)[0] for i in range(len(seq)) for img in seq[i][0]]
        stats = seq.cache_stats
    finally:
        seq.close()
    assert np.isfinite(history.history["loss"]).all() and len(history.history["loss"]) == 2
    assert sorted(seen) == sorted(set(seen)) and len(seen) == seq.num_samples
    # fetched by the workers (forked from a fork server) and this process's read-ahead
    assert stats is not None and stats["bytes_fetched_all"] >= seq._reader.data_bytes()


# -- the cache -----------------------------------------------------------------------------------


def test_the_cache_never_holds_more_than_its_limit(
    s3: S3Server, source: Path, tmp_path: Path
) -> None:
    pytest.importorskip("keras")
    from shardfit import Sequence

    url = packed(s3, source, tmp_path)
    cache = tmp_path / "cache"
    limit = 3 * SHARD_BYTES
    seq = Sequence(url, batch_size=4, workers=2, cache_dir=cache, cache_limit=limit)
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, cached_shard_bytes(cache))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(2):
            seq.on_epoch_begin()
            for i in range(len(seq)):
                seq[i]
                peak = max(peak, cached_shard_bytes(cache))
            seq.on_epoch_end()
    finally:
        stop.set()
        watcher.join()
        seq.close()
    stats = seq.cache_stats
    assert stats is not None
    store_bytes = seq._reader.data_bytes()
    assert 0 < peak <= limit
    # 8 shards through a cache of 3: shards are fetched again in the second epoch
    assert stats["bytes_fetched_all"] > store_bytes


def test_a_cache_that_holds_the_store_fetches_nothing_after_the_first_epoch(
    s3: S3Server, source: Path, tmp_path: Path
) -> None:
    pytest.importorskip("keras")
    from shardfit import Sequence

    url = packed(s3, source, tmp_path)
    seq = Sequence(url, batch_size=4, io="pread", cache_dir=tmp_path / "cache")
    fetched = []
    for _ in range(3):
        seq.on_epoch_begin()
        for i in range(len(seq)):
            seq[i]
        seq.on_epoch_end()
        stats = seq.cache_stats
        assert stats is not None
        fetched.append(stats["bytes_fetched_all"])
    seq.close()
    assert fetched[0] == seq._reader.data_bytes()  # the store's shards, each once
    assert fetched[1] == fetched[2] == fetched[0]


def _read_all(url: str, cache: str, env: dict[str, str], out: Any) -> None:
    os.environ.update(env)
    reader = shardfit.open_split(url, cache_dir=cache)
    out.put(reader.read(np.arange(reader.count)).sum())


def test_processes_sharing_a_cache_fetch_each_shard_once(
    s3: S3Server, source: Path, tmp_path: Path
) -> None:
    url = packed(s3, source, tmp_path)
    cache = str(tmp_path / "cache")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_read_all, args=(url, cache, s3.env(), out)) for _ in range(3)]
    for p in procs:
        p.start()
    sums = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    reader = shardfit.open_split(url, cache_dir=cache)
    assert len(set(sums)) == 1
    stats = reader.cache_stats()
    assert stats is not None and stats["bytes_fetched_all"] == reader.data_bytes()


def test_a_cache_too_small_for_one_shard_says_so(
    s3: S3Server, source: Path, tmp_path: Path
) -> None:
    url = packed(s3, source, tmp_path)
    reader = shardfit.open_split(url, cache_dir=tmp_path / "c", cache_limit=SHARD_BYTES - 1)
    with pytest.raises(CacheFullError, match=r"cache_limit=\d+ bytes cannot hold one shard"):
        reader.read([0])


# -- failures ------------------------------------------------------------------------------------


def test_a_missing_store_is_one_error_naming_it(s3: S3Server, tmp_path: Path) -> None:
    url = f"s3://{s3.new_bucket()}/nothing.zarr"
    with pytest.raises(RemoteStoreError, match=re.escape(url + "/zarr.json") + " does not exist"):
        shardfit.open_split(url, cache_dir=tmp_path)


def test_bad_remote_options_are_refused_naming_them(s3: S3Server, tmp_path: Path) -> None:
    url = f"s3://{s3.new_bucket()}/x.zarr"
    with pytest.raises(InvalidOptionError, match=r"cache_limit must be a positive int .* 0"):
        shardfit.open_split(url, cache_limit=0, cache_dir=tmp_path)
    with pytest.raises(InvalidOptionError, match=r"storage_options for .* are not usable"):
        shardfit.open_split(url, storage_options={"no_such_option": 1}, cache_dir=tmp_path)
    with pytest.raises(InvalidOptionError, match="apply to an object store URL"):
        shardfit.open_split(tmp_path / "x.zarr", cache_limit=10)


def test_keras_own_forked_worker_pool_is_refused_for_an_object_store(
    s3: S3Server, source: Path, tmp_path: Path
) -> None:
    pytest.importorskip("keras")
    from shardfit import Sequence

    url = packed(s3, source, tmp_path)
    with pytest.raises(InvalidOptionError, match=r"use shared_memory=True for s3://"):
        Sequence(url, workers=2, use_multiprocessing=True, shared_memory=False, cache_dir=tmp_path)


def test_s3fs_style_storage_options_work_without_the_environment(
    s3: S3Server, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = packed(s3, source, tmp_path)
    for name in s3.env():
        monkeypatch.delenv(name)
    options = {
        "key": "testing",
        "secret": "testing",
        "endpoint_url": s3.endpoint,
        "client_kwargs": {"region_name": "us-east-1"},
    }
    reader = shardfit.open_split(url, storage_options=options, cache_dir=tmp_path / "c")
    assert reader.read([0, 1]).shape == (2, 8, 8, 3)


def test_a_damaged_object_is_refused_naming_it(s3: S3Server, source: Path, tmp_path: Path) -> None:
    url = packed(s3, source, tmp_path)
    bucket = url.split("/")[2]
    c = s3.client()
    key = "sets/data.zarr/train/images/c/1/0/0/0"
    body = bytearray(c.get_object(Bucket=bucket, Key=key)["Body"].read())
    c.put_object(Bucket=bucket, Key=key, Body=bytes(body[:-100]))  # cut short
    reader = shardfit.open_split(url, cache_dir=tmp_path / "a")
    with pytest.raises(DatasetFormatError, match=re.escape(f"{url}/train/images/c/1/0/0/0")):
        reader.read([SHARD])
    body[100] ^= 0xFF  # a flipped byte in the first image
    c.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    reader = shardfit.open_split(url, cache_dir=tmp_path / "b")
    with pytest.raises(ChecksumError, match=re.escape(f"{url}/train/images/c/1/0/0/0")):
        reader.read([SHARD])


def test_a_server_stopped_mid_epoch_stops_fit_naming_the_object_and_a_restarted_one_goes_on(
    s3: S3Server, source: Path, local_store: Path, tmp_path: Path
) -> None:
    keras = pytest.importorskip("keras")
    from shardfit import Sequence

    url = packed(s3, source, tmp_path)
    bucket = url.split("/")[2]
    seq = Sequence(
        url,
        batch_size=4,
        cache_dir=tmp_path / "cache",
        cache_limit=2 * SHARD_BYTES,
        storage_options=FAST_FAIL,
        io="pread",
    )
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))

    class StopServer(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch == 2:
                s3.stop()

    started = time.monotonic()
    with pytest.raises(Exception, match=re.escape(url) + r"/train/images/c/\d+/0/0/0 could not"):
        model.fit(seq, epochs=1, verbose=0, callbacks=[StopServer()])
    assert time.monotonic() - started < 60
    # the server comes back with its objects (moto keeps them in memory: they are put back)
    s3.start()
    s3.client().create_bucket(Bucket=bucket)
    s3.upload_tree(local_store, bucket, "sets/data.zarr")
    history = model.fit(seq, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    seq.close()


def test_a_download_cut_mid_body_is_fetched_again_and_read_exactly(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "big"
    make_folder(src, {"a": 40, "b": 40}, size=(32, 32))
    local = tmp_path / "local.zarr"
    shardfit.pack_images(src, local, image_size=(32, 32), shard_size=40)  # ~480 KB shards
    url = f"s3://{s3.new_bucket()}/big.zarr"
    shardfit.pack_images(src, url, image_size=(32, 32), shard_size=40, staging_dir=tmp_path / "s")
    proxy = CuttingProxy(s3.port, after=300_000)  # past the metadata: inside a shard's body
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        remote = shardfit.open_split(url, cache_dir=tmp_path / "cache", io="pread")
        order = np.arange(remote.count)
        np.testing.assert_array_equal(remote.read(order), shardfit.open_split(local).read(order))
    finally:
        proxy.close()
    assert proxy.cuts == 1


@pytest.mark.slow  # a Dask cluster of its own
def test_a_dask_pack_to_s3_holds_the_local_packs_bytes(
    s3: S3Server, source: Path, local_store: Path, tmp_path: Path
) -> None:
    pytest.importorskip("distributed")
    url = packed(s3, source, tmp_path, dask="local:2")
    objects = s3.objects(url.split("/")[2], "sets/data.zarr")
    local = tree_bytes(local_store)
    assert objects == local


def test_a_cache_keyed_by_the_plan_evicts_the_shard_read_furthest_ahead(
    s3: S3Server, source: Path, tmp_path: Path
) -> None:
    url = packed(s3, source, tmp_path)
    cache = tmp_path / "cache"
    reader = shardfit.open_split(url, cache_dir=cache, cache_limit=3 * SHARD_BYTES, io="pread")
    reader.read(np.arange(3 * SHARD))  # shards 0, 1, 2 cached: the cache is full
    # the plan reads shard 0 next, then 1, then 2: shard 2 goes to make room for shard 3,
    # though shard 0 is the least recently used (LRU would delete it)
    reader.key_cache(np.array([1.0, 10.0, 30.0] + [np.inf] * (reader.num_shards - 3)))
    reader.read(np.arange(3 * SHARD))  # hits, 0 first: keyed files keep their keys
    reader.read([3 * SHARD])
    cached = sorted(int(p.parts[-4]) for p in cache.rglob("images/c/*/0/0/0"))
    assert cached == [0, 1, 3]


def test_a_publish_cut_short_resumes_sending_only_what_is_missing(
    s3: S3Server, source: Path, local_store: Path, tmp_path: Path
) -> None:
    from shardfit.pack._remote import staging_path
    from shardfit.remote._client import Location

    url = packed(s3, source, tmp_path)
    bucket, prefix = url.split("/")[2], "sets/data.zarr"
    c = s3.client()
    # as an upload killed part way leaves it: its marker, no root, one shard not sent yet
    pack_id = shardfit.read_info(local_store).pack_id
    c.put_object(Bucket=bucket, Key=f"{prefix}/.shardfit-upload-{pack_id}", Body=b"")
    c.delete_object(Bucket=bucket, Key=f"{prefix}/zarr.json")
    c.delete_object(Bucket=bucket, Key=f"{prefix}/train/images/c/2/0/0/0")
    with pytest.raises(RemoteStoreError, match=r"zarr\.json does not exist"):
        shardfit.open_split(url, cache_dir=tmp_path / "c0")
    staged = Path(staging_path(Location.of(url), tmp_path / "staging"))
    shutil.copytree(local_store, staged)  # the staged pack the killed run had finished
    report = pack_to(url, source, tmp_path, resume=True)
    shard = (local_store / "train/images/c/2/0/0/0").stat().st_size
    root = (local_store / "zarr.json").stat().st_size
    assert report.bytes_uploaded == shard + root
    assert s3.objects(bucket, prefix) == tree_bytes(local_store)
