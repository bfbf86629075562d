"""Scan: an image folder (one subfolder per class) -> files, labels and class names."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from shardfit.errors import SourceFolderError

__all__ = ["ScanResult", "image_extensions", "scan_folder", "shown"]


def shown(name: str) -> str:
    """``name`` as text that any JSON writer and terminal takes.

    A file name that is not UTF-8 (old archives, zips made on Windows) reaches Python with its
    odd bytes as lone surrogates (PEP 383), which UTF-8 cannot encode; each such byte is shown
    as ``\\xNN`` instead. Names that are UTF-8, the usual case, come out unchanged, and so does
    anything already shown. Only for display and JSON: the file is opened by its real name.
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) that the installed Pillow can open."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.EXTENSION.items() if fmt in Image.OPEN)


@dataclass(frozen=True)
class ScanResult:
    """What a scan found.

    Attributes:
        root: absolute path of the scanned folder.
        class_names: class names in label order.
        paths: image paths relative to ``root``, '/'-separated, grouped by class, sorted.
        labels: ``int32`` label of each path.
        ignored: ``(relative path, reason)`` of every file not taken as an image.
        fingerprint: hash of every taken file's path, size and mtime, to detect changes.
    """

    root: str
    class_names: tuple[str, ...]
    paths: tuple[str, ...]
    labels: npt.NDArray[np.int32]
    ignored: tuple[tuple[str, str], ...]
    fingerprint: str

    def counts_per_class(self) -> list[int]:
        """Number of images of each class, in label order."""
        return [int(c) for c in np.bincount(self.labels, minlength=len(self.class_names))]


def _folder_id(path: str) -> tuple[int, int]:
    st = os.stat(path)  # through links: the folder a link leads to
    return st.st_dev, st.st_ino


def _walk_class(
    root: str, class_dir: str, exts: frozenset[str], ignored: list[tuple[str, str]]
) -> list[str]:
    found: list[str] = []

    def fail(err: OSError) -> None:
        raise SourceFolderError(f"cannot read folder {err.filename}: {err.strerror}")

    top = os.path.join(root, class_dir)
    # Symlinked folders are followed, as a user who links folders in means them to be read;
    # each folder is read once, by its (device, inode), so that a link back up (a loop) cannot
    # make the walk endless and a second link to a folder cannot store its images twice.
    seen = {_folder_id(top)}
    for dirpath, dirnames, filenames in os.walk(top, onerror=fail, followlinks=True):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        kept = []
        # among siblings, a real folder is kept rather than a link to it, whatever the names
        for d in sorted(dirnames, key=lambda d: (os.path.islink(os.path.join(dirpath, d)), d)):
            if d.startswith("."):
                ignored.append((f"{rel_dir}/{d}/", "hidden folder"))
                continue
            try:
                folder = _folder_id(os.path.join(dirpath, d))
            except OSError as err:  # os.walk would pass it over without a word
                ignored.append((f"{rel_dir}/{d}/", f"cannot read folder: {err.strerror}"))
                continue
            if folder in seen:
                ignored.append(
                    (f"{rel_dir}/{d}/", "link to a folder already read (a loop or a second link)")
                )
                continue
            seen.add(folder)
            kept.append(d)
        dirnames[:] = sorted(kept)
        for name in sorted(filenames):
            rel = f"{rel_dir}/{name}"
            if name.startswith("."):
                ignored.append((rel, "hidden file"))
            elif os.path.splitext(name)[1].lower() not in exts:
                ext = os.path.splitext(name)[1] or "(none)"
                ignored.append((rel, f"not an image file extension: {ext}"))
            else:
                found.append(rel)
    return found


def scan_folder(
    root: str | os.PathLike[str], class_names: tuple[str, ...] | None = None
) -> ScanResult:
    """List the images under ``root``, one subfolder per class, as Keras's
    ``image_dataset_from_directory`` reads them (subfolders of a class folder are included).

    Hidden files and folders, loose files at the root and files whose extension Pillow cannot
    open are not taken; each is listed in :attr:`ScanResult.ignored` with its reason.
    Symlinked folders are followed; a link to a folder already read in the same class (a loop,
    or a second link) is not, and is listed.

    Raises:
        SourceFolderError: ``root`` is missing or not a folder, has no class subfolders, does not
            match ``class_names``, or holds no image at all.
    """
    root_s = os.path.abspath(os.fspath(root))
    if not os.path.exists(root_s):
        raise SourceFolderError(
            f"source folder {root_s} does not exist: pass the folder that holds one subfolder "
            "per class"
        )
    if not os.path.isdir(root_s):
        raise SourceFolderError(
            f"source {root_s} is not a folder: pass the folder that holds one subfolder per class"
        )
    ignored: list[tuple[str, str]] = []
    subdirs: list[str] = []
    try:
        entries = sorted(os.scandir(root_s), key=lambda e: e.name)
    except OSError as err:
        raise SourceFolderError(f"cannot read folder {root_s}: {err.strerror}") from None
    for entry in entries:
        if entry.name.startswith("."):
            ignored.append((entry.name + ("/" if entry.is_dir() else ""), "hidden"))
        elif entry.is_dir():
            subdirs.append(entry.name)
        else:
            ignored.append(
                (entry.name, "loose file at the root: images must be in class subfolders")
            )
    if not subdirs:
        raise SourceFolderError(
            f"{root_s} has no class subfolders: put each class's images in a subfolder named "
            "after the class (for example cats/ and dogs/)"
        )
    if class_names is None:
        names = tuple(subdirs)
    else:
        missing = sorted(set(class_names) - set(subdirs))
        extra = sorted(set(subdirs) - set(class_names))
        if missing or extra:
            raise SourceFolderError(
                f"class_names must match the subfolders of {root_s} exactly. "
                f"Listed but not found: {missing}; found but not listed: {extra}"
            )
        names = tuple(class_names)

    exts = image_extensions()
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        found = _walk_class(root_s, name, exts, ignored)
        paths.extend(found)
        labels.extend([label] * len(found))
    if not paths:
        raise SourceFolderError(
            f"{root_s} holds no image files in its class subfolders "
            f"({len(ignored)} other files ignored)"
        )
    digest = hashlib.sha256()
    for rel in paths:
        try:
            st = os.stat(os.path.join(root_s, rel))
            line = f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n"
        except OSError:  # a dangling link: it will fail to decode and be reported then
            line = f"{rel}\0?\n"
        digest.update(line.encode("utf-8", "surrogateescape"))  # a name's bytes as they are
    return ScanResult(
        root=root_s,
        class_names=names,
        paths=tuple(paths),
        labels=np.asarray(labels, dtype=np.int32),
        ignored=tuple(ignored),
        fingerprint=digest.hexdigest(),
    )
