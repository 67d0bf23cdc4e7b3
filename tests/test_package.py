"""Packaging rules: install names, no shadowed top-level packages, the script entry point."""
import importlib.metadata
import importlib.util
import subprocess
import sys

import pytest

from helpers import REPO


def _modules_in(folder):
    return {p.stem for p in folder.iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}


# Top-level names of packages a CLIP training environment often has, installed here or not.
ML_TOP_LEVEL = {"accelerate", "apex", "datasets", "deepspeed", "einops", "evaluate", "flash_attn", "huggingface_hub",
                "lightning", "open_clip", "open_clip_train", "peft", "safetensors", "timm", "tokenizers", "torch",
                "transformer_engine", "transformers", "triton", "wandb", "webdataset", "xformers"}


def test_no_module_in_bmc_fast_shadows_a_top_level_package():
    """train.py runs as a script with bmc_fast/ first on sys.path: a `deepspeed.py` there would win."""
    top_level = set(sys.stdlib_module_names) | set(importlib.metadata.packages_distributions()) | ML_TOP_LEVEL
    assert not _modules_in(REPO / "bmc_fast") & top_level


def test_folders_install_under_bmc_fast_only():
    import bmc_fast.dali_pipelines
    import bmc_fast.kernels

    assert bmc_fast.kernels.__file__.startswith(str(REPO / "kernels"))
    assert bmc_fast.dali_pipelines.__file__.startswith(str(REPO / "dali_pipelines"))
    for name in ("kernels", "dali_pipelines"):  # never importable as top-level names from this repo
        spec = importlib.util.find_spec(name)
        assert spec is None or not str(spec.origin).startswith(str(REPO)), spec


@pytest.mark.slow
def test_train_script_runs_as_a_script():
    proc = subprocess.run([sys.executable, str(REPO / "bmc_fast" / "train.py"), "--help"], capture_output=True,
                          text=True, cwd=REPO / "bmc_fast", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "--ds_config" in proc.stdout and "--context-length" in proc.stdout


def test_setup_never_lists_pypi_apex():
    text = (REPO / "setup.py").read_text()
    assert '"apex' not in text and "'apex" not in text
