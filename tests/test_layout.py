"""The house's import rules: library vs trainer, arrows that point down (model <- checkpoint <- eval <- trainer),
data before DALI, stand-alone kernels, a torch-free scan, the few top-level modules, and a model package that reads
no files when it builds a model."""
import ast
import builtins
import io
import os
import pathlib
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


# Arrows point down: model <- checkpoint <- eval <- trainer (imports inside functions count too).
def _library_files(under=""):
    return sorted((LIBRARY / under).rglob("*.py"))


@pytest.mark.parametrize("importers, forbidden", [
    ("eval", ["bmc_fast.checkpoint.export", "bmc_fast.export"]),  # evaluation never writes checkpoints
    ("checkpoint", ["bmc_fast.eval"]),
    ("model", ["bmc_fast.checkpoint", "bmc_fast.eval", "bmc_fast.trainer", "bmc_fast.data"]),
])
def test_arrows_point_down(importers, forbidden):
    files = _library_files(importers)
    assert files, importers
    wrong = {str(path.relative_to(REPO)): reached for path in files
             if (reached := [n for package in forbidden for n in _reaches(_imports(path), package)])}
    assert not wrong, wrong


# The only modules that may import evaluation: the trainer (its periodic eval, the demo), evaluation itself, and the
# training script. Everything else (model, checkpoint, data, export, kernels, DALI pipelines) stays below it.
EVAL_IMPORTERS = ("bmc_fast/trainer/", "bmc_fast/eval/", "bmc_fast/train.py")


def test_only_the_trainer_and_its_script_import_evaluation():
    files = [*_library_files(), *sorted((REPO / "dali_pipelines").glob("*.py")), *KERNELS]
    importers = sorted(str(path.relative_to(REPO)) for path in files if _reaches(_imports(path), "bmc_fast.eval"))
    assert importers, "no module imports bmc_fast.eval: the scan is broken"
    assert all(name.startswith(EVAL_IMPORTERS) for name in importers), importers


# A new top-level module of bmc_fast is a deliberate choice: add it here.
TOP_LEVEL_MODULES = {"__init__", "cli", "errors", "optional", "ds_json", "plan", "train", "export"}


def test_bmc_fast_has_only_its_few_top_level_modules():
    assert {path.stem for path in LIBRARY.glob("*.py")} <= TOP_LEVEL_MODULES


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


def _block_file_reads(monkeypatch):
    """Every way bmc-fast reads a file raises an AssertionError naming the path (undone at the test's end)."""
    import safetensors.torch
    import torch

    def refuse(name):
        def refused(*args, **kwargs):
            raise AssertionError(f"{name}({args[0] if args else kwargs!r}) read a file while a model was built")
        return refused

    for owner, name in [(builtins, "open"), (io, "open"), (os, "open"), (pathlib.Path, "open"),
                        (pathlib.Path, "read_text"), (pathlib.Path, "read_bytes"), (torch, "load"),
                        (safetensors.torch, "load_file")]:
        monkeypatch.setattr(owner, name, refuse(f"{getattr(owner, '__name__', owner)}.{name}"))


def test_building_a_model_reads_no_files(monkeypatch):
    """``BMCLongCLIP(cfg)`` of every preset (and of ``tiny`` on Transformer Engine layers) with every file read
    refused: weights come only through ``bmc_fast.model.weights``. The configs are read (and every module imported
    by one build of ``tiny``) first, since those read files. The big presets keep their widths, vocabulary aside,
    but build with 1 image block and 2 text layers (one global, one local): the full ViT-L + ModernBERT-base takes
    ~20 s of random init on a CPU, and depth changes nothing about what is read."""
    import dataclasses

    import reference_te

    from bmc_fast.model.clip import BMCLongCLIP
    from bmc_fast.model.config import PRESET_DIR, load_model_config

    text = {"vocab_size": 300, "pad_token_id": 0, "cls_token_id": 1, "sep_token_id": 2}
    presets = sorted(path.stem for path in PRESET_DIR.glob("*.json"))
    assert "tiny" in presets and len(presets) > 1, presets
    configs = {name: load_model_config(name, text=text) if name == "tiny" else
               load_model_config(name, vision={"layers": 1}, text={**text, "num_hidden_layers": 2})
               for name in presets}
    te_tiny = dataclasses.replace(configs["tiny"], te_precision="bf16")
    BMCLongCLIP(configs["tiny"])  # imports transformers' ModernBERT and the rest
    BMCLongCLIP(te_tiny, te_layers=reference_te.layers)

    _block_file_reads(monkeypatch)
    with pytest.raises(AssertionError, match="tiny.json"):  # the blocker blocks
        (PRESET_DIR / "tiny.json").read_text()
    with pytest.raises(AssertionError, match="tiny.json"):
        open(PRESET_DIR / "tiny.json")
    for cfg in configs.values():
        BMCLongCLIP(cfg)
    BMCLongCLIP(te_tiny, te_layers=reference_te.layers)
