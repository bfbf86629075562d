"""A real memory limit for one benchmark process: a cgroup v1 memory controller child group.

cgroup v2 has no memory controller on these machines and systemd-run does not work; the v1 memory
controller does, as root (docs/design.md, "Measuring RAM honestly"). Under the limit the page cache
is capped too, so a dataset twice the limit is read cold every epoch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path


def _own_memory_cgroup() -> Path | None:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    except OSError:
        return None
    return None


def availability() -> tuple[bool, str]:
    """Whether a memory limit can be set here, and if not, why (one line for the report)."""
    if os.geteuid() != 0:
        return False, "needs root to create a cgroup"
    base = _own_memory_cgroup()
    if base is None:
        return False, "no cgroup v1 memory controller in /proc/self/cgroup"
    if not (base / "memory.limit_in_bytes").exists():
        return False, f"{base} has no memory.limit_in_bytes"
    try:
        probe = base / f"shardfit-probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        return False, f"cannot create a cgroup under {base}: {err.strerror}"
    return True, f"cgroup v1 memory controller at {base}"


@dataclass
class Limited:
    """A child cgroup with a memory limit; processes started with :meth:`preexec` join it."""

    limit: int
    path: Path | None = None

    def __enter__(self) -> Limited:
        base = _own_memory_cgroup()
        assert base is not None
        self.path = base / f"shardfit-bench-{os.getpid()}-{id(self)}"
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
        return self

    def preexec(self) -> None:
        """Run in the child between fork and exec: move it into the group."""
        assert self.path is not None
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    def stats(self) -> dict[str, int]:
        assert self.path is not None
        out = {
            "max_usage": int((self.path / "memory.max_usage_in_bytes").read_text()),
            "failcnt": int((self.path / "memory.failcnt").read_text()),
        }
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                out["oom_kills"] = int(value)
        return out

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            # a straggler still inside: leave the group, it is empty soon
            with contextlib.suppress(OSError):
                self.path.rmdir()
