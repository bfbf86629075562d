#!/usr/bin/env python3
"""Loader benchmark: shardfit beside what people use today and the machine's own ceilings,
on the same bytes, in one run. Throughput against RAM.

Run: ``python benchmarks/run.py --size small`` (what the slow test suite runs) or ``--size
full`` (warm and cold on 7,200 images, a 4.3 GB float32 store; the constrained regime on 20,000
images, a 12 GB store; about 40 minutes; with ``--peers``, about 60). Every (variant, regime,
repetition) runs in a fresh process; variants are interleaved within each data set (warm and
cold share one; the constrained regime's is packed after the first is deleted); the warm regime
discards one warm-up epoch; the consumer touches every batch.

Peers (``--peers``, ``pip install 'shardfit[peers]'``): Grain over ArrayRecord, MosaicML
Streaming (MDS), LitData and WebDataset (tar shards of float32 ``.npy``, and of JPEGs), each
packed from the same folder with its own writer (time and bytes on disk in the report) and read
as its documentation shows with 2 worker processes (benchmarks/_peers.py): a loader row and a
``fit: <peer>`` row in every regime. A peer that cannot run gets its reason in its row.

Backends: every row names the Keras backend its process ran (``none``: Keras not imported).
``fit: shardfit (jax)`` and ``(torch)`` run the same Sequence with ``KERAS_BACKEND`` set, warm
and constrained, each beside its backend's own ``fit: constant batch`` ceiling.

Regimes:
- ``warm``: page cache primed by a discarded first epoch.
- ``cold``: the shard files' and source JPEGs' pages dropped (``posix_fadvise(DONTNEED)``)
  before the one, timed epoch.
- ``constrained``: as cold, on a store larger than RAM would be for most training machines
  (20,000 images at full size), under a cgroup v1 memory limit of a third of the float32 store,
  so every epoch is read from disk; an OOM kill is a result. Run where the machine allows a
  limit (root and a memory controller); otherwise the report says why not.

Ceilings: ``ceiling: memmap copy`` (warm: copying page-cached samples); cold and constrained, the
disk's own limit, the faster of two patterns of many large reads in flight: ``ceiling: parallel
reads`` (8 threads each reading a whole shard file) and ``ceiling: shard streams`` (shardfit's
read-ahead of whole shards along the epoch plan with nothing copied out); and beside them
``ceiling: preadv`` (one large read at a time, what a simple loop gets).

Figures per row: images/s (median, min-max) of the timed epoch (the second of two, but cold,
where only one is run), percent of the regime's ceiling, the first epoch's images/s, images per
CPU-second (the process tree's, live workers included), time to first batch, and RAM: the
peak of the loader's own memory (tree Pss_Anon + Pss_Shmem, 4 Hz, minus the process's memory
after its imports: Keras and TensorFlow where the variant needs them, shown apart), mapped files
(Pss_File), summed RSS flagged, /dev/shm segments left behind, and under the limit the cgroup's
own peak and OOM kills.

End to end, the ``fit: ...`` rows feed a small model (global average pooling, one dense layer)
with each loader for 2 epochs (1 when cold) and time the last: whole-epoch images/s, and
steady-state images/s from the first to the last batch; ``fit: constant batch``
(one in-memory batch served again and again) is the framework's own ceiling for those rows
(one per Keras backend).

A full run times the decode-bound baselines (PIL Sequence, image_dataset_from_directory, the
zarr-python PyDataset; loader and fit rows) over their first 800 images per epoch (their rate is
set by decoding each image, the same over a whole epoch), and leaves them out of the constrained
regime (there they run at their cold pace); the loaders that hold everything in RAM (the RAM-copy
ceiling, in-memory numpy) are left out of the cold regime, where their epoch is the warm one.
Every other variant reads whole epochs in every regime.
"""

from __future__ import annotations

import argparse
import contextlib
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

import _cgroup  # noqa: E402
from _memory import PeakSampler  # noqa: E402
from _peers import PEERS as PEER_LIBRARIES  # noqa: E402
from _report import OUT_HELP, fresh_out, publish  # noqa: E402

