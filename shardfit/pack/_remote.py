"""Packing into object storage: the store is packed in a local staging folder (resumable like
any local pack), then uploaded with its root metadata last (``shardfit.remote._upload``).

Staging locally keeps one writer and one resume protocol for both destinations, and uploads
whole shard files (one request each, in parallel); it needs local disk for the store while it
is packed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from shardfit.errors import ResumeMismatchError
from shardfit.remote._cache import default_cache_dir
from shardfit.remote._client import Location
from shardfit.remote._upload import check_remote_free, upload_store
from shardfit.store._format import read_info

__all__ = ["pack_remote", "staging_path"]

log = logging.getLogger("shardfit")


def staging_path(location: Location, staging_dir: str | os.PathLike[str] | None) -> str:
    """Where the store for ``location`` is packed before its upload (the same on every run, so
    that ``resume`` finds it)."""
    base = default_cache_dir() if staging_dir is None else os.path.abspath(os.fspath(staging_dir))
    digest = hashlib.sha256(location.url.encode()).hexdigest()[:16]
    return os.path.join(base, "staging", digest, "store.zarr")


def pack_remote(
    pack_local: Callable[..., Any],
    location: Location,
    staging: str,
    *,
    pack_id: str,
    resume: bool,
    overwrite: bool,
    progress: bool,
) -> Any:
    """Pack with ``pack_local(staging, resume=, overwrite=)`` (a local pack into ``staging``),
    upload the result to ``location``, remove the staging copy; return the pack's report
    naming the URL as its output."""
    started = time.perf_counter()
    if not resume:
        check_remote_free(location, overwrite)
    os.makedirs(os.path.dirname(staging), exist_ok=True)
    staged = os.path.exists(os.path.join(staging, "zarr.json"))
    if resume and staged:
        # packed in full by a run cut short while uploading: only the upload is left
        found = read_info(staging).pack_id
        if found != pack_id:
            raise ResumeMismatchError(
                f"{staging} (staged for {location.url}) holds pack {found}, not this folder's "
                f"and options' ({pack_id}): run without resume=True to pack again"
            )
        report = None
    else:
        report = pack_local(staging, resume=resume, overwrite=not resume or staged)
    sent = upload_store(staging, location, progress=progress, pack_id=pack_id, resume=resume)
    shutil.rmtree(staging, ignore_errors=True)
    if report is None:
        from shardfit.pack._pack import PackReport

        info = read_info_remote_counts(location)
        report = PackReport(output=location.url, seconds=0.0, **info)
    return dataclasses.replace(
        report,
        output=location.url,
        bytes_uploaded=sent,
        seconds=report.seconds + (time.perf_counter() - started),
    )


def read_info_remote_counts(location: Location) -> dict[str, Any]:
    """The counts a :class:`~shardfit.PackReport` holds, from the published store's root."""
    import json

    attrs = json.loads(location.get_bytes("zarr.json"))["attributes"]["shardfit"]
    splits = attrs["splits"]
    return {
        "class_names": tuple(attrs["class_names"]),
        "counts": {s: v["count"] for s, v in splits.items()},
        "counts_per_class": {s: list(v["counts_per_class"]) for s, v in splits.items()},
        "shard_size": attrs["shard_size"],
        "num_shards": {s: v["num_shards"] for s, v in splits.items()},
        "skipped": [(d["path"], d["reason"]) for d in attrs.get("skipped", [])],
        "ignored": [(d["path"], d["reason"]) for d in attrs.get("ignored", [])],
    }
