#!/usr/bin/env python3
"""Pack benchmark: the packer's images/s and peak RAM against a bare PIL decode+resize loop.

Run: ``python benchmarks/bench_pack.py`` (about a minute on 2 cores). Every (variant,
repetition) runs in a fresh process; variants are interleaved; the table gives the median
images/s with min-max, the ratio to the bare loop, and the peak of the process tree's own memory
(Pss_Anon + Pss_Shmem, sampled at 5 Hz), with summed RSS as a flagged extra.

Variants:
- ``bare``: one process; for each file Image.open -> convert("RGB") -> resize(bilinear) ->
  float32 / 255. What the packer must do at the least, with nothing stored.
- ``bare-tuned``: the same loop with the allocation tweaks the packer's workers use (glibc keeps
  freed memory; the float32 result goes into one reused buffer).
- ``bare-Np``: N forked bare loops over shares of the files: the machine's own ceiling for
  N-way parallel decoding right now (on a shared VM, often well under N x).
- ``write``: the packer's write path alone (shardfit's shard writer, same bytes, no decoding):
  the ceiling the output side sets.
- ``pack-1w`` / ``pack-Nw``: ``shardfit.pack_images`` with 1 worker and with all cores, writing
  a float32 store (timed from the call to the complete, renamed store).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _memory import PeakSampler  # noqa: E402
from _report import OUT_HELP, fresh_out, publish  # noqa: E402


def _photo(h: int, w: int, rng) -> np.ndarray:  # type: ignore[name-defined]  # noqa: F821
    """Photo-like content: detail at every scale (a 1/f-like spectrum) plus sensor grain, so
    JPEG sizes (~3 bits per pixel at quality 90) and decode times resemble real photos rather
    than flat colour, which decodes several times faster."""
    import numpy as np
    from PIL import Image

    acc = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 60.0), (12, 40.0), (40, 28.0), (120, 18.0)):
        low = rng.normal(0.0, amp, (max(2, h * cells // 480), max(2, w * cells // 480), 3))
        low8 = np.clip(low + 128, 0, 255).astype(np.uint8)
        up = np.asarray(Image.fromarray(low8).resize((w, h), Image.Resampling.BICUBIC), np.float32)
        acc += up - 128
    acc += rng.normal(0.0, 6.0, (h, w, 3)).astype(np.float32)
    return np.clip(acc + 128, 0, 255).astype(np.uint8)


def make_images(
    root: Path, n: int, unique: int | None = None, classes: int = 4, seed: int = 0
) -> None:
    """``n`` photo-like JPEGs of ImageNet's typical size (300-480 x 400-560 px).

    Only ``unique`` of them are generated (generation is slower than decoding); the rest are
    hard links to those, which decode exactly as costly and keep the folder ``n`` files large.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    unique = n if unique is None else min(unique, n)
    made: list[Path] = []
    for i in range(n):
        cls = root / f"class{i % classes}"
        cls.mkdir(parents=True, exist_ok=True)
        path = cls / f"{i:06d}.jpg"
        if i < unique:
            h, w = int(rng.integers(300, 481)), int(rng.integers(400, 561))
            Image.fromarray(_photo(h, w, rng)).save(path, quality=90)
            made.append(path)
        else:
            os.link(made[i % unique], path)


def run_bare_parallel(src: Path, size: int, procs: int) -> dict:
    """The machine's own parallel ceiling: ``procs`` forked bare loops, each over its share of
    the files, no communication. What N cores give for this work on this machine right now."""
    files = sorted(p for p in src.rglob("*.jpg"))
    t0 = time.perf_counter()
    pids = []
    for k in range(procs):
        pid = os.fork()
        if pid == 0:
            try:
                _bare_loop(files[k::procs], size, tuned=False)
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return {"images": len(files), "seconds": time.perf_counter() - t0}


def _bare_loop(files: list[Path], size: int, tuned: bool) -> float:
    import numpy as np
    from PIL import Image

    out = np.empty((size, size, 3), np.float32)
    checksum = 0.0
    for path in files:
        with Image.open(path) as im:
            small = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            if tuned:
                arr = np.divide(np.asarray(small), 255, out=out, dtype=np.float32)
            else:
                arr = np.asarray(small, dtype=np.float32) / 255
        checksum += float(arr[0, 0, 0])
    return checksum


