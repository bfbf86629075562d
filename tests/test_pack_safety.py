"""Packing never leaves wrong data or stray processes behind: signals, kill points, a second
packer, full or read-only disks, odd file names, edited progress records. Real processes, real
files and real filesystems (tmpfs mounts where this process may mount)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zarr
from conftest import REPO, decode_index, make_folder, tree_bytes
from test_cli import PACK_ARGS, TOOL, assert_one_line_error, run

from shardfit import (
    ImageDecodeError,
    IncompleteDatasetError,
    OutputLockedError,
    ResumeMismatchError,
    pack_images,
    read_info,
)
from shardfit.pack._plan import global_order
from shardfit.pack._scan import scan_folder
from shardfit.store._format import STATE_DIR, shard_path


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid``: {pid: start time} (from /proc: no psutil needed)."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            parent_of[int(entry)] = int(fields[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parent_of.items():
            if ppid == parent and child not in found:
                fields = _stat_fields(child)
                if fields is not None:
                    found[child] = fields[19]  # start time: a reused pid is another process
                    frontier.append(child)
    return found


def _alive(pids: dict[int, str]) -> list[int]:
    """Those of ``pids`` still running (a zombie has ended: it only awaits reaping by init)."""
    alive = []
    for pid, start in pids.items():
        fields = _stat_fields(pid)
        if fields is not None and fields[0] != "Z" and fields[19] == start:
            alive.append(pid)
    return alive


def _spawn(src: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, TOOL, str(src), str(out), *PACK_ARGS, "--quiet", *extra],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # only so that the test can clean up whatever survives
    )


def _records(out: Path, split: str = "train") -> int:
    state = Path(str(out) + ".partial") / STATE_DIR
    return len(list(state.glob(f"{split}-*.json"))) if state.is_dir() else 0


def _wait_for(proc: subprocess.Popen[str], ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the pack ended before the moment the test waited for"


@pytest.fixture
def packed(tmp_path: Path) -> tuple[Path, Path]:
    """A source folder (300 JPEGs: 38 shards of 8 at ``PACK_ARGS``) and its uninterrupted pack."""
    src = tmp_path / "src"
    make_folder(src, {"a": 150, "b": 150}, size=(32, 32), fmt="jpg")
    ref = tmp_path / "ref.zarr"
    run(str(src), str(ref), *PACK_ARGS, "--quiet", check=True)
    return src, ref


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_no_process_of_the_pack_outlives_a_signal_to_the_packer(
    packed: tuple[Path, Path], tmp_path: Path, sig: signal.Signals
) -> None:
    src, ref = packed
    out = tmp_path / "d.zarr"
    proc = _spawn(src, out)
    try:
        _wait_for(proc, lambda: _records(out) >= 3)
        pack_pids = _descendants(proc.pid)
        assert len(pack_pids) >= 2, "expected the 2 decode workers"
        os.kill(proc.pid, sig)  # the packer alone, as the OOM killer or `timeout` does
        _, stderr = proc.communicate(timeout=30)
        deadline = time.monotonic() + 5
        while _alive(pack_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(pack_pids) == [], "decode workers outlived the packer"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM
        assert stderr.strip().splitlines() == [
            "pack_images.py: terminated (SIGTERM); run again with --resume to finish"
        ]
    else:
        assert proc.returncode == -signal.SIGKILL
    with pytest.raises(IncompleteDatasetError, match="resume=True"):
        read_info(out)
    run(str(src), str(out), *PACK_ARGS, "--quiet", "--resume", check=True)
    assert tree_bytes(out) == tree_bytes(ref)


# A packer that kills itself with SIGKILL at the publishing rename: before it, or just after it.
_KILL_AT_RENAME = """
import os, signal, sys
real_rename = os.rename
def rename(src, dst):
    if str(src).endswith(".zarr.partial"):
        if sys.argv[1] == "after":
            real_rename(src, dst)
        os.kill(os.getpid(), signal.SIGKILL)
    real_rename(src, dst)
os.rename = rename
from shardfit.cli import pack_main
pack_main(sys.argv[2:])
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_9_at_the_publishing_rename_leaves_no_records_and_resume_publishes(
    packed: tuple[Path, Path], tmp_path: Path, when: str
) -> None:
    src, ref = packed
    out = tmp_path / "d.zarr"
    partial = Path(str(out) + ".partial")
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_AT_RENAME, when, str(src), str(out), *PACK_ARGS, "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if when == "after":  # published: complete, and nothing of the pack's state inside
        assert not partial.exists() and not (out / STATE_DIR).exists()
        assert tree_bytes(out) == tree_bytes(ref)
        return
    assert not out.exists() and not (partial / STATE_DIR).exists()
    with pytest.raises(IncompleteDatasetError, match="resume=True"):
        read_info(out)
    resumed = run(str(src), str(out), *PACK_ARGS, "--resume", check=True)
    assert "Decoded 0 files" in resumed.stdout
    assert tree_bytes(out) == tree_bytes(ref)
    assert not partial.exists()


