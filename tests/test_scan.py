from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from shardfit import SourceFolderError
from shardfit.pack._scan import image_extensions, scan_folder


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2)).save(path)


def test_scan_finds_classes_sorted_with_nested_files(tmp_path: Path) -> None:
    _img(tmp_path / "zebra" / "a.png")
    _img(tmp_path / "ant" / "b.jpg")
    _img(tmp_path / "ant" / "deeper" / "c.PNG")
    scan = scan_folder(tmp_path)
    assert scan.class_names == ("ant", "zebra")
    assert scan.paths == ("ant/b.jpg", "ant/deeper/c.PNG", "zebra/a.png")
    assert scan.labels.tolist() == [0, 0, 1]
    assert scan.counts_per_class() == [2, 1]


def test_scan_ignores_hidden_loose_and_non_image_files_and_says_why(tmp_path: Path) -> None:
    _img(tmp_path / "cls" / "ok.png")
    _img(tmp_path / "cls" / ".hidden.png")
    _img(tmp_path / "cls" / ".ipynb_checkpoints" / "x.png")
    _img(tmp_path / ".trash" / "y.png")
    _img(tmp_path / "loose.png")
    (tmp_path / "cls" / "notes.txt").write_text("hi")
    scan = scan_folder(tmp_path)
    assert scan.paths == ("cls/ok.png",)
    reasons = dict(scan.ignored)
    assert reasons["cls/.hidden.png"] == "hidden file"
    assert reasons["cls/.ipynb_checkpoints/"] == "hidden folder"
    assert reasons[".trash/"] == "hidden"
    assert "loose file at the root" in reasons["loose.png"]
    assert reasons["cls/notes.txt"] == "not an image file extension: .txt"


def test_scan_takes_every_extension_pillow_opens() -> None:
    exts = image_extensions()
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".webp"} <= exts
    assert ".txt" not in exts


def test_symlinked_subfolders_are_followed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _img(src / "cls" / "own.png")
    _img(tmp_path / "elsewhere" / "far.png")
    (src / "cls" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    scan = scan_folder(src)
    assert scan.paths == ("cls/own.png", "cls/linked/far.png")
    assert scan.ignored == ()


def test_a_symlink_loop_is_listed_not_followed(tmp_path: Path) -> None:
    _img(tmp_path / "cls" / "sub" / "a.png")
    (tmp_path / "cls" / "sub" / "up").symlink_to("..", target_is_directory=True)
    (tmp_path / "cls" / "again").symlink_to("sub", target_is_directory=True)
    scan = scan_folder(tmp_path)
    assert scan.paths == ("cls/sub/a.png",)
    reasons = dict(scan.ignored)
    assert reasons.keys() == {"cls/again/", "cls/sub/up/"}
    assert all("link to a folder already read" in r for r in reasons.values())


def test_explicit_class_names_set_label_order(tmp_path: Path) -> None:
    _img(tmp_path / "a" / "1.png")
    _img(tmp_path / "b" / "2.png")
    scan = scan_folder(tmp_path, ("b", "a"))
    assert scan.class_names == ("b", "a")
    assert scan.labels.tolist() == [0, 1]
    assert scan.paths == ("b/2.png", "a/1.png")


def test_fingerprint_changes_when_a_file_changes(tmp_path: Path) -> None:
    _img(tmp_path / "a" / "1.png")
    before = scan_folder(tmp_path).fingerprint
    assert scan_folder(tmp_path).fingerprint == before
    _img(tmp_path / "a" / "2.png")
    assert scan_folder(tmp_path).fingerprint != before


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("x"), "is not a folder"),
        (lambda p: p.mkdir(), "has no class subfolders"),
        (lambda p: (p / "cls").mkdir(parents=True), "holds no image files"),
    ],
)
def test_bad_source_folder_is_one_clear_error(tmp_path: Path, setup, match: str) -> None:
    src = tmp_path / "src"
    setup(src)
    with pytest.raises(SourceFolderError, match=match):
        scan_folder(src)


def test_class_names_must_match_subfolders(tmp_path: Path) -> None:
    _img(tmp_path / "a" / "1.png")
    with pytest.raises(SourceFolderError, match=r"Listed but not found: \['c'\]"):
        scan_folder(tmp_path, ("a", "c"))
