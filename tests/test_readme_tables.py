"""Every result table in the README is a copy of its results file's table (benchmarks/readme_tables.py)."""
import importlib.util
import json

import pytest

from helpers import REPO

_spec = importlib.util.spec_from_file_location("readme_tables", REPO / "benchmarks" / "readme_tables.py")
readme_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_tables)

# The README's measured and computed tables, each under its marker.
MARKED = {"context_ablation.md", "paper_gpus.md", "loss_cpu.md#2", "data_cpu.md", "data_cpu.md#2", "text_cpu.md",
          "train_cpu.md", "train_malloc_cpu.md", "accumulation_cpu.md", "token_waste.md", "context_ablation.md#2"}


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


def test_every_results_file_records_the_machine_and_package_versions():
    """Issue 13: a number is only worth what is known about where it came from."""
    results = sorted((REPO / "benchmarks" / "results").glob("*.json"))
    assert len(results) >= 10
    missing = []
    for path in results:
        data = json.loads(path.read_text())
        machine = data.get("machine")
        versions = machine.get("versions") if isinstance(machine, dict) else data.get("versions")  # kernel_compile
        if not machine or not versions or "torch" not in versions or "triton" not in versions:
            missing.append(path.name)
    assert missing == [], f"results files without the machine and package versions: {missing}; regenerate them " \
                          "with their benchmark (benchmarks/run_all.py lists each one's arguments)"
