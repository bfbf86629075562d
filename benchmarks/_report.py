"""Where every benchmark leaves its figures: ``NAME.json`` (all data) and ``NAME.md`` (table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def publish(out: Path, name: str, doc: Any, lines: list[str]) -> None:
    """Print the markdown ``lines`` and write them and ``doc`` under ``out``."""
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1))
    (out / f"{name}.md").write_text(table + "\n")