SIZES = {  # images, side in pixels, repetitions, regimes
    "small": (192, 64, 1, ("warm",)),
    "full": (7200, 224, 3, ("warm", "cold", "constrained")),
}
#: Images of the constrained regime's data set, where it differs: the scale shardfit is for.
CONSTRAINED_IMAGES = {"small": 192, "full": 20000}
#: The memory limit of the constrained regime, as a fraction of the float32 store.
LIMIT_FRACTION = 3
#: Decode-bound baselines: timed over their first CAP images per epoch in a full run (their
#: rate is set by decoding each image and is the same over a whole epoch), and left out of the
#: constrained regime, where they run at their cold pace; both keep a full run shorter.
SLOW = {
    "PIL Sequence",
    "image_dataset_from_directory",
    "zarr-python PyDataset",
    "fit: PIL Sequence",
    "fit: image_dataset_from_directory",
    "fit: zarr-python PyDataset",
}
CAP = {"small": None, "full": 800}
#: Repetitions of the decode-bound baselines in a full run (the others run ``reps`` times):
#: their rates vary little, and each costs a minute.
SLOW_REPS = 2
#: Rows shown for reference that no goal is measured against (the one-at-a-time read
#: ceilings, the other store formats, the loaders that run out of memory under the limit):
#: also ``SLOW_REPS`` repetitions in a full run, which keeps it within its 40 minutes.
REFERENCE = {
    "ceiling: memmap copy",
    "ceiling: preadv",
    "ceiling: RAM copy",
    "in-memory numpy",
    "fit: in-memory numpy",
    "shardfit uint8",
    "shardfit zstd",
}
NOT_CONSTRAINED = SLOW
#: The dedicated streaming loaders (benchmarks/_peers.py), run with ``--peers``: each packs the
#: folder with its own writer into a copy of its own (4 more copies of the float32 data).
PEERS = tuple(PEER_LIBRARIES)
PEER_VARIANTS = {*PEERS, *(f"fit: {p}" for p in PEERS)}
#: Repetitions of the peers' rows in a full run, by regime: under the memory limit each of
#: their runs takes 1-2 minutes (two epochs of 20,000 images at 400-800 img/s), 13 minutes for
#: one repetition of the ten rows.
PEER_REPS = {"warm": 2, "cold": 2, "constrained": 1}
#: ``fit`` under Keras's other backends: variant -> KERAS_BACKEND (the other rows: TensorFlow,
#: where Keras is imported at all).
BACKEND_OF = {
    "fit: shardfit (jax)": "jax",
    "fit: shardfit (torch)": "torch",
    "fit: constant batch (jax, ceiling)": "jax",
    "fit: constant batch (torch, ceiling)": "torch",
}
#: Loaders whose timed epoch never reads the disk (everything was loaded into RAM first): a
#: cold epoch is the same as a warm one for them, so they run warm (and under the limit, where
#: they run out of memory) only. The other backends' rows run warm and under the limit.
NOT_COLD = {"ceiling: RAM copy", "in-memory numpy", "fit: in-memory numpy", *BACKEND_OF}
#: With the peers, the constrained regime's data set (20,000 images: 12 GB per float32 copy)
#: would not fit this machine's 70 GB of free disk with the zstd store too: a reference row,
#: left out there with this reason.
PEERS_CROWD_OUT = {
    "shardfit zstd": "left out with --peers: no disk for a 7 GB zstd store beside "
    "the peers' four 12 GB copies"
}
#: The rows whose fastest is a regime's ceiling (the disk's limit: the better of two patterns of
#: large reads, measured side by side).
CEILING = {
    "warm": ("ceiling: memmap copy",),
    "cold": ("ceiling: parallel reads", "ceiling: shard streams"),
    "constrained": ("ceiling: parallel reads", "ceiling: shard streams"),
}
#: Ceilings that mean nothing warm (they measure the disk).
NOT_WARM = {"ceiling: parallel reads", "ceiling: shard streams"}
#: The ceiling of the ``fit`` rows of each Keras backend: its own constant-batch row.
FIT_CEILING = {
    "tensorflow": "fit: constant batch (ceiling)",
    "jax": "fit: constant batch (jax, ceiling)",
    "torch": "fit: constant batch (torch, ceiling)",
}
#: Variants that need Keras (and so TensorFlow) imported: measured from that baseline.
USES_KERAS = {
    "shardfit float32",
    "shardfit float32, verify off",
    "shardfit uint8",
    "shardfit zstd",
    "shardfit 2 threads",
    "shardfit 2 processes",
    "image_dataset_from_directory",
    "tf.data over shards",
}