def run_bare(src: Path, size: int, tuned: bool) -> dict:
    """The bare loop. ``tuned``: the same loop with the packer's two allocation tweaks (glibc
    keeps freed memory; float32 output into one reused buffer), to tell decoding costs from
    allocation costs, which are high on VMs where a page's first touch is a hypervisor fault."""
    if tuned:
        from shardfit.pack._pool import _keep_freed_memory

        _keep_freed_memory()
    files = sorted(p for p in src.rglob("*.jpg"))
    t0 = time.perf_counter()
    _bare_loop(files, size, tuned)
    return {"images": len(files), "seconds": time.perf_counter() - t0}


def run_write(n: int, size: int, scratch: Path) -> dict:
    """The packer's write path alone: ``n`` float32 images through shardfit's shard writer
    (O_DIRECT where the filesystem allows it), no decoding. The output ceiling of the packer."""
    import numpy as np

    from shardfit.store._shardio import ShardFileWriter

    chunk = memoryview(np.random.default_rng(0).random(size * size * 3, dtype=np.float32)).cast("B")
    per_shard = max(1, round(128 * 2**20 / len(chunk)))
    t0 = time.perf_counter()
    for start in range(0, n, per_shard):
        writer = ShardFileWriter(str(scratch / f"write-{os.getpid()}" / str(start)), per_shard)
        for _ in range(min(per_shard, n - start)):
            writer.append(chunk)
        writer.close()
    seconds = time.perf_counter() - t0
    shutil.rmtree(scratch / f"write-{os.getpid()}")
    return {"images": n, "seconds": seconds}


def run_pack(src: Path, size: int, workers: int, scratch: Path) -> dict:
    import shardfit

    out = scratch / f"bench-{os.getpid()}.zarr"
    t0 = time.perf_counter()
    report = shardfit.pack_images(src, out, image_size=(size, size), workers=workers)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out)
    return {"images": report.counts["train"], "seconds": seconds, "shard_size": report.shard_size}


def child(args: argparse.Namespace) -> None:
    if args.variant in ("bare", "bare-tuned"):
        result = run_bare(Path(args.src), args.size, tuned=args.variant == "bare-tuned")
    elif args.variant.startswith("bare-") and args.variant.endswith("p"):
        result = run_bare_parallel(Path(args.src), args.size, int(args.variant[5:-1]))
    elif args.variant == "write":
        result = run_write(
            sum(1 for _ in Path(args.src).rglob("*.jpg")), args.size, Path(args.scratch)
        )
    else:
        workers = int(args.variant.split("-")[1].rstrip("w"))
        result = run_pack(Path(args.src), args.size, workers, Path(args.scratch))
    print("RESULT " + json.dumps(result), flush=True)


