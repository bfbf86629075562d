"""Pack an image folder into a shardfit store: scan -> shuffle and split -> decode -> shards.

The public entry point is :func:`pack_images`; ``tools/pack_images.py`` is a thin CLI over it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from shardfit._options import merge_options
from shardfit._version import __version__
from shardfit.errors import (
    DatasetFormatError,
    ImageDecodeError,
    InvalidOptionError,
    OutputExistsError,
    OutputLockedError,
    OutputWriteError,
    ResumeMismatchError,
    ShardfitError,
)
from shardfit.pack._dask import DaskDecodePool
from shardfit.pack._decode import DecodeSpec
from shardfit.pack._plan import global_order, stratified_split
from shardfit.pack._pool import DecodePool
from shardfit.pack._remote import pack_remote, staging_path
from shardfit.pack._scan import ScanResult, scan_folder, shown
from shardfit.pack._writer import (
    ShardRecord,
    SplitWriter,
    _record_path,
    load_records,
    write_arrays,
)
from shardfit.pack.options import PackOptions
from shardfit.remote._client import Location, is_remote
from shardfit.store._format import (
    ATTRS_KEY,
    FORMAT_VERSION,
    PARTIAL_SUFFIX,
    STATE_DIR,
    read_info,
    shard_path,
    write_json_atomic,
)
from shardfit.store._shardio import read_full_shard_index

__all__ = ["PackReport", "pack_images"]

log = logging.getLogger("shardfit")

_STATE_FILE = "pack-state.json"


@dataclass(frozen=True)
class PackReport:
    """What a pack did.

    Attributes:
        output: absolute path of the store (not yet written when ``dry_run``).
        class_names: class names in label order.
        counts: images stored per split (planned, for a dry run).
        counts_per_class: images stored per split and class.
        shard_size: images per shard.
        num_shards: shard files per split.
        skipped: ``(path, reason)`` of every file that could not be decoded.
        ignored: ``(path, reason)`` of every file not taken as an image at all.
        reused_shards: shards kept from an interrupted pack (``resume``).
        decoded: files decoded by this call (stored or skipped).
        seconds: wall time of this call.
        bytes_written: bytes of shard files written by this call.
        bytes_uploaded: to an object store: bytes uploaded by this call.
        dry_run: nothing was written.
    """

    output: str
    class_names: tuple[str, ...]
    counts: dict[str, int]
    counts_per_class: dict[str, list[int]]
    shard_size: int
    num_shards: dict[str, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    reused_shards: int = 0
    decoded: int = 0
    seconds: float = 0.0
    bytes_written: int = 0
    bytes_uploaded: int = 0
    dry_run: bool = False

    @property
    def images_per_second(self) -> float:
        """Files decoded per second of wall time in this call."""
        return self.decoded / self.seconds if self.seconds > 0 else 0.0


def _fingerprint(options: PackOptions, scan: ScanResult) -> str:
    """Hash of everything that decides the stored bytes; ``resume`` requires it unchanged."""
    decisive = {
        "format_version": FORMAT_VERSION,
        "image_size": options.image_size,
        "shard_size": options.resolved_shard_size(),
        "resize": options.resize,
        "interpolation": options.interpolation,
        "dtype": options.dtype,
        "compression": options.compression,
        "val_fraction": options.val_fraction,
        "seed": options.seed,
        "background": options.background,
        "class_names": scan.class_names,
        "files": scan.fingerprint,
    }
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


def _split_plan(scan: ScanResult, options: PackOptions) -> dict[str, npt.NDArray[Any]]:
    order = global_order(len(scan.paths), options.seed)
    train, val = stratified_split(scan.labels[order], options.val_fraction)
    plan = {"train": order[train]}
    if options.val_fraction > 0:
        plan["val"] = order[val]
    return plan


def _root_attrs(store: str) -> dict[str, Any]:
    """shardfit's root attributes of ``store`` as written, ``{}`` where unreadable."""
    try:
        with open(os.path.join(store, "zarr.json"), encoding="utf-8") as f:
            attrs = json.load(f)["attributes"][ATTRS_KEY]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return attrs if isinstance(attrs, dict) else {}


def _partial_is_complete(partial: str) -> bool:
    """Whether ``partial``'s root attributes say ``complete: true`` (all but the rename done)."""
    return _root_attrs(partial).get("complete") is True


