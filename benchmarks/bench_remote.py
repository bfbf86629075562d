#!/usr/bin/env python3
"""Object storage and Dask packing: reading a store from an S3 server against the same store on
local disk, and packing on a Dask cluster against the local packer.

Reading: the store is packed to local disk and to a real S3-compatible server on loopback
(moto's server mode, started here: a Python server, so its figures are a floor for a real
object store on a fast link). A ``shardfit.Sequence`` (batch 32, defaults otherwise) is read
for 3 epochs:

- ``local``: the local store (page cache warm after epoch 0);
- ``s3, cache holds the store``: ``cache_limit=None``: epoch 0 fetches every shard once, later
  epochs read the cache;
- ``s3, cache of half the store``: ``cache_limit`` = half the store's bytes: shards are evicted
  and fetched again, in bounded disk space.

Per epoch: images/s, bytes fetched from the server (every process's, from the cache's log),
the cache's hit rate (shard requests served without a fetch) and the largest number of bytes of
shard files seen in the cache (sampled under the cache's lock).

Packing: the same folder of JPEGs packed by the local packer (2 processes) and on a Dask
``LocalCluster`` of 1 and 2 single-threaded worker processes (``dask="local:N"``, cluster start
included), each checked byte-identical to the local pack.

Usage: ``python benchmarks/bench_remote.py [--images 2000] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from _report import OUT_HELP, fresh_out, publish  # noqa: E402

BATCH = 32
EPOCHS = 3


def tree_bytes(path: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(path):
        for n in names:
            full = Path(dirpath) / n
            out[str(full.relative_to(path))] = full.read_bytes()
    return out


def read_epochs(path: str, cache: Path | None, limit: int | None) -> list[dict[str, Any]]:
    from _s3server import cached_shard_bytes

    import shardfit

    kw: dict[str, Any] = {}
    if cache is not None:
        kw = {"cache_dir": cache, "cache_limit": limit}
    seq = shardfit.Sequence(path, batch_size=BATCH, **kw)
    rows = []
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], cached_shard_bytes(cache)) if cache is not None else 0
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    before = {"bytes": 0, "hits": 0, "misses": 0}
    try:
        for epoch in range(EPOCHS):
            peak[0] = 0
            seq.on_epoch_begin()
            start = time.perf_counter()
            n = 0
            for i in range(len(seq)):
                n += len(seq[i][0])
            seconds = time.perf_counter() - start
            if cache is not None:  # the watcher may not have run in a short epoch
                peak[0] = max(peak[0], cached_shard_bytes(cache))
            seq.on_epoch_end()
            row: dict[str, Any] = {"epoch": epoch, "images": n, "img_s": n / seconds}
            stats = seq.cache_stats
            if stats is not None:
                hits, misses = stats["hits"] - before["hits"], stats["misses"] - before["misses"]
                row.update(
                    fetched=stats["bytes_fetched_all"] - before["bytes"],
                    # None: no shard asked of the cache (every shard mapped already)
                    hit_rate=hits / (hits + misses) if hits + misses else None,
                    cache_peak=peak[0],
                )
                before = {
                    "bytes": int(stats["bytes_fetched_all"]),
                    "hits": int(stats["hits"]),
                    "misses": int(stats["misses"]),
                }
            rows.append(row)
    finally:
        stop.set()
        seq.close()
    return rows


def timed_pack(src: Path, out: Path, **kw: Any) -> float:
    import shardfit

    start = time.perf_counter()
    shardfit.pack_images(src, out, image_size=(224, 224), **kw)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="synthetic JPEGs to pack")
    p.add_argument("--shard-size", type=int, default=64, help="images per shard")
    p.add_argument("--pack-images", type=int, default=None, help="JPEGs for the packing rows")
    p.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    args = p.parse_args(argv)
    out = args.out or fresh_out()

    from _s3server import S3Server
    from bench_pack import make_images

    import shardfit

    work = Path(tempfile.mkdtemp(prefix="shardfit-bench-remote-"))
    server = S3Server()
    server.start()
    os.environ.update(server.env())
    try:
        src = work / "src"
        make_images(src, args.images, unique=min(args.images, 200))
        local = work / "local.zarr"
        shardfit.pack_images(src, local, image_size=(224, 224), shard_size=args.shard_size)
        bucket = server.new_bucket()
        url = f"s3://{bucket}/data.zarr"
        t0 = time.perf_counter()
        report = shardfit.pack_images(
            src,
            url,
            image_size=(224, 224),
            shard_size=args.shard_size,
            staging_dir=work / "staging",
        )
        upload_s = time.perf_counter() - t0
        store_bytes = shardfit.open_split(local).data_bytes()
        shards = shardfit.open_split(local).num_shards

        read: dict[str, list[dict[str, Any]]] = {}
        read["local"] = read_epochs(str(local), None, None)
        read["s3, cache holds the store"] = read_epochs(url, work / "cache-full", None)
        read["s3, cache of half the store"] = read_epochs(
            url, work / "cache-half", store_bytes // 2
        )

        n_pack = args.pack_images or min(args.images, 600)
        psrc = work / "psrc"
        make_images(psrc, n_pack, unique=min(n_pack, 200))
        pack: list[dict[str, Any]] = []
        ref = work / "p-local.zarr"
        seconds = timed_pack(psrc, ref, workers=2)
        pack.append({"variant": "local packer, 2 processes", "seconds": seconds, "same": True})
        ref_bytes = tree_bytes(ref)
        from distributed import Client, LocalCluster

        for n in (1, 2):
            dst = work / f"p-dask{n}.zarr"
            seconds = timed_pack(psrc, dst, dask=f"local:{n}")
            same = tree_bytes(dst) == ref_bytes
            pack.append({"variant": f"dask local:{n}", "seconds": seconds, "same": same})
            shutil.rmtree(dst)
            # the same on a cluster started beforehand: what the cluster's start cost above
            t0 = time.perf_counter()
            cluster = LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
            )
            client = Client(cluster)
            start_s = time.perf_counter() - t0
            try:
                seconds = timed_pack(psrc, dst, dask=client)
            finally:
                client.close()
                cluster.close()
            same = tree_bytes(dst) == ref_bytes
            pack.append(
                {
                    "variant": f"dask, {n} worker(s) started before ({start_s:.1f} s)",
                    "seconds": seconds,
                    "same": same,
                }
            )
            shutil.rmtree(dst)
        for row in pack:
            row["img_s"] = n_pack / row["seconds"]
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    mb = 1e6
    lines = [
        f"# Object storage and Dask packing ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Store: {args.images} images 224x224x3 float32, {shards} shards, "
        f"{store_bytes / mb:,.0f} MB; S3 server: moto on loopback. Packed to s3:// (local "
        f"staging + upload) in {upload_s:.1f} s, {report.bytes_uploaded / mb:,.0f} MB uploaded.",
        "",
        "| read | epoch | img/s | vs local | MB fetched | hit rate | cache peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in read.items():
        for row in rows:
            base = read["local"][row["epoch"]]["img_s"]
            fetched = f"{row['fetched'] / mb:,.0f}" if "fetched" in row else ""
            hit = ""
            if "hit_rate" in row:
                hit = "mapped" if row["hit_rate"] is None else f"{row['hit_rate']:.2f}"
            peak = f"{row['cache_peak'] / mb:,.0f}" if "cache_peak" in row else ""
            lines.append(
                f"| {name} | {row['epoch']} | {row['img_s']:,.0f} | {row['img_s'] / base:.2f} "
                f"| {fetched} | {hit} | {peak} |"
            )
    lines += [
        "",
        f"Packing {n_pack} JPEGs (300-560 px) to 224x224 float32:",
        "",
        "| packer | seconds | img/s | vs local | same bytes |",
        "|---|---|---|---|---|",
    ]
    for row in pack:
        lines.append(
            f"| {row['variant']} | {row['seconds']:.1f} | {row['img_s']:,.0f} "
            f"| {row['img_s'] / pack[0]['img_s']:.2f} | {'yes' if row['same'] else 'NO'} |"
        )
    doc = {
        "images": args.images,
        "store_bytes": store_bytes,
        "shards": shards,
        "upload_seconds": upload_s,
        "bytes_uploaded": report.bytes_uploaded,
        "read": read,
        "pack_images": n_pack,
        "pack": pack,
    }
    publish(out, "remote", doc, lines)
    return 0 if all(r["same"] for r in pack) else 1


if __name__ == "__main__":
    sys.exit(main())
