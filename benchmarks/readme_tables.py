"""The README's result tables are copies of tables in ``benchmarks/results/*.md``, so they cannot drift.

    python benchmarks/readme_tables.py           # rewrite every marked README table from its results file
    python benchmarks/readme_tables.py --check   # exit 1 naming each table that differs

A table is marked by the comment line just above it, ``<!-- results: benchmarks/results/NAME.md -->``, or
``...NAME.md#2`` for the file's second table. ``tests/test_readme_tables.py`` runs the check.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^(?P<indent> *)<!-- results: (?P<path>\S+?\.md)(?:#(?P<index>\d+))? -->$")


def tables(text: str) -> list[list[str]]:
    """Every markdown table of ``text``: runs of consecutive lines that start with '|'."""
    found, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    if current:
        found.append(current)
    return found


def render(readme: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """(the README with every marked table replaced by its source, the markers whose table changed)."""
    lines, out, changed, i = readme.splitlines(), [], [], 0
    while i < len(lines):
        out.append(lines[i])
        match = MARKER.match(lines[i])
        i += 1
        if not match:
            continue
        source = root / match["path"]
        if not source.is_file():
            raise FileNotFoundError(f"README marker {lines[i - 1]!r}: {source} does not exist")
        index = int(match["index"] or 1)
        found = tables(source.read_text())
        if index > len(found):
            raise ValueError(f"README marker {lines[i - 1]!r}: {source} has {len(found)} table(s)")
        indent, old = match["indent"], []  # a table inside a list item keeps the item's indent
        while i < len(lines) and lines[i].startswith(indent + "|"):
            old.append(lines[i])
            i += 1
        new = [indent + line for line in found[index - 1]]
        if old != new:
            changed.append(lines[i - len(old) - 1].strip())
        out.extend(new)
    return "\n".join(out) + "\n", changed


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    path = ROOT / "README.md"
    text, changed = render(path.read_text())
    if check:
        for marker in changed:
            sys.stderr.write(f"README table under {marker} differs from its results file: run "
                             "python benchmarks/readme_tables.py\n")
        return 1 if changed else 0
    path.write_text(text)
    sys.stderr.write(f"README: {len(changed)} table(s) rewritten\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
