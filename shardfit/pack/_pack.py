"""Pack an image folder into a shardfit store: scan -> shuffle and split -> decode -> shards.

The public entry point is :func:`pack_images`; ``tools/pack_images.py`` is a thin CLI over it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shardfit._options import merge_options
from shardfit._version import __version__
from shardfit.errors import ImageDecodeError, OutputExistsError, ResumeMismatchError
from shardfit.pack._decode import DecodeSpec
from shardfit.pack._plan import global_order, stratified_split
from shardfit.pack._pool import DecodePool
from shardfit.pack._scan import ScanResult, scan_folder
from shardfit.pack._writer import SplitWriter, load_records, write_arrays
from shardfit.pack.options import PackOptions
from shardfit.store._format import (
    ATTRS_KEY,
    FORMAT_VERSION,
    PARTIAL_SUFFIX,
    STATE_DIR,
    read_info,
    write_json_atomic,
)

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


def _split_plan(scan: ScanResult, options: PackOptions) -> dict[str, np.ndarray]:
    order = global_order(len(scan.paths), options.seed)
    train, val = stratified_split(scan.labels[order], options.val_fraction)
    plan = {"train": order[train]}
    if options.val_fraction > 0:
        plan["val"] = order[val]
    return plan


def _prepare_partial(
    out: str, partial: str, fingerprint: str, *, resume: bool, overwrite: bool
) -> bool:
    """Make ``partial`` ready to write into; return True when it continues an earlier pack."""
    if os.path.exists(out) and not overwrite:
        raise OutputExistsError(
            f"output {out} already exists: pass overwrite=True to replace it (the old "
            "store is kept until the new one is complete)"
        )
    state_file = os.path.join(partial, STATE_DIR, _STATE_FILE)
    if os.path.exists(partial):
        if resume:
            try:
                with open(state_file, encoding="utf-8") as f:
                    state = json.load(f)
            except (OSError, ValueError):
                state = None  # killed before the pack had begun: nothing in it to keep
            if state is None:
                shutil.rmtree(partial)
            elif state.get("fingerprint") != fingerprint:
                raise ResumeMismatchError(
                    f"cannot resume {partial}: the source folder or the packing options changed "
                    "since it was started; pass overwrite=True to start over"
                )
            else:
                return True
        elif not overwrite:
            raise OutputExistsError(
                f"{partial} holds an interrupted pack of {out}: pass resume=True to finish it or "
                "overwrite=True to start over"
            )
        else:
            shutil.rmtree(partial)
    import zarr

    root = zarr.open_group(partial, mode="w-")
    root.attrs[ATTRS_KEY] = {"format_version": FORMAT_VERSION, "complete": False}
    os.makedirs(os.path.join(partial, STATE_DIR))
    write_json_atomic(state_file, {"fingerprint": fingerprint})
    return False


def _base_attrs(options: PackOptions, scan: ScanResult) -> dict[str, Any]:
    h, w = options.image_size
    return {
        "format_version": FORMAT_VERSION,
        "shardfit_version": __version__,
        "class_names": list(scan.class_names),
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
        "source_root": scan.root,
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

    Returns:
        A :class:`PackReport`.

    Raises:
        InvalidOptionError: an option is invalid.
        SourceFolderError: ``src`` is missing, has no class subfolders or no images.
        OutputExistsError: ``out`` or its interrupted pack is in the way.
        ResumeMismatchError: ``resume`` with another folder content or other options.
        ImageDecodeError: with ``on_error="raise"``, the first file that fails to decode (in
            storage order). Work so far is kept for ``resume``.
    """
    options = merge_options(PackOptions, options, option_kwargs)
    started = time.perf_counter()
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

    continuing = _prepare_partial(
        out_s, partial, _fingerprint(options, scan), resume=resume, overwrite=overwrite
    )
    writers = {
        s: SplitWriter(partial, s, shard_size, load_records(partial, s) if continuing else [])
        for s in plan
    }
    reused = sum(w.next_shard for w in writers.values())
    if reused:
        log.info("resuming %s: %d complete shards kept", partial, reused)
    tasks = [(s, int(i)) for s, idx in plan.items() for i in idx[writers[s].pos :]]
    _decode_into_shards(scan, options, plan, tasks, writers, progress)
    skipped = _finalize(partial, scan, options, writers)
    _publish(partial, out_s)
    splits = read_info(out_s).splits
    return PackReport(
        output=out_s,
        class_names=scan.class_names,
        counts={s: info.count for s, info in splits.items()},
        counts_per_class={s: list(info.counts_per_class) for s, info in splits.items()},
        shard_size=shard_size,
        num_shards={s: info.num_shards for s, info in splits.items()},
        skipped=skipped,
        ignored=list(scan.ignored),
        reused_shards=reused,
        decoded=len(tasks),
        seconds=time.perf_counter() - started,
        bytes_written=sum(wr.bytes_written for wr in writers.values()),
    )


def _decode_into_shards(
    scan: ScanResult,
    options: PackOptions,
    plan: dict[str, np.ndarray],
    tasks: list[tuple[str, int]],
    writers: dict[str, SplitWriter],
    progress: bool,
) -> None:
    """Decode ``tasks`` (split, file index) in worker processes, in order, into the writers."""
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
        with DecodePool(options.resolved_workers(), spec, options.compression) as pool:
            sources = [os.path.join(scan.root, scan.paths[i]) for _, i in tasks]
            for (split, i), result in zip(tasks, pool.imap(sources), strict=True):
                rel = scan.paths[i]
                if result.chunk is None:
                    if options.on_error == "raise":
                        raise ImageDecodeError(os.path.join(scan.root, rel), result.error or "")
                    skipped += 1
                    log.warning("skipped %s: %s", rel, result.error)
                    bar.set_postfix(skipped=skipped, refresh=False)
                writers[split].add(rel, int(scan.labels[i]), result.chunk, result.error)
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


def _finalize(
    partial: str, scan: ScanResult, options: PackOptions, writers: dict[str, SplitWriter]
) -> list[tuple[str, str]]:
    """Write every split's arrays and the root attributes (``complete: true`` last of all);
    return the skipped files."""
    import zarr

    base = _base_attrs(options, scan)
    splits_attrs = {
        s: write_arrays(
            partial,
            s,
            wr.records,
            image_size=options.image_size,
            dtype=options.dtype,
            compression=options.compression,
            shard_size=options.resolved_shard_size(),
            num_classes=len(scan.class_names),
            group_attrs=base,
        )
        for s, wr in writers.items()
    }
    skipped = [item for wr in writers.values() for r in wr.records for item in r.skipped]
    root = zarr.open_group(partial, mode="r+")
    root.attrs[ATTRS_KEY] = {
        **base,
        "splits": splits_attrs,
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "ignored": [{"path": p, "reason": r} for p, r in scan.ignored],
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
    """Rename the complete ``partial`` to ``out``, replacing an old ``out`` last of all."""
    _remove_temp_files(partial)
    old = None
    if os.path.exists(out):
        old = f"{out}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(partial, out)
    shutil.rmtree(os.path.join(out, STATE_DIR), ignore_errors=True)
    # this call's old store, and any a killed earlier publish left behind
    for leftover in [old, *glob.glob(glob.escape(out) + ".old-*")]:
        if leftover is not None:
            shutil.rmtree(leftover, ignore_errors=True)
