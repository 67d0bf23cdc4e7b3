"""Every example of the README and docs/ runs as written, on small data, so none can break unnoticed.

The examples are the fenced ``bash`` and ``python`` blocks. They run in document order (the README's quick
start uses the demo's run, the evaluation page uses the quick start's) in a scratch copy of the repository
root: a directory of links to the repository's files, with ``../shared`` beside it, where their outputs
(``runs/``, ``shards/``, ``exports/`` ...) land. ``make demo`` runs its recipe with 42 steps a context, on a
tenth of the embedded data. A command that cannot run here (GPUs, several nodes, the real weights, the suite
itself, a benchmark of many minutes) is listed in ``NOT_HERE`` with the reason; each of those that runs a
program of ours is still checked against that program's ``--help``: every flag it passes must exist.
"""
from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bmc_fast.trainer.sample_audit import read_audit
from helpers import REPO

pytestmark = pytest.mark.slow

# Document order: later pages use what earlier ones made.
DOCUMENTS = ["README.md", "docs/install.md", "docs/training.md", "docs/data.md", "docs/models.md",
             "docs/evaluation.md", "docs/kernels.md", "docs/performance.md", "docs/cluster.md", "docs/gpu.md",
             "docs/development.md"]
# A command (or python block) holding one of these runs nowhere in the suite, for the reason given.
NOT_HERE = {
    "make test": "the suite itself",
    "pip install": "installs packages; tests/test_package.py checks the core install's dependencies instead",
    "paper_8k_8gpu.json": "8 GPUs and the real DFN-2B / BioClinical ModernBERT weights",
    "/models/dfn2b": "the real DFN-2B / BioClinical ModernBERT weights (not on these machines)",
    "--hostfile": "several nodes (tests/test_multinode.py runs two 'nodes' on one machine)",
    "sbatch": "a SLURM cluster (tests/test_multinode.py starts 2 tasks with the variables srun sets; "
              "tests/test_launchers.py checks the batch scripts)",
    "--suite": "5-10 minutes of benchmark cases here; the single case above runs",
    "run_all.py": "every benchmark, 13 minutes here; each benchmark has its own test or example",
    "bench_preemption.py": "three signalled 2-rank launches; tests/test_train_e2e.py's signal test asserts the same "
                           "bound on every run",
    "readme_tables.py": "rewrites the README and docs/ in place; tests/test_readme_tables.py runs its check",
}
# Whole commands (not parts of one) that run nowhere in the suite, for the reason given.
NOT_HERE_EXACT = {"make gpu-check": "needs a CUDA GPU; tests/test_gpu_check.py runs its refusal here, and the "
                                    "dry run above runs"}
# `make demo` runs this recipe (checked against the Makefile); here with 42 steps a context.
DEMO_RECIPE = "python -m bmc_fast.trainer.demo --out runs/demo"
SMALL = {"make demo": DEMO_RECIPE + " --max-steps 42"}  # the JSON warms up for 40
# The environment the examples' `.venv/` means, by its own path: a python run through the scratch root's link
# would see DeepSpeed's sources under another path than every other test's processes, and the JIT ops they
# share (TORCH_EXTENSIONS_DIR) would be rebuilt by g++ (~1 min of both cores) each time either side loads them.
VENV = Path(sys.prefix)
VENV_PATH = re.compile(r"(?<![\w./-])\.venv/")
FENCE = re.compile(r"^```(?P<lang>\w+)\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)


@dataclass
class Example:
    document: str
    line: int
    lang: str  # bash | python
    body: str

    def where(self) -> str:
        return f"{self.document}:{self.line}"


def examples() -> list[Example]:
    found = []
    for name in DOCUMENTS:
        text = (REPO / name).read_text()
        for match in FENCE.finditer(text):
            if match["lang"] in ("bash", "python"):
                found.append(Example(name, text[:match.start()].count("\n") + 1, match["lang"], match["body"]))
    return found


def commands(body: str) -> list[tuple[str, str]]:
    """(words, line) of each command of a bash block: continuation lines joined, blank and comment lines
    dropped. ``words`` is the command without its comment, to look up; ``line`` is what bash runs, so its
    quoting, brace expansion and comments are the shell's own."""
    lines = body.replace("\\\n", " ").splitlines()
    return [(shlex.join(words), line) for line in lines if (words := shlex.split(line, comments=True))]


def reason_not_here(text: str) -> str | None:
    if text in NOT_HERE_EXACT:
        return NOT_HERE_EXACT[text]
    return next((reason for key, reason in NOT_HERE.items() if key in text), None)


def test_every_page_is_listed_and_every_example_is_bash_or_python():
    assert sorted(DOCUMENTS) == sorted(["README.md", *(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))])
    for name in DOCUMENTS:
        langs = {m["lang"] for m in FENCE.finditer((REPO / name).read_text())}
        assert langs <= {"bash", "python"}, (name, langs)  # a `text` block would hide a command from this test


