#!/usr/bin/env python3
"""Memory benchmark: the loader's own RAM under ``model.fit`` with process workers, for a
1 GB and a >= 3 GB dataset, across three epochs.

Run: ``python benchmarks/bench_memory.py`` (a few minutes; writes ~4 GB under --tmp).

For each dataset a fresh process builds a small model, then trains it for 3 epochs on
``Sequence(batch_size=32, workers=2, use_multiprocessing=True, max_queue_size=10)``. This
script samples the process tree (the training process and shardfit's worker processes) at 4 Hz.
The loader's own memory is the peak, during fit, of the tree's Pss_Anon + Pss_Shmem minus the
same sum just before fit (TensorFlow, the model and the dataset object are there already);
page cache of the mapped shards (Pss_File) is reported apart. The bound to meet is
(max_queue_size + 2 x workers + 2) x batch bytes + 150 MB: the shared-memory ring's slots
(batches read ahead, one being built and one waiting per worker, the model's) and the rest.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _memory import tree_memory  # noqa: E402
from _report import OUT_HELP, fresh_out, publish  # noqa: E402

BATCH, WORKERS, QUEUE, SIZE = 32, 2, 10, 224


def make_store(root: Path, images: int) -> Path:
    import numpy as np
    from PIL import Image

    import shardfit

    rng = np.random.default_rng(1)
    src = root / f"src{images}"
    made: list[Path] = []
    for i in range(images):
        cls = src / f"c{i % 4}"
        cls.mkdir(parents=True, exist_ok=True)
        path = cls / f"{i:06d}.png"
        if i < 100:
            low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(low).resize((SIZE, SIZE), Image.Resampling.BICUBIC).save(path)
            made.append(path)
        else:
            os.link(made[i % 100], path)
    out = root / f"d{images}.zarr"
    shardfit.pack_images(src, out, image_size=(SIZE, SIZE))
    return out


def child(store: str) -> None:
    import keras

    from shardfit import Sequence

    seq = Sequence(
        store, batch_size=BATCH, workers=WORKERS, use_multiprocessing=True, max_queue_size=QUEUE
    )
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4)(x))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    class Marks(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch, logs=None):  # type: ignore[no-untyped-def]
            print(f"EPOCH_END {epoch}", flush=True)

    print("READY", flush=True)
    sys.stdin.readline()  # the parent has taken the baseline
    model.fit(seq, epochs=3, verbose=0, callbacks=[Marks()])
    print("DONE", flush=True)


def measure(store: Path) -> dict:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(store)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    while proc.stdout.readline().strip() != "READY":
        pass
    time.sleep(1.0)
    base = [tree_memory(proc.pid) for _ in range(4)]
    baseline = min(m.own for m in base)
    proc.stdin.write("go\n")
    proc.stdin.flush()

    def fresh() -> dict:  # type: ignore[type-arg]
        return {"peak_own": 0, "peak_file": 0, "peak_rss": 0, "max_procs": 0, "samples": 0}

    # by the epoch the child said it is in: a short epoch may get no sample at all, and must
    # not shift the others
    epochs: dict[int, dict] = {0: fresh()}  # type: ignore[type-arg]
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    seen = 0
    current = 0
    t0 = time.perf_counter()
    while proc.poll() is None and current < 3:
        m = tree_memory(proc.pid)
        e = epochs[current]
        e["peak_own"] = max(e["peak_own"], m.own)
        e["peak_file"] = max(e["peak_file"], m.file)
        e["peak_rss"] = max(e["peak_rss"], m.rss)
        e["max_procs"] = max(e["max_procs"], m.processes)
        e["samples"] += 1
        while seen < len(lines):
            if lines[seen].startswith("EPOCH_END"):
                current = int(lines[seen].split()[1]) + 1
                epochs[current] = fresh()
            seen += 1
        time.sleep(0.25)
    proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"training process failed ({proc.returncode})")
    return {
        "baseline_own": baseline,
        "epochs": [epochs.get(k, fresh()) for k in range(3)],
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1700, 5200], help="images per store")
    p.add_argument("--tmp", default=None, help="folder for the stores (default: system temp)")
    p.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out or fresh_out()
    if args.child:
        child(args.child)
        return 0
    batch_bytes = BATCH * SIZE * SIZE * 3 * 4
    bound = (QUEUE + 2 * WORKERS + 2) * batch_bytes + 150e6
    rows = []
    with tempfile.TemporaryDirectory(prefix="shardfit-bench-mem-", dir=args.tmp) as tmp:
        for n in args.sizes:
            print(f"packing {n} images ...", file=sys.stderr)
            store = make_store(Path(tmp), n)
            result = measure(store)
            result.update(images=n, gb=n * batch_bytes / BATCH / 1e9)
            rows.append(result)
            import shutil

            shutil.rmtree(store)
    lines = [
        f"Memory under fit, Sequence(batch_size={BATCH}, workers={WORKERS}, "
        f"use_multiprocessing=True, max_queue_size={QUEUE}), 224x224x3 float32, "
        f"{time.strftime('%Y-%m-%d %H:%M')}. Bound: ({QUEUE} + 2 x {WORKERS} + 2) x "
        f"{batch_bytes / 1e6:.1f} MB + 150 MB = {bound / 1e6:.0f} MB.",
        "",
        "| dataset | epoch | loader's own RAM (peak - baseline) | within bound | mapped files "
        "(Pss_File: shards + libraries) | summed RSS (double-counts) | processes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for i, e in enumerate(r["epochs"]):
            if not e["samples"]:
                lines.append(
                    f"| {r['gb']:.1f} GB ({r['images']} images) | {i} | no sample: the epoch "
                    "was shorter than one sampling period | | | | |"
                )
                continue
            own = e["peak_own"] - r["baseline_own"]
            lines.append(
                f"| {r['gb']:.1f} GB ({r['images']} images) | {i} | {own / 1e6:.0f} MB | "
                f"{'yes' if own <= bound else 'NO'} | {e['peak_file'] / 1e6:.0f} MB | "
                f"{e['peak_rss'] / 1e6:.0f} MB | {e['max_procs']} |"
            )
    lines += [
        "",
        "Baseline (TensorFlow, model, dataset object, before fit): "
        + ", ".join(f"{r['baseline_own'] / 1e6:.0f} MB" for r in rows)
        + ".",
    ]
    publish(args.out, "memory", {"bound": bound, "rows": rows}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
