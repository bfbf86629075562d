"""Where every benchmark leaves its figures: ``NAME.json`` (all data) and ``NAME.md`` (table).

A run writes into a fresh folder, ``benchmarks/runs/<date-time>/`` (not tracked by git), unless
``--out`` names another: the committed figures in ``benchmarks/results/`` change only when a run
is asked to write there (``--out benchmarks/results``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

OUT_HELP = "folder for the results (default: a fresh benchmarks/runs/<date-time>/)"


def fresh_out() -> Path:
    """A folder of its own for this run's results (created when they are written)."""
    return Path(__file__).resolve().parent / "runs" / time.strftime("%Y%m%d-%H%M%S")


def publish(out: Path, name: str, doc: Any, lines: list[str]) -> None:
    """Print the markdown ``lines`` and write them and ``doc`` under ``out``."""
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1))
    (out / f"{name}.md").write_text(table + "\n")
