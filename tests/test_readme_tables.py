"""Every result table in the README and docs/ is a copy of its results file's table (benchmarks/readme_tables.py)."""
import importlib.util
import json

import pytest

from helpers import REPO

_spec = importlib.util.spec_from_file_location("readme_tables", REPO / "benchmarks" / "readme_tables.py")
readme_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_tables)

# The measured and computed tables of the README and docs/, each under its marker.
MARKED = {
    "README.md": {"context_ablation.md", "loss_cpu.md#2"},
    "docs/cluster.md": {"paper_gpus.md"},
    "docs/data.md": {"token_waste.md", "data_cpu.md", "data_cpu.md#2", "data_cpu.md#3"},
    "docs/evaluation.md": {"context_ablation.md#2"},
    "docs/gpu.md": {"gpu_*.md"},  # the latest make gpu-check, or none yet
    "docs/kernels.md": {"loss_cpu.md#2"},
    "docs/models.md": {"text_cpu.md"},
    "docs/performance.md": {"train_cpu.md", "train_malloc_cpu.md", "train_profile_before_cpu.md",
                            "train_profile_cpu.md"},
    "docs/training.md": {"plan_paper.md", "accumulation_cpu.md", "recipe_cpu.md"},
}


def _markers(text: str) -> set[str]:
    return {m["path"].removeprefix("benchmarks/results/") + (f"#{m['index']}" if m["index"] else "")
            for line in text.splitlines() if (m := readme_tables.MARKER.match(line))}


def test_every_table_of_the_readme_and_docs_equals_its_results_file():
    found = {}
    for path in readme_tables.documents():
        text = path.read_text()
        if markers := _markers(text):
            found[str(path.relative_to(REPO))] = markers
        _, changed = readme_tables.render(text)
        assert changed == [], f"{path.name}: tables differ from their results files: {changed}; run " \
                              "python benchmarks/readme_tables.py"
    assert found == MARKED


def test_no_results_table_is_copied_without_its_marker():
    """A table pasted by hand (no marker) would drift: every table whose header row is a results file's is marked."""
    headers = {table[0] for path in (REPO / "benchmarks" / "results").glob("*.md")
               for table in readme_tables.tables(path.read_text())}
    for path in readme_tables.documents():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() in headers and (i == 0 or not lines[i - 1].lstrip().startswith("| ")):
                assert readme_tables.MARKER.match(lines[i - 1]), f"{path.name}:{i + 1}: {line[:60]} has no marker"


def test_readme_tables_help_only_prints(tmp_path):
    import subprocess
    import sys

    before = {p: p.stat().st_mtime_ns for p in readme_tables.documents()}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "readme_tables.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage" in proc.stdout and "--check" in proc.stdout, proc.stderr
    assert before == {p: p.stat().st_mtime_ns for p in readme_tables.documents()}


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


def test_a_starred_marker_takes_the_newest_match_or_says_none_yet(tmp_path):
    """``gpu_*.md``: the latest make gpu-check's table, and a 'none yet' row while no GPU has run it."""
    import os

    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    doc = "<!-- results: benchmarks/results/gpu_*.md -->\n| old |\n"
    text, changed = readme_tables.render(doc, tmp_path)
    assert changed and text.splitlines()[1:] == readme_tables.NO_RESULT
    for name, row, mtime in (("gpu_a100.md", "| a100 |", 1), ("gpu_h200.md", "| h200 |", 2)):
        (results / name).write_text(f"Header.\n\n| gpu |\n|---|\n{row}\n")
        os.utime(results / name, (mtime, mtime))
    text, _ = readme_tables.render(doc, tmp_path)
    assert text.splitlines()[1:] == ["| gpu |", "|---|", "| h200 |"]


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
