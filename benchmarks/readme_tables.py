"""The result tables of the README and docs/ are copies of tables in ``benchmarks/results/*.md``, so they
cannot drift.

    python benchmarks/readme_tables.py           # rewrite every marked table from its results file
    python benchmarks/readme_tables.py --check   # exit 1 naming each table that differs; changes nothing

A table is marked by the comment line just above it, ``<!-- results: benchmarks/results/NAME.md -->``, or
``...NAME.md#2`` for the file's second table (paths from the repository root, in every document). A ``*`` in
the name takes the newest matching file (``gpu_*.md``: the latest ``make gpu-check``), and ``NO_RESULT``'s
table while none exists.
``tests/test_readme_tables.py`` runs the check.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^(?P<indent> *)<!-- results: (?P<path>\S+?\.md)(?:#(?P<index>\d+))? -->$")
NO_RESULT = ["| result | |", "|---|---|",
             "| none yet | no results file matches this marker: the run that writes it has not happened (for "
             "gpu_*.md: no GPU lent since `make gpu-check` exists) |"]


def documents(root: Path = ROOT) -> list[Path]:
    """The README and every page of docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


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


def render(document: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """(``document`` with every marked table replaced by its source, the markers whose table changed)."""
    lines, out, changed, i = document.splitlines(), [], [], 0
    while i < len(lines):
        out.append(lines[i])
        match = MARKER.match(lines[i])
        i += 1
        if not match:
            continue
        index = int(match["index"] or 1)
        if "*" in match["path"]:  # the newest match, or NO_RESULT
            matches = sorted(root.glob(match["path"]), key=lambda path: path.stat().st_mtime)
            found = tables(matches[-1].read_text()) if matches else [NO_RESULT]
            source = matches[-1] if matches else match["path"]
        else:
            source = root / match["path"]
            if not source.is_file():
                raise FileNotFoundError(f"marker {lines[i - 1]!r}: {source} does not exist")
            found = tables(source.read_text())
        if index > len(found):
            raise ValueError(f"marker {lines[i - 1]!r}: {source} has {len(found)} table(s)")
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
    from bmc_fast.cli import ArgumentParser

    parser = ArgumentParser(prog="python benchmarks/readme_tables.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare: exit 1 naming each table that differs")
    args = parser.parse_args(argv)
    stale = 0
    for path in documents():
        text, changed = render(path.read_text())
        name = path.relative_to(ROOT)
        if args.check:
            for marker in changed:
                sys.stderr.write(f"{name}: the table under {marker} differs from its results file: run "
                                 "python benchmarks/readme_tables.py\n")
            stale += len(changed)
        elif changed:
            path.write_text(text)
            sys.stderr.write(f"{name}: {len(changed)} table(s) rewritten\n")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
