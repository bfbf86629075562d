#!/usr/bin/env python3
"""Write a small synthetic image folder (shapes as classes) to try the packer on.

Usage: ``python tools/make_example.py OUT_DIR [--per-class N] [--size PX] [--seed S]``.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from shardfit.examples import make_shapes_folder
    except ImportError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from shardfit.examples import make_shapes_folder

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder to create (one subfolder per class)")
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.per_class < 1 or args.size < 8:
        print("make_example.py: error: --per-class must be >= 1 and --size >= 8", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and os.listdir(args.out):
        print(f"make_example.py: error: {args.out} exists and is not empty", file=sys.stderr)
        return 2
    folder = make_shapes_folder(args.out, args.per_class, args.size, args.seed)
    print(f"Wrote {3 * args.per_class} images in {folder}/{{circle,square,triangle}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