def data_files(stores: dict[str, Path], src: Path) -> list[Path]:
    """Every file of every store (shardfit's and the peers') and of the source folder."""
    return [p for root in (*stores.values(), src) for p in Path(root).rglob("*") if p.is_file()]


def _drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its descendants: each live process's own time
    plus that of the children it has reaped. (``getrusage(RUSAGE_CHILDREN)`` counts reaped
    children only, and shardfit's worker processes live as long as their Sequence.)"""
    from _memory import tree_pids

    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return total / tick


def child_fit(args: argparse.Namespace, ctx: object) -> None:
    """One variant feeding ``model.fit`` of a small model; times the last epoch."""
    _import_peer(args.child)  # first: see _import_peer
    import keras
    from _loaders import FIT_VARIANTS
    from _memory import tree_memory

    baseline = tree_memory(os.getpid()).own
    data = FIT_VARIANTS[args.child](ctx)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((args.px, args.px, 3)),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4),
        ]
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    marks: list[tuple[float, float | None, int]] = []

    class Timer(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch, logs=None):  # type: ignore[no-untyped-def]
            self.t0, self.first, self.batches = time.perf_counter(), None, 0

        def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
            self.batches += 1
            self.last = time.perf_counter()
            if self.first is None:
                self.first = self.last

        def on_epoch_end(self, epoch, logs=None):  # type: ignore[no-untyped-def]
            marks.append((time.perf_counter() - self.t0, self.last - self.first, self.batches))

    # the last of 2 epochs is timed, but cold (where the second epoch would be warm)
    epochs = 1 if args.regime == "cold" else 2
    if args.regime != "warm":
        _drop_cache(data_files(ctx.stores, ctx.src))  # type: ignore[attr-defined]
    cpu0 = tree_cpu_s(os.getpid())
    if isinstance(data, tuple):
        model.fit(
            data[0], data[1], batch_size=args.batch, epochs=epochs, verbose=0, callbacks=[Timer()]
        )
    else:
        model.fit(data, epochs=epochs, verbose=0, callbacks=[Timer()])
    cpu = (tree_cpu_s(os.getpid()) - cpu0) / epochs
    whole, steady, batches = marks[-1]
    images = batches * args.batch  # the last batch may be smaller: a small overcount
    print(
        "RESULT "
        + json.dumps(
            {
                "images": images,
                "seconds": whole,
                "first_batch_s": None,
                "cpu_s": cpu,
                "baseline": baseline,
                "steady_rate": (batches - 1) * args.batch / steady if steady else None,
                "first_epoch_rate": marks[0][2] * args.batch / marks[0][0] if epochs > 1 else None,
                "backend": keras.backend.backend(),
            }
        ),
        flush=True,
    )


def _import_peer(variant: str) -> None:
    """Import what a peer's loader needs before the baseline is taken (its own imports are
    shown apart, as Keras's are); a peer that is not installed ends the child with SKIP.

    Before Keras: Streaming imports transformers, which imports torch._dynamo and with it
    Triton (in torch's CUDA builds, which torchvision needs here), and Triton loaded into a
    process that holds TensorFlow already crashes it (SIGSEGV at import, seen here with torch
    2.14.1, Triton 3.8, TensorFlow 2.21); the other order works."""
    name = variant.removeprefix("fit: ")
    if name not in PEERS:
        return
    import importlib

    import _peers

    try:
        _peers.require(name)
    except _peers.PeerMissing as e:
        print(f"SKIP {e}", flush=True)
        sys.exit(3)
    for module in _peers.IMPORTS[name]:
        importlib.import_module(module)


