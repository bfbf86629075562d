#!/usr/bin/env python3
"""Pack an image folder into sharded Zarr.

Usage: ``python tools/pack_images.py SRC OUT.zarr --image-size H W [options]``.

A thin shell over :func:`shardfit.pack_images`; ``--help`` lists every option.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    try:
        from shardfit.cli import pack_main
    except ImportError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from shardfit.cli import pack_main
    sys.exit(pack_main(sys.argv[1:], prog="pack_images.py"))
