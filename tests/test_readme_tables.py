"""Every result table in the README is a copy of its results file's table (benchmarks/readme_tables.py)."""
import importlib.util

import pytest

from helpers import REPO

_spec = importlib.util.spec_from_file_location("readme_tables", REPO / "benchmarks" / "readme_tables.py")
readme_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_tables)

# The README's measured and computed tables, each under its marker.
MARKED = {"context_ablation.md", "paper_gpus.md", "loss_cpu.md#2", "data_cpu.md", "data_cpu.md#2", "text_cpu.md",
          "train_cpu.md", "accumulation_cpu.md"}


def test_every_readme_table_equals_its_results_file():
    readme = (REPO / "README.md").read_text()
    markers = {m["path"].removeprefix("benchmarks/results/") + (f"#{m['index']}" if m["index"] else "")
               for line in readme.splitlines() if (m := readme_tables.MARKER.match(line))}
    assert markers == MARKED
    _, changed = readme_tables.render(readme)
    assert changed == [], f"README tables differ from their results files: {changed}; run " \
                          "python benchmarks/readme_tables.py"


def test_a_changed_cell_or_row_is_caught(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "x.md").write_text("Header.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nMore:\n\n| c |\n|---|\n| 3 |\n")
    readme = "Intro\n\n  <!-- results: benchmarks/results/x.md#2 -->\n  | c |\n  |---|\n  | 3 |\n\nEnd\n"
    assert readme_tables.render(readme, tmp_path) == (readme, [])
    stale = readme.replace("| 3 |", "| 4 |")
    text, changed = readme_tables.render(stale, tmp_path)
    assert changed == ["<!-- results: benchmarks/results/x.md#2 -->"] and text == readme
    assert readme_tables.render(readme.replace("  | 3 |\n", ""), tmp_path)[1]  # a missing row
    with pytest.raises(ValueError, match="has 2 table"):
        readme_tables.render(readme.replace("x.md#2", "x.md#3"), tmp_path)
    with pytest.raises(FileNotFoundError, match="y.md does not exist"):
        readme_tables.render(readme.replace("x.md", "y.md"), tmp_path)