def test_make_demo_runs_the_recipe_the_test_shrinks():
    recipe = (REPO / "Makefile").read_text().split("\ndemo:", 1)[1].splitlines()[1].strip()
    assert recipe == "$(PY) -m " + DEMO_RECIPE.removeprefix("python -m "), recipe


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch repository root: links to the repository's entries (kernels/ included, as a user's root has
    it), ``.venv`` the running interpreter's environment, ``../shared`` the shared data."""
    top = tmp_path_factory.mktemp("docs")
    root = top / "main"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in (".git", ".venv", ".cache", "runs", ".pytest_cache") and not entry.name.endswith(
                ".egg-info"):
            (root / entry.name).symlink_to(entry)
    (root / ".venv").symlink_to(VENV)
    if (REPO.parent / "shared").is_dir():
        (top / "shared").symlink_to(REPO.parent / "shared")
    _small_embedded_data(top / "bmc_fast_cache")
    return root


def _small_embedded_data(cache: Path) -> None:
    """The embedded dataset where ``ensure_default_data`` looks for it (``$BMC_FAST_CACHE``), at 1/10 of its
    size: the demo trains 42 steps of 64 pairs, and evaluates on what it finds."""
    from bmc_fast.data.default_data import ensure_default_data

    ensure_default_data(seed=0, root=cache, n_train=1024, n_eval=64)


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{VENV / 'bin'}:{env['PATH']}"
    env["BMC_FAST_CACHE"] = str(root.parent / "bmc_fast_cache")  # the embedded data, small (_small_embedded_data)
    env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"  # nothing may come from the hub
    return env


@functools.cache
def _help_flags(program: tuple[str, ...], root: Path) -> set[str]:
    """The flags ``program --help`` lists (``program``: ``("-m", "bmc_fast.plan")`` or ``("X.py",)``)."""
    proc = subprocess.run([sys.executable, *program, "--help"], cwd=root, env=_env(root), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(re.findall(r"--[a-z][\w-]*", proc.stdout))


def _check_flags_exist(command: str, root: Path, where: str) -> None:
    """A command that cannot run here still names files that exist and flags its program has."""
    words = shlex.split(command, comments=True)
    missing = [w for w in words if re.fullmatch(r"(ds_configs|bmc_fast|benchmarks)/\S+", w)
               and not ((REPO / w).exists() or list(REPO.glob(w + ".*")))]  # a path, or the prefix of an --out
    assert not missing, f"{where}: {command!r} names {missing}, which do not exist"
    if not (words[0] == "deepspeed" or words[:2] == ["python", "-m"] or words[0] == "python"):
        return
    if words[0] == "deepspeed":  # the script's own flags, after the launcher's
        words = ["python", *words[next(i for i, w in enumerate(words) if w.endswith(".py")):]]
    known = _help_flags(tuple(words[1:3]) if words[1] == "-m" else (words[1],), root)
    unknown = [w.split("=")[0] for w in words if w.startswith("--") and w.split("=")[0] not in known]
    assert not unknown, f"{where}: {command!r} passes {unknown}, which its --help does not list"


def _run(script: str, lang: str, root: Path, where: str) -> None:
    argv = ["bash", "-euo", "pipefail", "-c", script] if lang == "bash" else [sys.executable, "-"]
    started = time.perf_counter()
    proc = subprocess.run(argv, input=None if lang == "bash" else script, cwd=root, env=_env(root),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{where} failed (exit {proc.returncode}):\n{script}\n{proc.stderr[-4000:]}"
    print(f"{where}: {time.perf_counter() - started:.1f} s")  # shown with pytest -rP: where the suite's time goes


def test_every_example_runs_in_order(workdir):
    ran, not_here, bodies = [], [], set()
    for example in examples():
        where = example.where()
        if example.lang == "python":
            if reason_not_here(example.body) or example.body in bodies:  # the drop-in is on two pages
                not_here.append(where)
                continue
            bodies.add(example.body)
            _run(example.body, "python", workdir, where)
            ran.append(where)
            continue
        runnable = []
        for words, line in commands(example.body):
            if reason_not_here(words):
                _check_flags_exist(words, workdir, where)
                not_here.append(f"{where} {words[:60]}")
            else:
                runnable.append(VENV_PATH.sub(f"{VENV}/", SMALL.get(words, line)))
        if runnable:
            _run("\n".join(runnable), "bash", workdir, where)
            ran.append(where)
    assert len(ran) >= 15, ran  # the README's demo and quick start, and the pages' commands
    # resumed on 2 ranks to step 44 (training.md), then on 1 rank to 46, auditing its samples (cluster.md)
    quickstart = workdir / "runs" / "quickstart"
    assert (quickstart / "checkpoints" / "latest").read_text().strip() == "step0000046"
    audit = read_audit(quickstart / "audit")
    assert list(audit) == [0] and list(audit[0]) == [45, 46]
    assert all(len(line["keys"]) == 64 for line in audit[0].values())  # the global batch of zero2.json
    assert (workdir / "exports" / "quickstart" / "open_clip_config.json").is_file()