def measure(variant: str, src: Path, size: int, scratch: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--src",
        str(src),
        "--size",
        str(size),
        "--scratch",
        str(scratch),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    with PeakSampler(proc.pid, interval=0.2) as sampler:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed with exit code {proc.returncode}")
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    result.update(peak_own=sampler.peak.own, peak_rss=sampler.peak.rss, samples=sampler.samples)
    return result


def machine() -> dict:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import numpy
    import PIL
    import zarr

    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "zarr": zarr.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4800, help="images in the folder")
    p.add_argument("--unique", type=int, default=800, help="distinct images among them")
    p.add_argument("--size", type=int, default=224, help="packed image side in pixels")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    p.add_argument("--child", dest="variant", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out or fresh_out()
    if args.variant:
        child(args)
        return 0

    from tqdm import tqdm

    cores = len(os.sched_getaffinity(0))
    variants = ["bare", "bare-tuned", "write", "pack-1w"]
    if cores > 1:
        variants += [f"bare-{cores}p", f"pack-{cores}w"]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="shardfit-bench-") as tmp:
        src = Path(tmp) / "images"
        print(f"generating {args.unique} JPEGs, linked to {args.images} files ...", file=sys.stderr)
        make_images(src, args.images, args.unique)
        for _ in range(1):  # warm the page cache of the source files; discarded
            measure("bare", src, args.size, Path(tmp))
        with tqdm(total=args.reps * len(variants), desc="runs", file=sys.stderr) as bar:
            for _rep in range(args.reps):
                for v in variants:  # interleaved, so drifts of a shared machine hit all alike
                    results[v].append(measure(v, src, args.size, Path(tmp)))
                    bar.update()

    rows = []
    bare_median = statistics.median(r["images"] / r["seconds"] for r in results["bare"])
    tuned_median = statistics.median(r["images"] / r["seconds"] for r in results["bare-tuned"])
    shard_bytes = 0
    for v in variants:
        rates = [r["images"] / r["seconds"] for r in results[v]]
        own = max(r["peak_own"] for r in results[v])
        rss = max(r["peak_rss"] for r in results[v])
        if "shard_size" in results[v][0]:
            shard_bytes = results[v][0]["shard_size"] * args.size * args.size * 3 * 4
        rows.append(
            {
                "vs_tuned": statistics.median(rates) / tuned_median,
                "variant": v,
                "median": statistics.median(rates),
                "min": min(rates),
                "max": max(rates),
                "ratio": statistics.median(rates) / bare_median,
                "peak_own_mib": own / 2**20,
                "peak_rss_mib": rss / 2**20,
            }
        )
    doc = {
        "machine": machine(),
        "images": args.images,
        "size": args.size,
        "reps": args.reps,
        "shard_bytes": shard_bytes,
        "rows": rows,
        "raw": results,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    lines = [
        f"Pack benchmark, {args.images} photo-like JPEGs (300-480 x 400-560 px, ~3 bits/px) "
        f"-> {args.size}x{args.size} float32, "
        f"{args.reps} interleaved repetitions, {doc['machine']['cores']} cores "
        f"({doc['machine']['cpu']}), {doc['date']}.",
        "",
        "| variant | images/s median (min-max) | vs bare | vs bare-tuned "
        "| peak own RAM (Pss_Anon+Shmem) | RAM bound (workers x shard) "
        "| peak summed RSS (double-counts) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        workers = r["variant"].split("-")[1].rstrip("w") if r["variant"].startswith("pack") else ""
        bound = f"{int(workers) * shard_bytes / 2**20:.0f} MiB" if workers else "-"
        lines.append(
            f"| {r['variant']} | {r['median']:.0f} ({r['min']:.0f}-{r['max']:.0f}) | "
            f"{r['ratio']:.2f}x | {r['vs_tuned']:.2f}x | {r['peak_own_mib']:.0f} MiB | {bound} | "
            f"{r['peak_rss_mib']:.0f} MiB |"
        )
    lines += [
        "",
        f"Shard size {shard_bytes / 2**20:.0f} MiB. Own RAM is the peak over time of the sum over "
        "the process tree of Pss_Anon + Pss_Shmem (5 Hz); summed RSS double-counts shared pages.",
    ]
    by = {r["variant"]: r for r in rows}
    one = by["pack-1w"]["ratio"]
    lines += ["", "Goals (packing issue), this run:", ""]
    lines.append(
        f"- packer at 1 worker within 15% of the bare loop (>= 0.85x): {one:.2f}x, "
        f"{'met' if one >= 0.85 else 'NOT met'}"
    )
    if f"pack-{cores}w" in by:
        many = by[f"pack-{cores}w"]["ratio"]
        ceiling = by[f"bare-{cores}p"]["ratio"]
        lines.append(
            f"- packer at {cores} workers >= 1.6x the bare loop: {many:.2f}x, "
            f"{'met' if many >= 1.6 else 'NOT met'}; the machine's own ceiling for {cores} "
            f"parallel bare loops in this run was {ceiling:.2f}x, so the packer reached "
            f"{many / ceiling:.0%} of what {cores} cores gave"
        )
    publish(args.out, "pack", doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
