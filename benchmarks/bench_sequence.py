#!/usr/bin/env python3
"""Sequence benchmark: in-process batch throughput of shardfit.Sequence against a bare
memmap-copy loop over the same shard files, warm page cache, in one run.

Run: ``python benchmarks/bench_sequence.py`` (about a minute). Every (variant, repetition)
runs in a fresh process, variants interleaved; one warm-up epoch is discarded; the table gives
the median images/s with min-max over repetitions.

Variants (all read the same samples in the same shuffled epoch order, 224x224x3 float32):
- ``memmap-copy``: the ceiling. ``np.memmap`` of every shard file opened once, each sample
  copied into one reused batch buffer. No labels, no checks, no allocation.
- ``reader-into``: shardfit's reader filling one reused buffer (the hot path without Keras).
- ``sequence``: ``Sequence[i]`` for every batch, each batch released before the next is asked
  for, as Keras's own generator does (``yield dataset[i]`` keeps no reference).
- ``sequence-held``: the same, but the consumer still holds the previous batch while asking for
  the next, so the pool alternates two buffers (twice the cache footprint).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _report import OUT_HELP, fresh_out, publish  # noqa: E402


def make_store(root: Path, images: int, size: int) -> Path:
    """A float32 store of ``images`` photo-like images (JPEGs decoded once, at pack time)."""
    import numpy as np
    from PIL import Image

    import shardfit

    rng = np.random.default_rng(0)
    src = root / "src"
    unique = min(images, 200)
    made = []
    for i in range(images):
        cls = src / f"c{i % 4}"
        cls.mkdir(parents=True, exist_ok=True)
        path = cls / f"{i:06d}.jpg"
        if i < unique:
            low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)
            img.save(path, quality=90)
            made.append(path)
        else:
            os.link(made[i % unique], path)
    out = root / "bench.zarr"
    shardfit.pack_images(src, out, image_size=(size, size))
    return out


def _epoch_batches(path: Path, batch: int, epoch: int) -> list:
    from shardfit import Sequence

    seq = Sequence(path, batch_size=batch, seed=0)
    return [seq.sample_indices(i, epoch) for i in range(len(seq))]


def _touch(batch: tuple) -> float:
    """What a consumer does at the least: look at the batch."""
    return float(batch[0][-1, -1, -1, -1]) + float(batch[1][-1])


def run_variant(variant: str, path: Path, batch: int) -> dict:
    import numpy as np

    import shardfit

    reader = shardfit.open_split(path, "train")
    h, w, c = reader.image_shape
    buf = np.empty((batch, h, w, c), np.float32)
    shards = []
    if variant == "memmap-copy":  # mapped once, as the reader maps each shard once
        from _loaders import memmap_images

        shards = [memmap_images(reader, k) for k in range(reader.num_shards)]
    if variant.startswith("sequence"):
        from shardfit import Sequence

        seq = Sequence(path, batch_size=batch, seed=0)
    results = []
    for epoch in range(2):  # epoch 0 is the warm-up, discarded
        batches = _epoch_batches(path, batch, epoch)
        t0 = time.perf_counter()
        if variant == "memmap-copy":
            for samples in batches:
                for b, i in enumerate(samples.tolist()):
                    k, j = divmod(i, reader.shard_size)
                    buf[b] = shards[k][j]
        elif variant == "reader-into":
            for samples in batches:
                reader.read_into(samples, buf)
        elif variant == "sequence":
            for i in range(len(seq)):  # the second pass is epoch 1, as in the other variants
                _touch(seq[i])
        elif variant == "sequence-held":
            for i in range(len(seq)):
                x, y = seq[i]
                _touch((x, y))
        seconds = time.perf_counter() - t0
        results.append({"images": reader.count, "seconds": seconds})
    return results[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out or fresh_out()
    if args.child:
        print("RESULT " + json.dumps(run_variant(args.child, Path(args.store), args.batch)))
        return 0
    variants = ["memmap-copy", "reader-into", "sequence", "sequence-held"]
    raw: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="shardfit-bench-seq-") as tmp:
        print(f"packing {args.images} images at {args.size}x{args.size} ...", file=sys.stderr)
        store = make_store(Path(tmp), args.images, args.size)
        for _ in range(args.reps):
            for v in variants:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        v,
                        "--store",
                        str(store),
                        "--batch",
                        str(args.batch),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                raw[v].append(
                    json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
                )
    ceiling = statistics.median(r["images"] / r["seconds"] for r in raw["memmap-copy"])
    rows = []
    for v in variants:
        rates = [r["images"] / r["seconds"] for r in raw[v]]
        rows.append(
            {
                "variant": v,
                "median": statistics.median(rates),
                "min": min(rates),
                "max": max(rates),
                "ratio": statistics.median(rates) / ceiling,
            }
        )
    gb = args.images * args.size * args.size * 3 * 4 / 1e9
    lines = [
        f"Sequence benchmark, {args.images} images {args.size}x{args.size}x3 float32 "
        f"({gb:.1f} GB, warm page cache), batch {args.batch}, {args.reps} interleaved repetitions, "
        f"{time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        "| variant | images/s median (min-max) | GB/s | vs memmap-copy |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['median']:.0f} ({r['min']:.0f}-{r['max']:.0f}) | "
            f"{r['median'] * args.size * args.size * 12 / 1e9:.1f} | {r['ratio']:.2f}x |"
        )
    seq_ratio = next(r["ratio"] for r in rows if r["variant"] == "sequence")
    lines += [
        "",
        f"Goal: Sequence in-process at >= 80% of the memmap-copy loop: {seq_ratio:.0%}, "
        f"{'met' if seq_ratio >= 0.8 else 'NOT met'}.",
    ]
    publish(args.out, "sequence", {"rows": rows, "raw": raw}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