def test_a_complete_partial_store_is_not_published_under_other_options(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    src, _ = packed
    out = tmp_path / "d.zarr"
    subprocess.run(
        [sys.executable, "-c", _KILL_AT_RENAME, "before", str(src), str(out), *PACK_ARGS],
        cwd=REPO,
        capture_output=True,
    )
    other = [a if a != "16" else "12" for a in PACK_ARGS]  # --image-size 12 12
    assert_one_line_error(
        run(str(src), str(out), *other, "--resume"), "packed with other image_size", "--overwrite"
    )


_SLOW_PACKER = """
import sys, time
from shardfit.pack import _writer
flush = _writer.SplitWriter.flush
def slow_flush(self):
    time.sleep(0.1)
    flush(self)
_writer.SplitWriter.flush = slow_flush
from shardfit.cli import pack_main
sys.exit(pack_main(sys.argv[1:]))
"""


def test_a_second_packer_on_the_same_output_is_refused_and_the_first_finishes(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    src, ref = packed
    out = tmp_path / "d.zarr"
    # a packer slowed down to 0.1 s a shard (38 shards), so that it is still writing while the
    # second one starts, scans and tries
    first = subprocess.Popen(
        [sys.executable, "-c", _SLOW_PACKER, str(src), str(out), *PACK_ARGS, "--quiet"],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(first, lambda: _records(out) >= 1)
        for flag in ("--overwrite", "--resume"):  # the most destructive ways in
            assert_one_line_error(
                run(str(src), str(out), *PACK_ARGS, flag), f"another pack is writing {out}"
            )
        with pytest.raises(OutputLockedError, match="another pack is writing"):
            pack_images(src, out, image_size=(16, 16), workers=0, overwrite=True)
        assert first.poll() is None, "the first pack ended before the second one ran"
        _, stderr = first.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert first.returncode == 0, stderr
    assert tree_bytes(out) == tree_bytes(ref)


@contextlib.contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[bool]:
    """Mount a tmpfs at ``path`` (created) for the block; yield whether this process may mount."""
    path.mkdir()
    if shutil.which("mount") is None:
        yield False
        return
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _fsize_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:  # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_is_one_line_and_resume_finishes_once_there_is_room(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    """A real full disk: a 512 KiB tmpfs (the store takes about 1 MB). Where this process may not
    mount, a file size limit (RLIMIT_FSIZE, writes fail with EFBIG) stands in for it."""
    src, ref = packed
    disk = tmp_path / "disk"
    with _tmpfs(disk, "size=512k") as mounted:
        out = disk / "d.zarr"
        args = [sys.executable, TOOL, str(src), str(out), *PACK_ARGS, "--quiet"]
        limit = None if mounted else _fsize_limit(20_000)  # less than one shard (8 x 3 KiB)
        full = subprocess.run(args, capture_output=True, text=True, preexec_fn=limit)
        assert_one_line_error(full, "cannot write", str(out) + ".partial", "--resume")
        assert ("No space left on device" if mounted else "File too large") in full.stderr
        if mounted:  # the shards that fitted are kept
            assert _records(out) >= 1
            subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        resumed = run(str(src), str(out), *PACK_ARGS, "--resume", check=True)
        if mounted:
            assert "shards from the interrupted pack" in resumed.stdout
        assert tree_bytes(out) == tree_bytes(ref)


def test_a_read_only_output_is_one_line_naming_it(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    """A read-only tmpfs where this process may mount; else, if not root, a folder of mode 0555
    (root writes there anyway)."""
    src, _ = packed
    place = tmp_path / "ro"
    with _tmpfs(place, "ro,size=64k") as mounted:
        if not mounted:
            if os.geteuid() == 0:
                pytest.skip("root without mount permission: no way to make a folder read-only")
            place.chmod(0o555)
        out = place / "sub" / "d.zarr"
        proc = run(str(src), str(out), *PACK_ARGS)
        reason = "Read-only file system" if mounted else "Permission denied"
        assert_one_line_error(proc, f"cannot write {place / 'sub'}: {reason}", "writable folder")


def _interrupted_pack(src: Path, out: Path, bad_name: str = "b/zzz.jpg") -> int:
    """Pack ``src`` (40 images and the empty file ``bad_name``) into ``out`` with
    ``on_error="raise"`` and a seed that puts the empty file at position 20 or later: the pack
    stops there with 5 or more shards of 4 recorded. Return the seed."""
    (src / bad_name).write_bytes(b"")
    scan = scan_folder(src)
    bad = scan.paths.index(bad_name)
    seed = next(s for s in range(100) if list(global_order(len(scan.paths), s)).index(bad) >= 20)
    with pytest.raises(ImageDecodeError):
        pack_images(
            src, out, image_size=(8, 8), shard_size=4, workers=0, seed=seed, on_error="raise"
        )
    return seed


def _edit_record(record: Path, edit: str) -> None:
    doc = json.loads(record.read_text())
    if edit == "not-json":
        record.write_text("{")
        return
    if edit == "label":
        doc["labels"][0] = 1 - doc["labels"][0]
    elif edit == "paths-swapped":
        doc["paths"][0], doc["paths"][1] = doc["paths"][1], doc["paths"][0]
    elif edit == "positions":
        doc["end"] += 1
    elif edit == "shard-number":
        doc["shard"] = 7
    elif edit == "wrong-type":
        doc["labels"] = "0123"
    record.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "edit",
    [
        "label",
        "paths-swapped",
        "positions",
        "shard-number",
        "wrong-type",
        "not-json",
        "no-shard",
        "cut-shard",
    ],
)
def test_an_edited_progress_record_is_refused_never_used(folder, tmp_path: Path, edit: str) -> None:
    src, _ = folder({"a": 20, "b": 20})
    out = tmp_path / "d.zarr"
    seed = _interrupted_pack(src, out)
    record = Path(str(out) + ".partial") / STATE_DIR / "train-000001.json"
    shard = Path(shard_path(str(out) + ".partial", "train", 1))
    if edit == "no-shard":
        shard.unlink()
    elif edit == "cut-shard":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        _edit_record(record, edit)
    args = {"image_size": (8, 8), "shard_size": 4, "workers": 0, "seed": seed}
    with pytest.raises(ResumeMismatchError, match=rf"progress record {record} .*overwrite=True"):
        pack_images(src, out, resume=True, **args)
    assert not out.exists()
    report = pack_images(src, out, overwrite=True, **args)
    assert report.reused_shards == 0 and report.counts == {"train": 40}


CAFE = os.fsdecode(b"caf\xe9")  # Latin-1 bytes: not UTF-8, as in old archives and Windows zips
NAIVE = os.fsdecode(b"a/na\xefve.png")
BROKEN = os.fsdecode(b"a/bro\xeeken.jpg")


def _odd_names(src: Path) -> dict[str, tuple[int, int]]:
    """A folder with a class folder, an image, a broken file and a text file whose names are
    not UTF-8; return the truth of its images by real relative path."""
    truth = make_folder(src, {"a": 12, CAFE: 12})
    (src / NAIVE).write_bytes((src / "a" / "img00003.png").read_bytes())
    truth[NAIVE] = truth["a/img00003.png"]
    (src / BROKEN).write_bytes(b"")
    (src / os.fsdecode(b"a/notes\xff.txt")).write_text("not an image")
    return truth


def test_names_that_are_not_utf8_are_packed_by_their_bytes(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "d.zarr"
    truth = _odd_names(src)
    report = pack_images(src, out, image_size=(8, 8), shard_size=4, workers=2)
    root = zarr.open_group(str(out), mode="r")
    raw = [bytes(p).rstrip(b"\0") for p in root["train/paths"][:]]
    assert sorted(raw) == sorted(os.fsencode(p) for p in truth)
    assert os.fsencode(NAIVE) in raw and b"caf\xe9/img00012.png" in raw
    for img, path in zip(root["train/images"][:], raw, strict=True):
        assert decode_index(img) == truth[os.fsdecode(path)]
    attrs = read_info(out).attrs  # JSON: odd bytes shown as \xNN
    assert attrs["class_names"] == ["a", "caf\\xe9"]
    assert attrs["skipped"] == [
        {"path": "a/bro\\xeeken.jpg", "reason": "OSError: empty file (0 bytes)"}
    ]
    assert {"path": "a/notes\\xff.txt", "reason": "not an image file extension: .txt"} in attrs[
        "ignored"
    ]
    # the report keeps real names, to open the files by
    assert report.class_names == ("a", CAFE)
    assert report.skipped == [(BROKEN, "OSError: empty file (0 bytes)")]


def test_resume_with_names_that_are_not_utf8_equals_an_uninterrupted_pack(tmp_path: Path) -> None:
    src, out, ref = tmp_path / "src", tmp_path / "d.zarr", tmp_path / "ref.zarr"
    _odd_names(src)
    (src / BROKEN).unlink()
    seed = _interrupted_pack(src, out, BROKEN)
    args = {"image_size": (8, 8), "shard_size": 4, "workers": 2, "seed": seed}
    report = pack_images(src, out, resume=True, **args)
    assert report.reused_shards >= 5 and report.skipped[0][0] == BROKEN
    pack_images(src, ref, **args)
    assert tree_bytes(out) == tree_bytes(ref)


def test_cli_lists_names_that_are_not_utf8_without_failing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _odd_names(src)
    proc = run(str(src), str(tmp_path / "d.zarr"), "--image-size", "8", "8", check=True)
    assert "Classes (2): a, caf\\xe9" in proc.stdout
    assert "a/bro\\xeeken.jpg: OSError: empty file" in proc.stdout
    assert "a/notes\\xff.txt: not an image file extension" in proc.stdout
