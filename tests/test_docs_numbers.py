"""Every measured number in the prose of the README and docs/ names its results file, and is in it.

A number with a unit of measurement (×, %, s, ms, MiB, GiB) in a paragraph (code and tables aside: the
tables are copies, tests/test_readme_tables.py) must be one of the values, at the paragraph's precision, of
the ``benchmarks/results/*`` files that paragraph names. ``NOT_MEASURED`` lists the few that are settings or
definitions, not measurements.
"""
import re

import pytest

from helpers import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# A ratio is "1.42×" (not the product "8×80 GB" or "4 × micro"); the other units may follow a space.
MEASURED = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)(?:×(?!\w)|\s?(%|ms\b|s\b|MiB\b|GiB\b))")
RESULTS = re.compile(r"(?:benchmarks/results/)?([\w-]+\.(?:md|json))")
NOT_MEASURED = {
    "20%": "the planner's error, a setting (bmc_fast.plan.PLANNER_ERROR), held by tests/test_plan.py",
    "24 GiB": "this machine's memory",
    "25%": "the unpadded text path's padding bound, a setting",
    "33.3%": "chance with 3 choices",
    "0.5%": "chance with 200 pairs",
    "50 MiB": "the GPU wheelhouse's size limit, a setting (gpu_wheelhouse.LIMIT_BYTES; tests/test_gpu_check.py)",
}


def paragraphs(text: str) -> list[str]:
    """Prose paragraphs: blank-line separated, fenced code and table rows left out."""
    prose, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        prose.append("" if fenced or line.startswith("```") or line.lstrip().startswith("|") else line)
    return [p for p in "\n".join(prose).split("\n\n") if p.strip()]


def _values(path) -> list[str]:
    return re.findall(r"\d[\d,]*(?:\.\d+)?", path.read_text())


def _matches(number: str, values: list[str]) -> bool:
    """``number`` as written (its decimals) is one of ``values`` rounded to the same decimals."""
    decimals = len(number.partition(".")[2])
    target = float(number.replace(",", ""))
    return any(round(float(v.replace(",", "")), decimals) == target for v in values)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_measured_numbers_name_their_results_file_and_are_in_it(document):
    problems = []
    for paragraph in paragraphs(document.read_text()):
        numbers = [f"{m[1]}{' ' if m[2] in ('s', 'ms', 'MiB', 'GiB') else ''}{m[2] or '×'}"
                   for m in MEASURED.finditer(paragraph)]
        numbers = [n for n in numbers if n not in NOT_MEASURED]
        if not numbers:
            continue
        files = [REPO / "benchmarks" / "results" / name for name in RESULTS.findall(paragraph)]
        values = [v for f in files if f.is_file() for v in _values(f)]
        for number in numbers:
            if not _matches(re.match(r"[\d,.]+", number)[0], values):
                problems.append(f"{number!r} in: {paragraph.strip()[:100]}...")
    assert not problems, "\n".join(problems)


def test_the_check_tells_ratios_from_products_and_rounds_to_the_prose():
    text = "A 0.80× ratio (`loss_cpu.md`), 8×80 GB, K = 4 × micro 2, 12 s.\n\n```bash\necho 9×\n```\n| 5× |\n"
    assert [m.group(0) for p in paragraphs(text) for m in MEASURED.finditer(p)] == ["0.80×", "12 s"]
    values = _values(REPO / "benchmarks" / "results" / "loss_cpu.md")
    assert _matches("0.80", values) and _matches("198", values)  # 197.692 s, written as 198 s
    assert not _matches("123.456", values) and not _matches("7.7", [])