def _lock_partial(out: str, partial: str) -> tuple[int | None, bool]:
    """Create ``partial`` if needed and hold an exclusive lock on it for the whole pack.

    Return the locked directory's descriptor (closing it releases the lock) and whether this
    call created the directory. The lock is on the partial directory itself rather than on a
    lock file beside the output: it leaves nothing behind in the user's folder, it moves with
    the directory at the publishing rename, and a lock file could not be removed safely. So
    that the locked inode stays the partial store, an old partial is emptied, never removed.
    ``flock`` locks vanish with their holder, however it dies; forked decode workers share the
    lock but end with the packer. Windows has neither ``flock`` nor directory descriptors:
    there the pack runs unlocked (descriptor ``None``).
    """
    os.makedirs(os.path.dirname(partial), exist_ok=True)
    if sys.platform == "win32":
        created = not os.path.exists(partial)
        os.makedirs(partial, exist_ok=True)
        return None, created
    import fcntl

    while True:
        created = False
        with contextlib.suppress(FileExistsError):
            os.mkdir(partial)
            created = True
        fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(
                f"another pack is writing {out} (in {partial}): wait for it to end, or stop it "
                "and run again"
            ) from None
        try:
            locked, now = os.fstat(fd), os.stat(partial)
            if (locked.st_dev, locked.st_ino) == (now.st_dev, now.st_ino):
                return fd, created
        except FileNotFoundError:
            pass
        os.close(fd)  # another pack published it between our open and our lock: start again


def _empty_dir(path: str) -> None:
    """Remove everything inside ``path`` but ``path`` itself (it carries the pack's lock)."""
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.remove(entry.path)


def _prepare_partial(
    out: str, partial: str, fingerprint: str, *, existed: bool, resume: bool, overwrite: bool
) -> str:
    """Make the locked ``partial`` ready to write into (``existed``: before this pack locked
    it). Return ``"new"`` for a fresh pack, ``"continue"`` when it continues an earlier pack,
    ``"complete"`` when an earlier pack only lacks its publishing rename."""
    state_file = os.path.join(partial, STATE_DIR, _STATE_FILE)
    if existed:
        if resume:
            try:
                with open(state_file, encoding="utf-8") as f:
                    state = json.load(f)
            except (OSError, ValueError):
                state = None
            if state is None and _partial_is_complete(partial):
                # killed after its records were removed, before the rename: publish it as is
                return "complete"
            if state is None:
                _empty_dir(partial)  # killed before the pack had begun: nothing to keep
            elif state.get("fingerprint") != fingerprint:
                raise ResumeMismatchError(
                    f"cannot resume {partial}: the source folder or the packing options changed "
                    "since it was started; pass overwrite=True to start over"
                )
            else:
                return "continue"
        elif not overwrite:
            raise OutputExistsError(
                f"{partial} holds an interrupted pack of {out}: pass resume=True to finish it or "
                "overwrite=True to start over"
            )
        else:
            _empty_dir(partial)
    import zarr

    root = zarr.open_group(partial, mode="w-")
    root.attrs[ATTRS_KEY] = {"format_version": FORMAT_VERSION, "complete": False}
    os.makedirs(os.path.join(partial, STATE_DIR))
    write_json_atomic(state_file, {"fingerprint": fingerprint})
    return "new"