def child(args: argparse.Namespace) -> None:
    from _loaders import VARIANTS, Ctx
    from _memory import tree_memory

    stores = {k: Path(v) for k, v in json.loads(args.stores).items()}
    ctx = Ctx(
        stores=stores,
        src=Path(args.src),
        batch=args.batch,
        size=args.px,
        cap=args.cap if args.child in SLOW else None,
    )
    if args.child.startswith("fit: "):
        child_fit(args, ctx)
        return
    _import_peer(args.child)
    if args.child in USES_KERAS:
        import keras  # noqa: F401  (the framework's own memory is the baseline, not the loader's)
    baseline = tree_memory(os.getpid()).own
    epoch = VARIANTS[args.child](ctx)
    start_epoch = 0
    first_epoch_rate = None
    if args.regime != "warm":
        _drop_cache(data_files(stores, ctx.src))
    if args.regime != "cold":
        # warm: epoch 0 fills the page cache; under the limit, every epoch is read from disk,
        # and epoch 0 bears one-time costs (verify="once" checks every image then)
        t0, count = time.perf_counter(), 0
        for x, _ in epoch(0):
            count += len(x)
        first_epoch_rate = count / (time.perf_counter() - t0)
        start_epoch = 1
    cpu0 = tree_cpu_s(os.getpid())
    t0 = time.perf_counter()
    first = None
    images = 0
    checksum = 0.0
    for x, y in epoch(start_epoch):
        if first is None:
            first = time.perf_counter() - t0
        checksum += float(x[-1, -1, -1, -1]) + float(y[-1])  # the consumer touches every batch
        images += len(x)
    seconds = time.perf_counter() - t0
    cpu = tree_cpu_s(os.getpid()) - cpu0
    print(
        "RESULT "
        + json.dumps(
            {
                "images": images,
                "seconds": seconds,
                "first_batch_s": first,
                "cpu_s": cpu,
                "baseline": baseline,
                "first_epoch_rate": first_epoch_rate,
                "backend": _keras_backend(),
            }
        ),
        flush=True,
    )


def _keras_backend() -> str:
    """The Keras backend this process runs, or "none" where it never imported Keras."""
    if "keras" not in sys.modules:
        return "none"
    import keras

    return str(keras.backend.backend())


def expected_backend(variant: str) -> str:
    """The Keras backend a variant's child runs under (its report row's ``backend``)."""
    if variant in BACKEND_OF:
        return BACKEND_OF[variant]
    return "tensorflow" if variant.startswith("fit: ") or variant in USES_KERAS else "none"


