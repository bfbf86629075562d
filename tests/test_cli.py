"""The packer CLI as a user runs it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_folder, tree_bytes

from shardfit import DatasetFormatError, IncompleteDatasetError, read_info
from shardfit.store._format import STATE_DIR

TOOL = str(REPO / "tools" / "pack_images.py")


def run(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, cwd=REPO, check=check
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_packs_and_prints_a_summary(tmp_path: Path) -> None:
    make_folder(tmp_path / "src", {"a": 5, "b": 4})
    (tmp_path / "src" / "a" / "bad.png").write_bytes(b"")
    out = tmp_path / "d.zarr"
    proc = run(str(tmp_path / "src"), str(out), "--image-size", "8", "8", "--val-fraction", "0.2")
    assert proc.returncode == 0, proc.stderr
    assert "Packed" in proc.stdout and "train: 7 images" in proc.stdout
    assert "Skipped (could not decode): 1" in proc.stdout
    assert "a/bad.png: OSError: empty file (0 bytes)" in proc.stdout
    assert read_info(out).splits["val"].count == 2


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["MISSING", "o.zarr", "--image-size", "8", "8"], ["does not exist"]),
        (["SRC", "o.zarr", "--image-size", "0", "8"], ["--image-size must be two positive ints"]),
        (
            ["SRC", "o.zarr", "--image-size", "8", "8", "--val-fraction", "2"],
            ["--val-fraction must be"],
        ),
        (
            ["SRC", "o.zarr", "--image-size", "8", "8", "--dtype", "f16"],
            ["--dtype", "invalid choice"],
        ),
        (["SRC", "o.zarr"], ["--image-size"]),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    make_folder(tmp_path / "SRC", {"a": 1})
    args = [str(tmp_path / a) if a in ("SRC", "MISSING", "o.zarr") else a for a in args]
    assert_one_line_error(run(*args), *fragments)


def test_existing_output_is_one_line_error(tmp_path: Path) -> None:
    make_folder(tmp_path / "src", {"a": 2})
    (tmp_path / "d.zarr").mkdir()
    assert_one_line_error(
        run(str(tmp_path / "src"), str(tmp_path / "d.zarr"), "--image-size", "4", "4"),
        "already exists",
        "--overwrite",
    )


def test_on_error_raise_is_one_line_naming_the_file(tmp_path: Path) -> None:
    make_folder(tmp_path / "src", {"a": 3})
    (tmp_path / "src" / "a" / "broken.jpg").write_text("nope")
    proc = run(
        str(tmp_path / "src"),
        str(tmp_path / "d.zarr"),
        "--image-size",
        "4",
        "4",
        "--on-error",
        "raise",
    )
    assert_one_line_error(proc, "a/broken.jpg", "UnidentifiedImageError")


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    make_folder(tmp_path / "src", {"a": 3, "b": 3})
    proc = run(
        str(tmp_path / "src"), str(tmp_path / "d.zarr"), "--image-size", "4", "4", "--dry-run"
    )
    assert proc.returncode == 0
    assert "Would pack" in proc.stdout and "train: 6 images" in proc.stdout
    assert not (tmp_path / "d.zarr").exists()
    assert not (tmp_path / "d.zarr.partial").exists()


def test_quiet_prints_nothing_on_success(tmp_path: Path) -> None:
    make_folder(tmp_path / "src", {"a": 2})
    proc = run(str(tmp_path / "src"), str(tmp_path / "d.zarr"), "--image-size", "4", "4", "--quiet")
    assert proc.returncode == 0
    assert proc.stdout == "" and proc.stderr == ""


def test_console_script_subcommand(tmp_path: Path) -> None:
    make_folder(tmp_path / "src", {"a": 2})
    code = "import sys; from shardfit.cli import main; sys.exit(main(sys.argv[1:]))"
    base = [sys.executable, "-c", code]
    ok = subprocess.run(
        [
            *base,
            "pack",
            str(tmp_path / "src"),
            str(tmp_path / "d.zarr"),
            "--image-size",
            "4",
            "4",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*base, "unpack"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


PACK_ARGS = [
    "--image-size",
    "16",
    "16",
    "--shard-size",
    "8",
    "--val-fraction",
    "0.1",
    "--workers",
    "2",
]


def _kill_when(proc: subprocess.Popen[bytes], ready) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 60
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    with contextlib.suppress(ProcessLookupError):  # it may have finished already
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _spawn(src: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, TOOL, str(src), str(out), *PACK_ARGS, "--quiet", *extra],
        cwd=REPO,
        start_new_session=True,  # so that the kill takes the decode workers too
    )


def test_kill_9_mid_pack_then_resume_equals_an_uninterrupted_pack(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_folder(src, {"a": 150, "b": 150}, size=(32, 32), fmt="jpg")
    ref = tmp_path / "ref.zarr"
    run(str(src), str(ref), *PACK_ARGS, "--quiet", check=True)

    out = tmp_path / "d.zarr"
    state = Path(str(out) + ".partial") / STATE_DIR
    proc = _spawn(src, out)
    _kill_when(proc, lambda: state.is_dir() and len(list(state.glob("train-*.json"))) >= 3)
    assert proc.returncode == -signal.SIGKILL, "the pack finished before it could be killed"
    with pytest.raises(IncompleteDatasetError, match="resume=True"):
        read_info(out)
    again = run(str(src), str(out), *PACK_ARGS)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run(str(src), str(out), *PACK_ARGS, "--resume", check=True)
    assert "kept" in resumed.stdout and "shards from the interrupted pack" in resumed.stdout
    assert tree_bytes(out) == tree_bytes(ref)


def _records(state: Path, split: str) -> int:
    return len(list(state.glob(f"{split}-*.json"))) if state.is_dir() else 0


# Moments of a pack, by what it has left on disk (300 images, 8 per shard: 34 train shards,
# 4 val shards, then the arrays, the metadata and the publishing rename).
MOMENTS = {
    "before-anything": lambda partial, state: True,
    "partial-created": lambda partial, state: partial.is_dir(),
    "first-shard": lambda partial, state: _records(state, "train") >= 1,
    "half-the-shards": lambda partial, state: _records(state, "train") >= 17,
    "train-done": lambda partial, state: _records(state, "train") >= 34,
    "every-shard-written": lambda partial, state: _records(state, "val") >= 4,
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_kill_9_at_any_moment_then_resume_equals_an_uninterrupted_pack(
    tmp_path: Path, moment: str
) -> None:
    src = tmp_path / "src"
    make_folder(src, {"a": 150, "b": 150}, size=(32, 32), fmt="jpg")
    (src / "a" / "broken.jpg").write_bytes(b"")
    ref = tmp_path / "ref.zarr"
    run(str(src), str(ref), *PACK_ARGS, "--quiet", check=True)
    out = tmp_path / "d.zarr"
    partial = Path(str(out) + ".partial")
    ready = MOMENTS[moment]
    for _ in range(3):  # the last moments are close to the end: try again if the pack won
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
        proc = _spawn(src, out)
        _kill_when(proc, lambda: ready(partial, partial / STATE_DIR))
        if proc.returncode == -signal.SIGKILL:
            break
    assert proc.returncode == -signal.SIGKILL, f"the pack ended before the kill at {moment}"
    try:
        read_info(out)
        complete = True
    except (IncompleteDatasetError, DatasetFormatError):  # killed before the partial existed
        complete = False
    if not complete:
        run(str(src), str(out), *PACK_ARGS, "--quiet", "--resume", check=True)
    assert tree_bytes(out) == tree_bytes(ref)
