#!/usr/bin/env python3
"""Transport benchmark: how batches reach the consumer through Keras's PyDataset adapter.

Run: ``python benchmarks/bench_transport.py`` (a few minutes). Every (variant, repetition) runs
in a fresh process, variants interleaved; each variant pulls batches the way ``fit`` does
(``PyDatasetAdapter.get_numpy_iterator``, Keras's own worker pool included), one warm-up epoch
discarded, then one timed epoch; the consumer touches every batch. Warm page cache.

Variants (same store, same epoch plan, 224x224x3 float32, batch 32):
- ``in-process``: ``Sequence(workers=1)``.
- ``2 threads``: ``workers=2``.
- ``2 processes, Keras pool``: ``workers=2, use_multiprocessing=True, shared_memory=False``:
  every batch pickled through a pipe.
- ``2 processes, shared memory``: the same with shardfit's slot ring (the default).
- ``... + Python transform``: a per-sample augmentation written in plain Python (GIL-bound,
  about a millisecond per image), in-process, 1 process and 2 processes.

Two rates: steady state (first to last batch of the epoch) and whole epoch (Keras starts a new pool
per epoch and waits 100 ms at its end: on short epochs that dominates; docs/design.md, "How Keras
runs a PyDataset").
"""

from __future__ import annotations

import argparse
import json
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
from bench_sequence import make_store  # noqa: E402

VARIANTS = {
    "in-process": {"workers": 1},
    "2 threads": {"workers": 2},
    "2 processes, Keras pool": {"workers": 2, "use_multiprocessing": True, "shared_memory": False},
    "2 processes, shared memory": {"workers": 2, "use_multiprocessing": True},
    "in-process + Python transform": {"workers": 1, "heavy": True},
    "1 process + Python transform": {"workers": 1, "use_multiprocessing": True, "heavy": True},
    "2 processes + Python transform": {"workers": 2, "use_multiprocessing": True, "heavy": True},
}


def python_heavy(image, rng):  # type: ignore[no-untyped-def]
    """A per-sample augmentation in plain Python: brightness jitter computed pixel row by
    pixel row with a Python-level loop (GIL-bound work, like many hand-written augmentations)."""
    gain = 0.9 + 0.2 * rng.random()
    acc = 0.0
    for k in range(30_000):  # pure-Python arithmetic: ~1 ms
        acc += (k % 7) * gain
    image *= gain if acc >= 0 else 1.0
    return image


def run_variant(variant: str, store: Path, batch: int) -> dict:  # type: ignore[type-arg]
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    from shardfit import Sequence
    from shardfit.transforms import per_sample

    opts = dict(VARIANTS[variant])
    heavy = opts.pop("heavy", False)
    seq = Sequence(
        store,
        batch_size=batch,
        seed=0,
        max_queue_size=10,
        transform=per_sample(python_heavy) if heavy else None,
        **opts,
    )
    adapter = PyDatasetAdapter(seq, shuffle=False)
    result = {}
    for epoch in range(2):
        adapter.on_epoch_begin()
        t0 = time.perf_counter()
        first = last = None
        images = 0
        touch = 0.0
        for x, y in adapter.get_numpy_iterator():
            touch += float(x[-1, -1, -1, -1]) + float(y[-1])
            images += len(x)
            last = time.perf_counter()
            if first is None:
                first, first_n = last, len(x)
        adapter.on_epoch_end()
        whole = time.perf_counter() - t0
        if epoch == 1:
            result = {
                "images": images,
                "steady": (images - first_n) / (last - first),
                "whole": images / whole,
                "first_batch_s": first - t0,
                "stats": seq.transport_stats,
            }
    seq.close()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3200)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out or fresh_out()
    if args.child:
        print("RESULT " + json.dumps(run_variant(args.child, Path(args.store), args.batch)))
        return 0
    from tqdm import tqdm

    raw: dict[str, list[dict]] = {v: [] for v in VARIANTS}  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp), args.images, args.size)
        runs = [(r, v) for r in range(args.reps) for v in VARIANTS]
        for _, v in tqdm(runs, desc="transport", unit="run"):
            proc = subprocess.run(
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
                timeout=900,
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                raise SystemExit(f"{v} failed:\n{proc.stderr[-3000:]}")
            raw[v].append(json.loads(line[0][7:]))
    med = {v: statistics.median(r["steady"] for r in rs) for v, rs in raw.items()}
    base = med["in-process"]
    lines = [
        f"Transport benchmark: {args.images} images {args.size}x{args.size}x3 float32, batch "
        f"{args.batch}, {args.reps} repetitions, through Keras's PyDataset adapter, warm. "
        f"{time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        "| variant | steady img/s median (min-max) | vs in-process | whole epoch img/s "
        "| batches via shared memory / pickled |",
        "|---|---|---|---|---|",
    ]
    for v, rs in raw.items():
        s = [r["steady"] for r in rs]
        w = statistics.median(r["whole"] for r in rs)
        stats = rs[-1]["stats"]
        via = f"{stats[0]} / {stats[1]}" if stats else "-"
        lines.append(
            f"| {v} | {med[v]:.0f} ({min(s):.0f}-{max(s):.0f}) | {med[v] / base:.2f}x | "
            f"{w:.0f} | {via} |"
        )
    shm, pool = med["2 processes, shared memory"], med["2 processes, Keras pool"]
    one, two = med["1 process + Python transform"], med["2 processes + Python transform"]
    lines += [
        "",
        f"- 2 processes through shared memory: {shm / base:.0%} of in-process (goal >= 70%), "
        f"{shm / pool:.1f}x Keras's pickling pool (goal >= 10x).",
        f"- Python-heavy transform: 2 processes {two / one:.2f}x 1 process (goal >= 1.6x).",
    ]
    publish(args.out, "transport", {"medians": med, "raw": raw}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
