"""Restart after a crash: how long from a rerun's start to its first trained batch.

A run trains with ``shardfit.BackupAndRestore(save_freq=N)`` and is killed with SIGKILL mid-epoch;
the same script is run again and resumes at the batch after the last backup. Timed from the end
of the imports (Keras and TensorFlow take seconds to import whatever the loader does) to the end
of the first trained batch, in a fresh process, page cache dropped, under the same memory limit
as the loader benchmark's constrained regime (a third of the store) where the machine allows one;
beside it, the same for a fresh start (no backup) of the same script. Each child also reports
which batch it trained first, so the figure is for a real resume.

Usage::

    python benchmarks/bench_resume.py --store /path/to/big.zarr [--out DIR]

``--images N`` makes (and packs) a store of N synthetic 224x224 images when ``--store`` does not
exist: 20,000 gives the 12 GB store of the loader benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

BATCH = 32
SAVE_FREQ = 50


def child(args: argparse.Namespace) -> None:
    """One training run: kills itself after ``--kill-after`` batches, or stops after 3."""
    t_start = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    import shardfit

    t_imported = time.perf_counter()
    seq = shardfit.Sequence(args.store, batch_size=BATCH, seed=0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((224, 224, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4)]
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    marks: dict[str, Any] = {}

    class Probe(keras.callbacks.Callback):  # type: ignore[misc]
        trained = 0

        def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
            if self.trained == 0:
                marks["first_batch_s"] = time.perf_counter() - t_imported
                marks["resumed_at"] = backup.resumed_at  # (epoch, batch), or None
            self.trained += 1
            if args.kill_after and self.trained == args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if not args.kill_after and self.trained == 3:
                self.model.stop_training = True

    backup = shardfit.BackupAndRestore(args.backup, seq, save_freq=SAVE_FREQ)
    model.fit(seq, epochs=2, verbose=0, callbacks=[backup, Probe()])
    marks["import_s"] = t_imported - t_start
    marks["io"] = seq.io
    print("RESULT " + json.dumps(marks), flush=True)


def _drop_cache(store: Path) -> None:
    for f in store.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _run(store: Path, backup: Path, kill_after: int, limit: Any) -> dict[str, Any] | None:
    _drop_cache(store)
    cmd = [sys.executable, __file__, "--child", "--store", str(store), "--backup", str(backup)]
    cmd += ["--kill-after", str(kill_after)]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        preexec_fn=limit.preexec if limit is not None else None,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out: dict[str, Any] = json.loads(line[7:])
            return out
    if kill_after and proc.returncode == -signal.SIGKILL:
        return None
    raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/runs/<date-time>")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backup", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--kill-after", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0

    from _cgroup import Limited, availability

    import shardfit

    if not args.store.exists():
        from bench_pack import make_images

        src = args.store.with_suffix(".images")
        print(f"making {args.images} images and packing {args.store} ...", flush=True)
        make_images(src, args.images, unique=400)
        shardfit.pack_images(src, args.store, image_size=(224, 224), val_fraction=0.0)
    store_bytes = sum(f.stat().st_size for f in args.store.rglob("*") if f.is_file())
    can_limit, why = availability()
    limit_bytes = store_bytes // 3 if can_limit else None
    kill_after = 3 * SAVE_FREQ + 20  # mid-epoch, 20 batches after the third backup
    rows: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for kind in ("fresh start", "resume after kill -9"):
            with tempfile.TemporaryDirectory(prefix="shardfit-resume-") as tmp:
                backup = Path(tmp) / "backup"
                ctx = Limited(limit_bytes) if limit_bytes else None
                if ctx is not None:
                    ctx.__enter__()
                try:
                    if kind != "fresh start":
                        _run(args.store, backup, kill_after, ctx)
                    got = _run(args.store, backup, 0, ctx)
                finally:
                    if ctx is not None:
                        ctx.__exit__(None, None, None)
            assert got is not None
            got.update(kind=kind, rep=rep)
            rows.append(got)
            print(
                f"{kind:22s} first trained batch {got['first_batch_s']:.2f} s after the imports "
                f"(resumed at {got['resumed_at']}; imports {got['import_s']:.1f} s; "
                f"io={got['io']})",
                flush=True,
            )
    out = args.out or HERE / "runs" / datetime.now().strftime("%Y-%m-%d-%H%M")
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "store": str(args.store),
        "store_bytes": store_bytes,
        "memory_limit_bytes": limit_bytes,
        "memory_limit": why,
        "batch": BATCH,
        "save_freq": SAVE_FREQ,
        "killed_after_batches": kill_after,
        "date": datetime.now().isoformat(timespec="minutes"),
        "rows": rows,
    }
    (out / "resume.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        f"Restart to first trained batch: store {store_bytes / 2**30:.1f} GiB, batch {BATCH}, "
        f"save_freq={SAVE_FREQ}, killed after {kill_after} batches, memory limit "
        + (f"{limit_bytes / 2**30:.1f} GiB" if limit_bytes else f"none ({why})")
        + f", {doc['date']}.",
        "",
        "| start | first trained batch after the imports, median (min-max) | resumed at "
        "(epoch, batch) |",
        "|---|---|---|",
    ]
    for kind in ("fresh start", "resume after kill -9"):
        times = sorted(r["first_batch_s"] for r in rows if r["kind"] == kind)
        where = sorted({str(r["resumed_at"]) for r in rows if r["kind"] == kind})
        lines.append(
            f"| {kind} | {times[len(times) // 2]:.2f} s ({times[0]:.2f}-{times[-1]:.2f}) "
            f"| {', '.join(where)} |"
        )
    (out / "resume.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
