"""Command-line shells over the library: ``shardfit pack ...`` and ``tools/pack_images.py``.

Thin by design: parse arguments, call :func:`shardfit.pack_images`, print a summary. A user error
is one line on stderr and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn

from shardfit.errors import ShardfitError
from shardfit.pack._pack import PackReport, pack_images
from shardfit.pack._scan import shown
from shardfit.pack.options import COMPRESSIONS, DTYPES, INTERPOLATIONS, RESIZE_MODES, PackOptions

__all__ = ["main", "pack_main"]

_LIST_LIMIT = 20


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _pack_parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Pack an image folder (one subfolder per class) into sharded Zarr.",
    )
    p.add_argument("src", help="folder with one subfolder per class")
    p.add_argument(
        "out",
        help="zarr store to write, e.g. data.zarr, or an object store URL (s3://bucket/data.zarr;"
        " endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)",
    )
    p.add_argument("--image-size", nargs=2, type=int, required=True, metavar=("HEIGHT", "WIDTH"))
    p.add_argument(
        "--shard-size", type=int, default=None, help="images per shard (default: ~128 MiB)"
    )
    p.add_argument("--resize", choices=RESIZE_MODES, default="stretch")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default="bilinear")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--compression", choices=COMPRESSIONS, default="none")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of each class for 'val'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workers", type=int, default=None, help="decode processes (default: all cores)"
    )
    p.add_argument("--on-error", choices=("skip", "raise"), default="skip")
    p.add_argument("--class-names", nargs="+", default=None, metavar="NAME")
    p.add_argument(
        "--background", nargs=3, type=int, default=(255, 255, 255), metavar=("R", "G", "B")
    )
    p.add_argument(
        "--dask",
        default=None,
        metavar="ADDRESS",
        help="decode on a dask.distributed cluster: its scheduler address (tcp://host:8786), "
        "or local:N for a local cluster of N worker processes",
    )
    p.add_argument(
        "--staging-dir",
        default=None,
        help="with an object store URL: where the store is packed before its upload "
        "(default: $SHARDFIT_CACHE or ~/.cache/shardfit)",
    )
    p.add_argument("--resume", action="store_true", help="finish an interrupted pack")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--dry-run", action="store_true", help="scan and plan; write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar, errors only")
    p.add_argument("--verbose", action="store_true", help="log every ignored and skipped file")
    return p


#: Python arguments named in library messages, and the flags that say the same here.
_FLAGS = [
    (re.compile(r"\b(overwrite|resume|dry_run)=True\b"), lambda m: "--" + m[1].replace("_", "-")),
    (re.compile(r"\bon_error=[\"'](\w+)[\"']"), lambda m: f"--on-error {m[1]}"),
    (  # "image_size must be ..." from PackOptions: every field is a flag of the same name
        re.compile(rf"^({'|'.join(f.name for f in dataclasses.fields(PackOptions))})(?= )"),
        lambda m: "--" + m[1].replace("_", "-"),
    ),
]


def as_flags(message: str) -> str:
    """A library message with the Python arguments it names replaced by this CLI's flags."""
    for pattern, flag in _FLAGS:
        message = pattern.sub(flag, message)
    return message


def _print_list(title: str, items: list[tuple[str, str]], limit: int | None) -> None:
    if not items:
        return
    print(f"{title}: {len(items)}")
    listed = items if limit is None else items[:limit]
    for path, reason in listed:
        print(f"  {shown(path)}: {shown(reason)}")  # a name need not be UTF-8
    if len(listed) < len(items):
        print(f"  ... {len(items) - len(listed)} more (all listed in the store's attributes)")


def _summary(report: PackReport) -> None:
    verb = "Would pack" if report.dry_run else "Packed"
    parts = ", ".join(
        f"{s}: {n} images in {report.num_shards[s]} shards" for s, n in report.counts.items()
    )
    print(f"{verb} {shown(report.output)} ({parts}; {report.shard_size} images per shard)")
    names = ", ".join(shown(c) for c in report.class_names)
    print(f"Classes ({len(report.class_names)}): {names}")
    if not report.dry_run:
        rate = (
            f"{report.images_per_second:.0f} img/s" if report.decoded else "nothing left to decode"
        )
        print(
            f"Decoded {report.decoded} files in {report.seconds:.1f} s ({rate})"
            + (
                f"; kept {report.reused_shards} shards from the interrupted pack"
                if report.reused_shards
                else ""
            )
        )
    _print_list("Skipped (could not decode)", report.skipped, None)
    _print_list("Ignored (not images)", report.ignored, _LIST_LIMIT)


class _Terminated(BaseException):
    """SIGTERM arrived (``timeout``, a job scheduler, ``kill``).

    A BaseException, as KeyboardInterrupt is, so that nothing on the way catches it and the
    pack unwinds as it does for Ctrl-C: the shard being written is dropped, the decode workers
    stopped, every finished shard kept for ``--resume``.
    """


@contextmanager
def _sigterm_stops_the_pack() -> Iterator[None]:
    owner = os.getpid()

    def stop(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:
            # a decode worker forked with this handler, signalled (to stop it) before it reset
            # SIGTERM: end it as the default action would, without a traceback
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: keep the default (the partial store stays safe)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def pack_main(argv: Sequence[str] | None = None, prog: str = "pack_images.py") -> int:
    """Run the packer CLI; return the exit status."""
    args = _pack_parser(prog).parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("shardfit").setLevel(logging.INFO if args.verbose else logging.ERROR)
    try:
        options = PackOptions(
            image_size=tuple(args.image_size),
            shard_size=args.shard_size,
            resize=args.resize,
            interpolation=args.interpolation,
            dtype=args.dtype,
            compression=args.compression,
            val_fraction=args.val_fraction,
            seed=args.seed,
            workers=args.workers,
            on_error=args.on_error,
            class_names=tuple(args.class_names) if args.class_names else None,
            background=tuple(args.background),
        )
        with _sigterm_stops_the_pack():
            report = pack_images(
                args.src,
                args.out,
                options,
                resume=args.resume,
                overwrite=args.overwrite,
                dry_run=args.dry_run,
                progress=not args.quiet,
                staging_dir=args.staging_dir,
                dask=args.dask,
            )
    except ShardfitError as err:
        print(f"{prog}: error: {as_flags(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run again with --resume to finish", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{prog}: terminated (SIGTERM); run again with --resume to finish", file=sys.stderr)
        return 128 + signal.SIGTERM
    if not args.quiet:
        _summary(report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``shardfit`` console script: ``shardfit pack SRC OUT --image-size H W ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "pack":
        return pack_main(argv[1:], prog="shardfit pack")
    asked = bool(argv) and argv[0] in ("-h", "--help")
    usage = "usage: shardfit pack SRC OUT --image-size HEIGHT WIDTH [options] (see --help)"
    print(
        usage if asked else f"shardfit: error: unknown command {argv[:1]}; {usage}",
        file=sys.stdout if asked else sys.stderr,
    )
    return 0 if asked else 2


if __name__ == "__main__":
    sys.exit(main())
