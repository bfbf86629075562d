#!/usr/bin/env python3
"""Pack benchmark: the packer's images/s and peak RAM against a bare PIL decode+resize loop.

Run: ``python benchmarks/bench_pack.py`` (about a minute on 2 cores). Every (variant,
repetition) runs in a fresh process; variants are interleaved; the table gives the median
images/s with min-max, the ratio to the bare loop, and the peak of the process tree's own memory
(Pss_Anon + Pss_Shmem, sampled at 5 Hz), with summed RSS as a flagged extra.

Variants:
- ``bare``: one process; for each file Image.open -> convert("RGB") -> resize(bilinear) ->
  float32 / 255. What the packer must do at the least, with nothing stored.
- ``write``: the disk's ceiling for the packer's output: the same number of float32 image
  bytes written to a new file, one image per call (no decoding).
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


def _photo(h: int, w: int, rng) -> "np.ndarray":  # type: ignore[name-defined]  # noqa: F821
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


def make_images(root: Path, n: int, classes: int = 4, seed: int = 0) -> None:
    """``n`` photo-like JPEGs of ImageNet's typical size (300-480 x 400-560 px)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = int(rng.integers(300, 481)), int(rng.integers(400, 561))
        cls = root / f"class{i % classes}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(h, w, rng)).save(cls / f"{i:06d}.jpg", quality=90)


def run_bare(src: Path, size: int) -> dict:
    import numpy as np
    from PIL import Image

    files = sorted(p for p in src.rglob("*.jpg"))
    t0 = time.perf_counter()
    checksum = 0.0
    for path in files:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR),
                             dtype=np.float32) / 255
        checksum += float(arr[0, 0, 0])
    return {"images": len(files), "seconds": time.perf_counter() - t0}


def run_write(n: int, size: int, scratch: Path) -> dict:
    """The disk's own ceiling for the packer's output: write the bytes of ``n`` float32 images,
    one image per write call as the packer does, to a new file."""
    import numpy as np

    chunk = memoryview(np.random.default_rng(0).random(size * size * 3, dtype=np.float32)).cast("B")
    path = scratch / f"write-{os.getpid()}.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(n):
        os.write(fd, chunk)
    os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
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
    if args.variant == "bare":
        result = run_bare(Path(args.src), args.size)
    elif args.variant == "write":
        result = run_write(sum(1 for _ in Path(args.src).rglob("*.jpg")), args.size, Path(args.scratch))
    else:
        workers = int(args.variant.split("-")[1].rstrip("w"))
        result = run_pack(Path(args.src), args.size, workers, Path(args.scratch))
    print("RESULT " + json.dumps(result), flush=True)


def measure(variant: str, src: Path, size: int, scratch: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--src", str(src), "--size", str(size),
           "--scratch", str(scratch)]
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

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "ram_gib": round(mem / 2**30, 1),
            "python": platform.python_version(), "numpy": numpy.__version__,
            "pillow": PIL.__version__, "zarr": zarr.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=800, help="images to generate")
    p.add_argument("--size", type=int, default=224, help="packed image side in pixels")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder for JSON + markdown")
    p.add_argument("--child", dest="variant", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        child(args)
        return 0

    from tqdm import tqdm

    cores = len(os.sched_getaffinity(0))
    variants = ["bare", "write", "pack-1w"] + ([f"pack-{cores}w"] if cores > 1 else [])
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="shardfit-bench-") as tmp:
        src = Path(tmp) / "images"
        print(f"generating {args.images} JPEGs ...", file=sys.stderr)
        make_images(src, args.images)
        for _ in range(1):  # warm the page cache of the source files; discarded
            measure("bare", src, args.size, Path(tmp))
        with tqdm(total=args.reps * len(variants), desc="runs", file=sys.stderr) as bar:
            for _rep in range(args.reps):
                for v in variants:  # interleaved, so drifts of a shared machine hit all alike
                    results[v].append(measure(v, src, args.size, Path(tmp)))
                    bar.update()

    rows = []
    bare_median = statistics.median(r["images"] / r["seconds"] for r in results["bare"])
    shard_bytes = 0
    for v in variants:
        rates = [r["images"] / r["seconds"] for r in results[v]]
        own = max(r["peak_own"] for r in results[v])
        rss = max(r["peak_rss"] for r in results[v])
        if "shard_size" in results[v][0]:
            shard_bytes = results[v][0]["shard_size"] * args.size * args.size * 3 * 4
        rows.append({"variant": v, "median": statistics.median(rates), "min": min(rates),
                     "max": max(rates), "ratio": statistics.median(rates) / bare_median,
                     "peak_own_mib": own / 2**20, "peak_rss_mib": rss / 2**20})
    doc = {"machine": machine(), "images": args.images, "size": args.size, "reps": args.reps,
           "shard_bytes": shard_bytes, "rows": rows, "raw": results,
           "date": time.strftime("%Y-%m-%d %H:%M")}
    lines = [
        f"Pack benchmark, {args.images} JPEGs (300-480 x 400-560) -> {args.size}x{args.size} float32, "
        f"{args.reps} interleaved repetitions, {doc['machine']['cores']} cores "
        f"({doc['machine']['cpu']}), {doc['date']}.",
        "",
        "| variant | images/s median (min-max) | vs bare loop | peak own RAM (Pss_Anon+Shmem) | "
        "peak summed RSS (double-counts) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['median']:.0f} ({r['min']:.0f}-{r['max']:.0f}) | "
                     f"{r['ratio']:.2f}x | {r['peak_own_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB |")
    lines += ["", f"Shard size: {shard_bytes / 2**20:.0f} MiB; RAM bound to meet: about workers x shard "
              "bytes + a small constant."]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pack.json").write_text(json.dumps(doc, indent=1))
    (args.out / "pack.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
