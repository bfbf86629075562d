"""Honest RAM figures for a process tree (docs/design.md, "Measuring RAM honestly").

The loader's own memory is the sum, over a process and all its descendants, of
``Pss_Anon + Pss_Shmem`` from ``/proc/<pid>/smaps_rollup``; page cache of mapped files
(``Pss_File``) is reported apart as reclaimable; summed RSS double-counts shared pages and is
only an extra, flagged figure.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

__all__ = ["PeakSampler", "TreeMemory", "tree_memory", "tree_pids"]


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


@dataclass
class TreeMemory:
    """Bytes summed over a process tree at one moment."""

    own: int = 0  # Pss_Anon + Pss_Shmem
    file: int = 0  # Pss_File: page cache of mapped files, reclaimable
    rss: int = 0  # summed Rss: double-counts shared pages
    processes: int = 0


def tree_memory(pid: int) -> TreeMemory:
    """Memory of ``pid`` and its descendants now, from ``smaps_rollup``."""
    total = TreeMemory()
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = {}
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3 and parts[-1] == "kB":
                        fields[parts[0].rstrip(":")] = int(parts[-2]) * 1024
        except OSError:
            continue
        total.own += fields.get("Pss_Anon", 0) + fields.get("Pss_Shmem", 0)
        total.file += fields.get("Pss_File", 0)
        total.rss += fields.get("Rss", 0)
        total.processes += 1
    return total


@dataclass
class PeakSampler:
    """Samples :func:`tree_memory` of ``pid`` every ``interval`` seconds; keeps the peaks."""

    pid: int
    interval: float = 0.2
    peak: TreeMemory = field(default_factory=TreeMemory)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> PeakSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            m = tree_memory(self.pid)
            if m.processes:
                self.samples += 1
                self.peak.own = max(self.peak.own, m.own)
                self.peak.file = max(self.peak.file, m.file)
                self.peak.rss = max(self.peak.rss, m.rss)
                self.peak.processes = max(self.peak.processes, m.processes)
            time.sleep(self.interval)
