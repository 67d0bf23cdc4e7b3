"""Results files of a benchmark: ``OUT.json`` (everything measured), ``OUT.md`` (a line on what and where,
then a markdown table) and ``OUT.png`` (when the benchmark draws one)."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path


def write_report(out: Path, result: dict, header: str, columns: list[str], rows: list[list[str]],
                 plot: Callable[[Path], None] | None = None) -> str:
    """Write ``out`` with the suffixes .json, .md (and .png through ``plot(path)``); print and return the .md."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    if plot is not None:
        plot(out.with_suffix(".png"))
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(markdown)
    sys.stdout.write(markdown)
    return markdown