def _check_output_free(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not overwrite:
        raise OutputExistsError(
            f"output {out} already exists: pass overwrite=True to replace it (the old "
            "store is kept until the new one is complete)"
        )


def _check_complete_partial(partial: str, options: PackOptions, scan: ScanResult) -> None:
    """A complete partial store has no records left to compare with: compare its attributes,
    so that a resume with other options never publishes it under their name."""
    stored = _root_attrs(partial)
    expected = _base_attrs(options, scan)
    differ = sorted(
        k for k, v in expected.items() if k != "shardfit_version" and stored.get(k) != v
    )
    if differ:
        raise ResumeMismatchError(
            f"cannot resume {partial}: it was packed with other {', '.join(differ)}; pass "
            "overwrite=True to start over"
        )


def _base_attrs(options: PackOptions, scan: ScanResult) -> dict[str, Any]:
    h, w = options.image_size
    return {
        "format_version": FORMAT_VERSION,
        "shardfit_version": __version__,
        "class_names": [shown(c) for c in scan.class_names],
        "image_size": [h, w],
        "channels": 3,
        "resize": options.resize,
        "interpolation": options.interpolation,
        "dtype": options.dtype,
        "scale": "pixel / 255" if options.dtype == "float32" else "pixel",
        "value_range": [0.0, 1.0] if options.dtype == "float32" else [0, 255],
        "background": list(options.background),
        "compression": options.compression,
        "shard_size": options.resolved_shard_size(),
        "seed": options.seed,
        "val_fraction": options.val_fraction,
        "source_root": shown(scan.root),
        # names what this pack holds: equal for two packs exactly when their bytes are (same
        # files, options and seed); a reader pinned to one pack refuses another's data
        "pack_id": _fingerprint(options, scan)[:32],
    }


def pack_images(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: PackOptions | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
    staging_dir: str | os.PathLike[str] | None = None,
    dask: Any = None,
    **option_kwargs: Any,
) -> PackReport:
    """Pack the image folder ``src`` (one subfolder per class) into the store ``out``.

    Options come as a :class:`~shardfit.PackOptions` or as its keyword arguments
    (``pack_images(src, out, image_size=(224, 224), val_fraction=0.1)``). The store is built in
    ``out + ".partial"`` and renamed to ``out`` only when complete; an interrupted pack is
    finished by calling again with ``resume=True``, without redoing complete shards.

    Args:
        src: folder with one subfolder per class.
        out: path of the zarr store to write (conventionally ``*.zarr``).
        options: packing options; or give them as keyword arguments.
        resume: continue an interrupted pack of ``out`` (same folder and options required).
        overwrite: replace an existing ``out`` (kept until the new store is complete) or an
            interrupted pack.
        dry_run: scan and plan only; write nothing.
        progress: show a tqdm progress bar on stderr.
        storage_options: when ``out`` is an object store URL (``s3://bucket/data.zarr``):
            client options, as :class:`~shardfit.SplitReader` takes them. Such a store is
            packed in a local staging folder, then uploaded, its root metadata last.
        staging_dir: where a store bound for an object store is packed first (default: the
            shard cache folder, ``$SHARDFIT_CACHE`` or ``~/.cache/shardfit``).
        dask: decode on a ``dask.distributed`` cluster instead of local processes: a
            ``distributed.Client``, a scheduler address (``"tcp://host:8786"``), or
            ``"local:N"`` for a local cluster of ``N`` worker processes. The store is the
            same, byte for byte.

    Returns:
        A :class:`PackReport`.

    Raises:
        InvalidOptionError: an option is invalid.
        SourceFolderError: ``src`` is missing, has no class subfolders or no images.
        OutputExistsError: ``out`` or its interrupted pack is in the way.
        OutputLockedError: another pack is writing ``out`` now (checked before anything is
            written or removed).
        OutputWriteError: the disk or a quota is full, a file size limit is hit, or the output
            is read-only or not writable; after a full disk, ``resume=True`` finishes the pack.
        ResumeMismatchError: ``resume`` with another folder content or other options.
        ImageDecodeError: with ``on_error="raise"``, the first file that fails to decode (in
            storage order). Work so far is kept for ``resume``.
    """
    options = merge_options(PackOptions, options, option_kwargs)
    started = time.perf_counter()
    if is_remote(out):
        location = Location.of(str(out), storage_options)
        staging = staging_path(location, staging_dir)
        if dry_run:
            planned = pack_images(src, staging, options, dry_run=True)
            return dataclasses.replace(planned, output=location.url)
        scan = scan_folder(src, options.class_names)
        report: PackReport = pack_remote(
            lambda local, **how: pack_images(
                src, local, options, progress=progress, dask=dask, **how
            ),
            location,
            staging,
            pack_id=_fingerprint(options, scan)[:32],
            resume=resume,
            overwrite=overwrite,
            progress=progress,
        )
        return report
    if storage_options is not None:
        raise InvalidOptionError(
            "storage_options apply to an object store URL (s3://, gs://, az://), not to the "
            f"local path {os.fspath(out)!r}"
        )
    out_s = os.path.abspath(os.fspath(out))
    partial = out_s + PARTIAL_SUFFIX
    scan = scan_folder(src, options.class_names)
    for path, reason in scan.ignored:
        log.info("ignored %s: %s", path, reason)
    plan = _split_plan(scan, options)
    shard_size = options.resolved_shard_size()
    num_classes = len(scan.class_names)

    if dry_run:
        counts = {s: int(idx.size) for s, idx in plan.items()}
        return PackReport(
            output=out_s,
            class_names=scan.class_names,
            counts=counts,
            counts_per_class={
                s: [int(c) for c in np.bincount(scan.labels[idx], minlength=num_classes)]
                for s, idx in plan.items()
            },
            shard_size=shard_size,
            num_shards={s: -(-n // shard_size) for s, n in counts.items()},
            ignored=list(scan.ignored),
            seconds=time.perf_counter() - started,
            dry_run=True,
        )

    _check_output_free(out_s, overwrite)
    try:
        lock, created = _lock_partial(out_s, partial)
        try:
            return _pack_locked(
                scan,
                options,
                plan,
                out_s,
                partial,
                created,
                resume,
                overwrite,
                progress,
                started,
                dask,
            )
        finally:
            if lock is not None:
                os.close(lock)
    except ShardfitError:
        raise
    except OSError as err:
        raise _output_error(err, partial) from None


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def _output_error(err: OSError, partial: str) -> OSError:
    """The one-line error for a full or unwritable output; any other OSError as it is.

    Only the output is written once the scan is done (decoding failures are skips), so these
    errors are the output's. Every finished shard and its record are on disk already and the
    shard being written was dropped, so a resume finishes the pack once there is room.
    """
    where = err.filename if isinstance(err.filename, str) else partial
    if err.errno in _NO_SPACE:
        new = OutputWriteError(
            f"cannot write {where}: {err.strerror}: free space (or raise the quota or file size "
            f"limit), then run again with resume=True to finish (work so far is kept in {partial})"
        )
    elif err.errno in _NOT_WRITABLE:
        new = OutputWriteError(
            f"cannot write {where}: {err.strerror}: write the output to a writable folder, "
            "or make this one writable"
        )
    else:
        return err
    new.errno = err.errno  # one argument keeps str() free of "[Errno N]"; the code stays
    return new


def _pack_locked(
    scan: ScanResult,
    options: PackOptions,
    plan: dict[str, npt.NDArray[Any]],
    out: str,
    partial: str,
    created: bool,
    resume: bool,
    overwrite: bool,
    progress: bool,
    started: float,
    dask: Any = None,
) -> PackReport:
    """The pack itself, from the prepared partial store to the published one; the caller holds
    the partial store's lock."""
    shard_size = options.resolved_shard_size()
    mode = _prepare_partial(
        out,
        partial,
        _fingerprint(options, scan),
        existed=not created,
        resume=resume,
        overwrite=overwrite,
    )
    if mode == "complete":
        _check_complete_partial(partial, options, scan)
        _publish(partial, out)
        info = read_info(out)
        skipped = [(d["path"], d["reason"]) for d in info.attrs.get("skipped", [])]
        reused = sum(s.num_shards for s in info.splits.values())
        return _report(out, scan, shard_size, skipped, reused, 0, started, 0)
    writers = {
        s: SplitWriter(
            partial,
            s,
            shard_size,
            _kept_records(partial, s, plan[s], scan, shard_size) if mode == "continue" else [],
        )
        for s in plan
    }
    reused = sum(w.next_shard for w in writers.values())
    if reused:
        log.info("resuming %s: %d complete shards kept", partial, reused)
    tasks = [(s, int(i)) for s, idx in plan.items() for i in idx[writers[s].pos :]]
    _decode_into_shards(scan, options, plan, tasks, writers, progress, dask)
    skipped = _finalize(partial, scan, options, plan, writers)
    _publish(partial, out)
    written = sum(wr.bytes_written for wr in writers.values())
    return _report(out, scan, shard_size, skipped, reused, len(tasks), started, written)


def _kept_records(
    partial: str, split: str, positions: npt.NDArray[Any], scan: ScanResult, shard_size: int
) -> list[ShardRecord]:
    """The progress records of ``split`` to continue after, each checked against the plan.

    The fingerprint says the folder and the options are the same; this says that the records
    are the ones this plan writes, so that a record edited, mixed up or left from another pack
    never goes into a store.

    Raises:
        ResumeMismatchError: naming the first record that does not match.
    """
    records = load_records(partial, split)
    end = shard = 0
    for seq, rec in enumerate(records):
        why = _record_problem(rec, split, seq, end, shard, positions, scan, shard_size)
        if why is None and rec.shard is not None:
            why = _shard_problem(shard_path(partial, split, rec.shard), shard_size, len(rec.paths))
        if why is not None:
            raise ResumeMismatchError(
                f"cannot resume: progress record {_record_path(partial, split, seq)} {why}; "
                "pass overwrite=True to start over"
            )
        end = rec.end
        shard += rec.shard is not None
    return records


def _record_problem(
    rec: ShardRecord,
    split: str,
    seq: int,
    start: int,
    shard: int,
    positions: npt.NDArray[Any],
    scan: ScanResult,
    shard_size: int,
) -> str | None:
    """What is wrong with record ``seq``, expected to cover positions from ``start`` on and
    to hold shard ``shard`` (if any); None when it is what the plan would write."""
    if rec.split != split or rec.seq != seq:
        return f"is not record {seq} of split {split}"
    if rec.start != start or not start < rec.end <= len(positions):
        return f"covers positions [{rec.start}, {rec.end}) where [{start}, ...) comes next"
    if rec.shard not in (None, shard):
        return f"names shard {rec.shard} where shard {shard} comes next"
    stored = len(rec.paths)
    if len(rec.labels) != stored:
        return "does not list one label per stored image"
    if (rec.shard is None) != (stored == 0):
        return "names a shard without images, or images without a shard"
    if stored != shard_size and rec.end != len(positions):  # only the last shard is smaller
        return f"holds {stored} images where a shard holds {shard_size}"
    matched = _real_names(rec, positions, scan)
    return matched if isinstance(matched, str) else None


def _real_names(
    rec: ShardRecord, positions: npt.NDArray[Any], scan: ScanResult
) -> tuple[list[str], list[tuple[str, str]]] | str:
    """The record's stored paths and skipped files by their real names (as the scan found
    them; a record holds them as :func:`shown`), matched position by position against the
    plan; or, where they do not match, what is wrong."""
    paths: list[str] = []
    skipped: list[tuple[str, str]] = []
    i = k = 0  # the next stored image and the next skipped file of the record
    for pos in range(rec.start, rec.end):
        path, label = scan.paths[positions[pos]], int(scan.labels[positions[pos]])
        if i < len(rec.paths) and rec.paths[i] == shown(path) and rec.labels[i] == label:
            paths.append(path)
            i += 1
        elif k < len(rec.skipped) and rec.skipped[k][0] == shown(path):
            skipped.append((path, rec.skipped[k][1]))
            k += 1
        else:
            return f"does not match the source folder at position {pos} ({shown(path)})"
    if i != len(rec.paths) or k != len(rec.skipped):
        return "lists more files than its positions hold"
    return paths, skipped


def _shard_problem(path: str, shard_size: int, stored: int) -> str | None:
    """What is wrong with a recorded shard's file; None when it holds its ``stored`` images."""
    if not os.path.isfile(path):
        return f"names shard file {path}, which is missing"
    try:
        read_full_shard_index(path, shard_size, stored)
    except (DatasetFormatError, OSError):
        return f"names shard file {path}, which does not hold its {stored} images whole"
    return None


def _report(
    out: str,
    scan: ScanResult,
    shard_size: int,
    skipped: list[tuple[str, str]],
    reused: int,
    decoded: int,
    started: float,
    bytes_written: int,
) -> PackReport:
    """The report of a published store, its counts read back from the store itself."""
    splits = read_info(out).splits
    return PackReport(
        output=out,
        class_names=scan.class_names,
        counts={s: info.count for s, info in splits.items()},
        counts_per_class={s: list(info.counts_per_class) for s, info in splits.items()},
        shard_size=shard_size,
        num_shards={s: info.num_shards for s, info in splits.items()},
        skipped=skipped,
        ignored=list(scan.ignored),
        reused_shards=reused,
        decoded=decoded,
        seconds=time.perf_counter() - started,
        bytes_written=bytes_written,
    )


def _decode_into_shards(
    scan: ScanResult,
    options: PackOptions,
    plan: dict[str, npt.NDArray[Any]],
    tasks: list[tuple[str, int]],
    writers: dict[str, SplitWriter],
    progress: bool,
    dask: Any = None,
) -> None:
    """Decode ``tasks`` (split, file index) in worker processes (local, or on the Dask cluster
    ``dask``), in order, into the writers."""
    from tqdm import tqdm

    h, w = options.image_size
    spec = DecodeSpec(
        height=h,
        width=w,
        resize=options.resize,
        interpolation=options.interpolation,
        dtype=options.dtype,
        background=options.background,
    )
    skipped = 0
    # disable=None: a bar only on a terminal, so that logs and pipes get no bar fragments
    bar = tqdm(total=len(tasks), unit="img", disable=None if progress else True, dynamic_ncols=True)
    bar.set_postfix(skipped=0, refresh=False)
    try:
        pool: DecodePool | DaskDecodePool
        if dask is not None:
            pool = DaskDecodePool(dask, spec, options.compression)
        else:
            pool = DecodePool(options.resolved_workers(), spec, options.compression)
        with pool:
            sources = [os.path.join(scan.root, scan.paths[i]) for _, i in tasks]
            for (split, i), result in zip(tasks, pool.imap(sources), strict=True):
                rel = scan.paths[i]
                if result.chunk is None:
                    if options.on_error == "raise":
                        raise ImageDecodeError(os.path.join(scan.root, rel), result.error or "")
                    skipped += 1
                    log.warning("skipped %s: %s", rel, result.error)
                    bar.set_postfix(skipped=skipped, refresh=False)
                # records are JSON: the writer gets names as shown, the real ones are the plan's
                error = None if result.error is None else shown(result.error)
                writers[split].add(shown(rel), int(scan.labels[i]), result.chunk, error)
                bar.update()
                if writers[split].pos == len(plan[split]):
                    writers[split].flush()
    except BaseException:
        for writer in writers.values():
            writer.abort()  # the shard being written is redone by a resume
        raise
    finally:
        bar.close()
    for writer in writers.values():
        writer.flush()  # a split with nothing left to decode (resumed at its very end)


def _with_real_names(
    records: list[ShardRecord], positions: npt.NDArray[Any], scan: ScanResult
) -> list[ShardRecord]:
    """``records`` with the real names of their files: the ``paths`` array stores a name's
    bytes as the filesystem gives them, which a record (JSON) cannot hold."""
    real = []
    for rec in records:
        matched = _real_names(rec, positions, scan)
        if isinstance(matched, str):  # written by this pack, or checked when resumed
            raise RuntimeError(f"progress record {rec.split} {rec.seq} {matched}")
        real.append(dataclasses.replace(rec, paths=matched[0], skipped=matched[1]))
    return real


def _finalize(
    partial: str,
    scan: ScanResult,
    options: PackOptions,
    plan: dict[str, npt.NDArray[Any]],
    writers: dict[str, SplitWriter],
) -> list[tuple[str, str]]:
    """Write every split's arrays and the root attributes (``complete: true`` last of all);
    return the skipped files (by their real names)."""
    import zarr

    base = _base_attrs(options, scan)
    records = {s: _with_real_names(wr.records, plan[s], scan) for s, wr in writers.items()}
    splits_attrs = {
        s: write_arrays(
            partial,
            s,
            records[s],
            image_size=options.image_size,
            dtype=options.dtype,
            compression=options.compression,
            shard_size=options.resolved_shard_size(),
            num_classes=len(scan.class_names),
            group_attrs=base,
        )
        for s in writers
    }
    skipped = [item for recs in records.values() for r in recs for item in r.skipped]
    root = zarr.open_group(partial, mode="r+")
    root.attrs[ATTRS_KEY] = {
        **base,
        "splits": splits_attrs,
        "skipped": [{"path": shown(p), "reason": shown(r)} for p, r in skipped],
        "ignored": [{"path": shown(p), "reason": shown(r)} for p, r in scan.ignored],
        "complete": True,
    }
    return skipped


def _remove_temp_files(store: str) -> None:
    """Delete temporary files a killed earlier run left: zarr's atomic writes
    (``NAME.<uuid>.partial``) and shardfit's own (``NAME.tmp-PID``)."""
    for dirpath, _, files in os.walk(store):
        for name in files:
            if name.endswith(".partial") or ".tmp-" in name:
                os.remove(os.path.join(dirpath, name))


def _publish(partial: str, out: str) -> None:
    """Rename the complete ``partial`` to ``out``, replacing an old ``out`` last of all.

    The progress records go first: once they are gone the partial store is complete and
    nothing but the rename is left, which a resume does on its own (see ``_prepare_partial``).
    Removed after the rename, a kill in between would publish a store with records inside.
    """
    _remove_temp_files(partial)
    state = os.path.join(partial, STATE_DIR)
    if os.path.isdir(state):
        shutil.rmtree(state)
    old = None
    if os.path.exists(out):
        old = f"{out}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(partial, out)
    # this call's old store, and any a killed earlier publish left behind
    for leftover in [old, *glob.glob(glob.escape(out) + ".old-*")]:
        if leftover is not None:
            shutil.rmtree(leftover, ignore_errors=True)
