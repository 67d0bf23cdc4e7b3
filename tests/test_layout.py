"""The house's import rules: library vs trainer, data before DALI, stand-alone kernels, a torch-free scan."""
import ast
import subprocess
import sys

import pytest

from helpers import REPO

LIBRARY = REPO / "bmc_fast"


# The package ``bmc_fast.kernels`` is the top-level kernels/ folder plus its __init__ (setup.py's package_dir).
KERNELS = [*sorted((REPO / "kernels").glob("*.py")), LIBRARY / "_kernels" / "__init__.py"]


def _imports(path, module_level_only=False):
    """Absolute names each ``import`` / ``from ... import`` of ``path`` reaches (relative ones resolved)."""
    package = "bmc_fast.kernels" if path in KERNELS else \
        ".".join(("bmc_fast", *path.relative_to(LIBRARY).parent.parts)) if path.is_relative_to(LIBRARY) \
        else f"bmc_fast.{path.parent.name}"
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def _reaches(names, package):
    return sorted(n for n in names if n == package or n.startswith(package + "."))


def test_no_library_module_imports_the_trainer():
    for path in LIBRARY.rglob("*.py"):
        if "trainer" in path.relative_to(LIBRARY).parts or path.name == "train.py":
            continue
        assert not _reaches(_imports(path), "bmc_fast.trainer"), path


def test_data_layer_imports_dali_pipelines_only_inside_functions():
    for path in (LIBRARY / "data").rglob("*.py"):
        assert not _reaches(_imports(path, module_level_only=True), "bmc_fast.dali_pipelines"), path


def test_kernels_import_only_torch_triton_and_the_standard_library():
    allowed = {"torch", "triton", "__future__"} | set(sys.stdlib_module_names)
    for path in KERNELS:
        outside = {n.split(".")[0] for n in _imports(path)} - allowed - {"bmc_fast"}
        ours = [n for n in _reaches(_imports(path), "bmc_fast") if not n.startswith("bmc_fast.kernels")]
        assert not outside and not ours, (path, outside, ours)


@pytest.mark.slow
def test_the_index_cli_never_imports_torch_or_dali_pipelines_loaders(small_data):
    """``python -m bmc_fast.data.index`` (import and a real scan with DALI's decode check) stays torch-free."""
    script = f"""
import runpy, sys
sys.argv = ["index", {small_data["eval"]!r}]
runpy.run_module("bmc_fast.data.index", run_name="__main__")
print(sorted(m for m in sys.modules if m.startswith(("torch", "bmc_fast.dali_pipelines", "webdataset"))))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "['bmc_fast.dali_pipelines', 'bmc_fast.dali_pipelines.augment', " \
        "'bmc_fast.dali_pipelines.decode_check']", proc.stdout


def test_importing_the_index_imports_neither_dali_pipelines_nor_torch():
    proc = subprocess.run([sys.executable, "-c", "import sys, bmc_fast.data.index; print(sorted(m for m in "
                           "sys.modules if m.startswith(('torch', 'bmc_fast.dali_pipelines', 'nvidia'))))"],
                          capture_output=True, text=True, timeout=120, cwd=REPO.parent)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