def _shm_segments() -> set[str]:
    """shardfit's own files in /dev/shm (its rings are named ``shardfit-*``). Only those: other
    programs on the machine (a multiprocessing semaphore of another job) come and go."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("shardfit-")}
    except OSError:
        return set()


def measure(
    variant: str,
    regime: str,
    data: dict,
    batch: int,
    px: int,
    limit: int | None = None,
    cap: int | None = None,
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--regime",
        regime,
        "--stores",
        json.dumps(data["stores"]),
        "--src",
        data["src"],
        "--batch",
        str(batch),
        "--px",
        str(px),
        *(["--cap", str(cap)] if cap else []),
    ]
    env = {**os.environ, "KERAS_BACKEND": BACKEND_OF.get(variant, "tensorflow")}
    before = _shm_segments()
    started = time.perf_counter()
    group = _cgroup.Limited(limit) if regime == "constrained" and limit else None
    cg_stats: dict = {}
    with group if group is not None else contextlib.nullcontext():
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=group.preexec if group is not None else None,
        )
        with PeakSampler(proc.pid, interval=0.25) as sampler:
            out, err = proc.communicate()
        if group is not None:
            cg_stats = group.stats()
    leftover = sorted(_shm_segments() - before)
    skip = [x[5:] for x in out.splitlines() if x.startswith("SKIP ")]
    if proc.returncode == 3 and skip:
        return {"error": skip[0], "shm_left": leftover}
    if proc.returncode != 0:
        oom = proc.returncode == -9 and cg_stats.get("oom_kills", 1) > 0
        if oom and limit:
            return {"error": f"OOM at {limit / 2**30:.1f} GiB", "shm_left": leftover, **cg_stats}
        return {
            "error": "OOM-killed" if oom else f"exit {proc.returncode}: {err.strip()[-300:]}",
            "shm_left": leftover,
        }
    result = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
    result.update(
        wall_s=time.perf_counter() - started,  # the whole run: imports, loading, epochs
        peak_own=sampler.peak.own,
        peak_file=sampler.peak.file,
        peak_rss=sampler.peak.rss,
        shm_left=leftover,
        **cg_stats,
    )
    return result


#: shardfit's stores: name -> pack_images options
SHARDFIT_STORES: dict[str, dict] = {
    "float32": {},
    "uint8": {"dtype": "uint8"},
    "zstd": {"compression": "zstd"},
}


def prepare(
    root: Path,
    images: int,
    px: int,
    src: Path | None,
    peers: tuple[str, ...] = (),
    leave_out: tuple[str, ...] = (),
) -> dict:
    """Make (or take) the image folder; pack it into shardfit's stores (but ``leave_out``) and
    each of ``peers``' formats with its own writer, timing each pack and sizing it on disk.
    Each pack runs in this process, one at a time, the machine otherwise idle."""
    from _peers import disk_bytes
    from _peers import pack as pack_peer
    from bench_pack import make_images

    import shardfit

    root.mkdir(parents=True, exist_ok=True)
    if src is None:
        src = root / "images"
        make_images(src, images, unique=min(images, 400))
    stores, packs = {}, {}
    for name, kw in SHARDFIT_STORES.items():
        if name in leave_out:
            continue
        stores[name] = str(root / f"{name}.zarr")
        t0 = time.perf_counter()
        shardfit.pack_images(src, stores[name], image_size=(px, px), **kw)
        packs[f"shardfit {name}"] = {
            "seconds": time.perf_counter() - t0,
            "bytes": disk_bytes(Path(stores[name])),
            "images": images,
        }
    for peer in peers:
        print(f"packing {images} images for {peer} ...", file=sys.stderr)
        stores[peer] = str(root / peer.replace(" ", "-"))
        packs[peer] = pack_peer(peer, src, Path(stores[peer]), px)
    return {"src": str(src), "stores": stores, "packs": packs, "root": str(root)}


def machine() -> dict:
    from bench_pack import machine as base

    info = base()
    disk = shutil.disk_usage(tempfile.gettempdir())
    info.update(disk_free_gb=round(disk.free / 1e9), platform=platform.platform())
    try:
        import keras
        import tensorflow as tf

        info.update(tensorflow=tf.__version__, keras=keras.__version__)
    except ImportError:
        pass
    return info


def _family(variant: str) -> str:
    name = variant.removeprefix("fit: ")
    if name.startswith("ceiling") or name.startswith("constant batch"):
        return "ceiling"
    if name in PEERS:
        return "streaming loader"
    return "shardfit" if name.startswith("shardfit") else "other loader"


_COLOURS = {
    "shardfit": "tab:blue",
    "streaming loader": "tab:green",
    "other loader": "tab:gray",
    "ceiling": "tab:orange",
}
_X_MIN = 50  # images/s at the left edge of each panel


def plot(rows: list[dict], path: Path) -> bool:
    """One panel per (level, regime): loaders alone on top, ``fit`` fed by them below; a
    labelled bar per variant (images/s, log scale), its own RAM written beside it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return False
    ran = {r["regime"] for r in rows}
    regimes = [g for g in ("warm", "cold", "constrained") if g in ran]
    levels = [("loader alone", False), ("model.fit fed by the loader", True)]
    tall = max(
        sum(1 for r in rows if r["regime"] == g and r["variant"].startswith("fit: ") == fit)
        for g in regimes
        for _, fit in levels
    )
    fig, axes = plt.subplots(
        len(levels),
        len(regimes),
        figsize=(6.5 * len(regimes), 2 * (1.2 + 0.28 * tall)),
        squeeze=False,
    )
    for row, (level, fit) in enumerate(levels):
        for col, regime in enumerate(regimes):
            ax = axes[row][col]
            mine = [
                r for r in rows if r["regime"] == regime and r["variant"].startswith("fit: ") == fit
            ]
            mine.sort(key=lambda r: r.get("median", 0))
            names = [r["variant"].removeprefix("fit: ") for r in mine]
            values = [r.get("median", 0) or 0 for r in mine]
            ax.barh(
                names,
                [max(v, 1) for v in values],
                color=[_COLOURS[_family(r["variant"])] for r in mine],
            )
            for y, (r, v) in enumerate(zip(mine, values, strict=True)):
                if "median" in r:
                    ax.text(
                        v, y, f" {v:,.0f}  ({r['peak_own_mb']:,.0f} MB)", va="center", fontsize=7
                    )
                else:
                    why = "; ".join(sorted(set(r.get("errors", []))))[:40]
                    word = "not run" if r.get("runs") == 0 else "failed"
                    ax.text(_X_MIN, y, f" {word}: {why}", va="center", fontsize=7, color="red")
            ax.set_xscale("log")
            top = max([*values, 10])
            ax.set_xlim(_X_MIN, top * 8)
            ax.tick_params(axis="y", labelsize=8)
            ax.set_title(f"{regime}: {level}", fontsize=10)
            ax.set_xlabel("images / s (own RAM peak in brackets)", fontsize=8)
            ax.grid(True, axis="x", which="major", alpha=0.3)
    fig.legend(
        handles=[Patch(color=c, label=f) for f, c in _COLOURS.items()],
        loc="lower center",
        ncol=len(_COLOURS),
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--images", type=Path, default=None, help="use this image folder")
    p.add_argument("--variants", nargs="+", default=None, help="a subset of the variants")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--regimes",
        nargs="+",
        choices=("warm", "cold", "constrained"),
        default=None,
        help="a subset of the size's regimes (default: all of them)",
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="also pack and run Grain, MosaicML Streaming, LitData and WebDataset (pip install "
        "'shardfit[peers]'; a full run takes about 20 minutes more)",
    )
    p.add_argument("--reps", type=int, default=None, help="repetitions (default: the size's own)")
    p.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    for hidden in ("--child", "--regime", "--stores", "--src"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--px", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cap", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out or fresh_out()
    if args.child:
        child(args)
        return 0
    from _loaders import FIT_VARIANTS, VARIANTS

    known = {**VARIANTS, **FIT_VARIANTS}
    from tqdm import tqdm

    n_images, px, reps, regimes = SIZES[args.size]
    reps = args.reps or reps
    not_run: dict[str, str] = {}
    if args.regimes:
        regimes = tuple(args.regimes)
    else:
        not_run = {
            g: f"{args.size} runs {', '.join(regimes)} only"
            for g in ("warm", "cold", "constrained")
            if g not in regimes
        }
    can_limit, why = _cgroup.availability()
    if "constrained" in regimes and not can_limit:
        regimes = tuple(g for g in regimes if g != "constrained")
        not_run["constrained"] = f"no memory limit possible here: {why}"
    big_images = CONSTRAINED_IMAGES[args.size]
    dataset_bytes = big_images * px * px * 3 * 4
    # the float32 store is three times the limit: every epoch is read from disk
    limit = dataset_bytes // LIMIT_FRACTION
    variants = args.variants or [v for v in known if args.peers or v not in PEER_VARIANTS]
    unknown = sorted(set(variants) - set(known))
    if unknown:
        print(f"run.py: error: unknown variants {unknown}; known: {list(known)}", file=sys.stderr)
        return 2
    peers = tuple(p for p in PEERS if p in variants or f"fit: {p}" in variants)
    # regimes on the same data set run together, data set by data set: the small one's copies
    # are deleted before the large one is packed (with the peers, both would not fit the disk)
    same_data = big_images == n_images
    groups = [tuple(g for g in regimes if g != "constrained" or same_data)]
    if "constrained" in regimes and not same_data:
        groups.append(("constrained",))
    groups = [grp for grp in groups if grp]
    crowded = PEERS_CROWD_OUT if peers and not same_data else {}
    slow_reps = reps if args.size != "full" else min(reps, SLOW_REPS)
    peer_reps = {g: reps if args.size != "full" else min(reps, n) for g, n in PEER_REPS.items()}
    skipped = {
        (v, "constrained"): why
        for v, why in crowded.items()
        if v in variants and "constrained" in regimes
    }

    def wanted(v: str, g: str, rep: int) -> bool:
        return (
            not (g == "constrained" and v in NOT_CONSTRAINED)
            and not (g == "cold" and v in NOT_COLD)
            and not (g == "warm" and v in NOT_WARM)
            and (v, g) not in skipped
            and not ((v in SLOW or v in REFERENCE) and rep >= slow_reps)
            and not (v in PEER_VARIANTS and rep >= peer_reps[g])
        )

    runs = [
        (i, v, g)
        for i, grp in enumerate(groups)
        for rep in range(reps)
        for g in grp
        for v in variants
        if wanted(v, g, rep)
    ]
    raw: dict[tuple[str, str], list[dict]] = {}
    packs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="shardfit-bench-run-") as tmp:
        data: dict[str, dict] = {}
        bar = tqdm(total=len(runs), desc="runs", file=sys.stderr)
        for i, grp in enumerate(groups):
            for d in {id(d): d for d in data.values()}.values():
                shutil.rmtree(d["root"])
            big = "constrained" in grp and not same_data
            count = big_images if big else n_images
            print(f"preparing {count} images at {px}x{px} ...", file=sys.stderr)
            made = prepare(
                Path(tmp) / ("big" if big else "base"),
                count,
                px,
                None if big else args.images,
                peers,
                tuple(v.removeprefix("shardfit ") for v in crowded) if big else (),
            )
            data = dict.fromkeys(grp, made)
            for name, rec in made["packs"].items():
                packs[f"{name} ({count} images)"] = rec
            for j, v, g in runs:
                if j != i:
                    continue
                peer = v.removeprefix("fit: ")
                failed = made["packs"].get(peer, {}).get("error")
                result = (
                    {"error": f"pack failed: {failed}", "shm_left": []}
                    if failed
                    else measure(v, g, data[g], args.batch, px, limit, CAP[args.size])
                )
                raw.setdefault((v, g), []).append(result)
                bar.update()
        bar.close()
    rows = []
    for (v, g), why in skipped.items():
        rows.append(
            {
                "variant": v,
                "regime": g,
                "backend": expected_backend(v),
                "runs": 0,
                "errors": [why],
                "shm_left": [],
            }
        )
    for (v, g), results in raw.items():
        ok = [r for r in results if "error" not in r]
        backends = {r["backend"] for r in ok} or {expected_backend(v)}
        if backends != {expected_backend(v)}:  # the report would mislabel the row
            raise RuntimeError(f"{v} ran under {backends}, not {expected_backend(v)}")
        row: dict = {
            "variant": v,
            "regime": g,
            "backend": expected_backend(v),
            "runs": len(results),
            "errors": [r["error"] for r in results if "error" in r],
            "shm_left": sorted({s for r in results for s in r["shm_left"]}),
        }
        if ok:
            rates = [r["images"] / r["seconds"] for r in ok]
            row.update(
                median=statistics.median(rates),
                min=min(rates),
                max=max(rates),
                per_cpu_s=statistics.median(r["images"] / max(r["cpu_s"], 1e-9) for r in ok),
                first_batch_s=statistics.median(r["first_batch_s"] or 0 for r in ok),
                steady=statistics.median(r.get("steady_rate") or 0 for r in ok),
                first_epoch=statistics.median(r.get("first_epoch_rate") or 0 for r in ok),
                peak_own_mb=max(r["peak_own"] - r["baseline"] for r in ok) / 1e6,
                baseline_mb=max(r["baseline"] for r in ok) / 1e6,
                peak_file_mb=max(r["peak_file"] for r in ok) / 1e6,
                peak_rss_mb=max(r["peak_rss"] for r in ok) / 1e6,
            )
        rows.append(row)
    for row in rows:
        names = (
            (FIT_CEILING[row["backend"]],)
            if row["variant"].startswith("fit: ")
            else CEILING[row["regime"]]
        )
        ceiling = max(
            (
                r
                for r in rows
                if r["variant"] in names and r["regime"] == row["regime"] and "median" in r
            ),
            key=lambda r: r["median"],
            default=None,
        )
        if ceiling and "median" in row:
            row["pct_of_ceiling"] = 100 * row["median"] / ceiling["median"]
    doc = {
        "machine": machine(),
        "size": args.size,
        "images": n_images,
        "images_by_regime": {g: big_images if g == "constrained" else n_images for g in regimes},
        "px": px,
        "reps": reps,
        "regimes_run": list(regimes),
        "regimes_not_run": not_run,
        "memory_limit_bytes": limit if "constrained" in regimes else None,
        "peers": list(peers),
        "packs": packs,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rows": rows,
    }
    lines = [
        f"Loader benchmark ({args.size}): {n_images} images {px}x{px}x3"
        + (f" ({big_images} in the constrained regime)" if big_images != n_images else "")
        + f", batch {args.batch}, {reps} repetition(s) ({slow_reps} of the decode-bound "
        f"baselines and reference rows), {doc['machine']['cores']} cores, {doc['date']}. "
        f"Regimes run: {', '.join(regimes)}"
        + "".join(f"; not run: {g} ({why})" for g, why in not_run.items())
        + (
            f"; memory limit {limit / 2**30:.1f} GiB (cgroup v1), float32 store "
            f"{dataset_bytes / 2**30:.1f} GiB"
            if "constrained" in regimes
            else ""
        )
        + ".",
        "",
        "| regime | variant | backend | images/s median (min-max) | % of ceiling "
        "| first epoch img/s | img per CPU-s | first batch / fit steady img/s "
        "| loader's own RAM peak | imports baseline | mapped files "
        "| summed RSS (double-counts) | /dev/shm left |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "median" not in r:
            failed = "; ".join(r["errors"])
            word = "not run" if r["runs"] == 0 else "failed"
            lines.append(
                f"| {r['regime']} | {r['variant']} | {r['backend']} | {word}: {failed} |" + " |" * 9
            )
            continue
        pct = f"{r['pct_of_ceiling']:.0f}%" if "pct_of_ceiling" in r else "-"
        first = f"{r['first_epoch']:.0f}" if r["first_epoch"] else "-"
        lines.append(
            f"| {r['regime']} | {r['variant']} | {r['backend']} | "
            f"{r['median']:.0f} ({r['min']:.0f}-{r['max']:.0f}) | "
            f"{pct} | {first} | "
            f"{r['per_cpu_s']:.0f} | "
            + (
                f"{r['steady']:.0f} img/s | "
                if r["variant"].startswith("fit: ")
                else f"{r['first_batch_s'] * 1000:.0f} ms | "
            )
            + f"{max(r['peak_own_mb'], 0):.0f} MB | {r['baseline_mb']:.0f} MB | "
            f"{r['peak_file_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB | "
            f"{len(r['shm_left'])} |"
        )
    if packs:
        lines += [
            "",
            "Packing the same folder, each format with its own writer (source decoded by "
            "2 processes), one at a time before the runs:",
            "",
            "| format | images | seconds | images/s | bytes on disk | bytes per image |",
            "|---|---|---|---|---|---|",
        ]
        for name, rec in packs.items():
            if "error" in rec:
                lines.append(f"| {name} | failed: {rec['error']} | | | | |")
                continue
            lines.append(
                f"| {name} | {rec['images']} | {rec['seconds']:.1f} | "
                f"{rec['images'] / rec['seconds']:.0f} | {rec['bytes'] / 1e9:.2f} GB | "
                f"{rec['bytes'] / rec['images'] / 1e3:.0f} KB |"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    if plot(rows, args.out / "loaders.png"):
        lines += [
            "",
            "Plot: loaders.png (images/s against the loader's own RAM, one panel per regime).",
        ]
    publish(args.out, "loaders", doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
