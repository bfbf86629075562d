"""A store packed locally, published to object storage: every object uploaded, the root's
``zarr.json`` last, so that a reader never finds a store there that is not whole."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

from shardfit.errors import OutputExistsError
from shardfit.remote._client import Location

__all__ = ["UPLOAD_THREADS", "check_remote_free", "upload_store"]

log = logging.getLogger("shardfit")

#: Uploads in flight at once: each holds a shard file's bytes (up to 512 MiB are sent in one
#: request); four at a time reached moto's limit on loopback.
UPLOAD_THREADS = 4


def check_remote_free(location: Location, overwrite: bool) -> None:
    """Raise if a store is published at ``location`` already and ``overwrite`` is not set."""
    if not overwrite and location.exists("zarr.json"):
        raise OutputExistsError(
            f"{location.url} already holds a store: pass overwrite=True (--overwrite) to "
            "replace it, or choose another URL"
        )


def upload_store(
    local: str, location: Location, *, pack_id: str, resume: bool, progress: bool = False
) -> int:
    """Upload every file of the store at ``local`` to ``location``; return the bytes sent.

    An older store at ``location`` stops being one first (its root ``zarr.json`` removed), and
    the root goes last, so that a reader finds a whole store there or none. The upload is
    marked with an object naming the pack (``.shardfit-upload-PACKID``) until it is done: with
    ``resume``, an upload of the same pack cut short sends only the objects not there yet with
    their size (objects of another pack are always replaced).
    """
    from tqdm import tqdm

    files: list[tuple[str, str, int]] = []
    for dirpath, _, names in os.walk(local):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, local).replace(os.sep, "/")
            if rel != "zarr.json":
                files.append((rel, path, os.path.getsize(path)))
    files.sort()
    marker = f".shardfit-upload-{pack_id}"
    there = dict(location.list(""))
    same_pack = resume and marker in there
    if "zarr.json" in there:
        location.delete("zarr.json")  # the old store is not whole any more: say so first
    location.put_bytes(marker, b"")
    todo = [f for f in files if not (same_pack and there.get(f[0]) == f[2])]
    total = sum(size for _, _, size in todo)
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=None if progress else True)
    try:
        with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="shardfit-upload") as pool:
            for size in pool.map(lambda f: _put(location, f), todo):
                bar.update(size)
        location.put_file("zarr.json", os.path.join(local, "zarr.json"))
        location.delete(marker)
    finally:
        bar.close()
    log.info(
        "uploaded %d of %d objects (%d bytes) to %s", len(todo), len(files), total, location.url
    )
    return total + os.path.getsize(os.path.join(local, "zarr.json"))


def _put(location: Location, item: tuple[str, str, int]) -> int:
    rel, path, size = item
    location.put_file(rel, path)
    return size
