"""Packaging rules: install names, no shadowed top-level packages, the script entry point."""
import importlib.metadata
import importlib.util
import os
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
    import bmc_fast.kernels.contrastive

    assert bmc_fast.kernels.contrastive.__file__.startswith(str(REPO / "kernels"))
    assert bmc_fast.dali_pipelines.__file__.startswith(str(REPO / "dali_pipelines"))
    assert bmc_fast.kernels.FusedClipLoss.__module__ == "bmc_fast.kernels.modules"


def test_no_folder_at_the_root_is_a_package_an_installed_distribution_names():
    """`python -m` from the root puts the root first on sys.path: a regular package there named like an
    installed distribution's (Hugging Face's `kernels`, which transformers >= 5.25 imports) would win."""
    top_level = set(importlib.metadata.packages_distributions()) | ML_TOP_LEVEL | {"kernels"}
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {"bmc_fast", "dali_pipelines"} and not packages & (top_level - {"bmc_fast"}), packages


@pytest.mark.slow
def test_import_kernels_from_the_root_is_hugging_faces_package():
    """The clash as a user met it: transformers 5.25 imports `kernels` (CUDAProperties) from the root."""
    script = ("import kernels, transformers.integrations.hub_kernels as hub; "
              "print(kernels.__spec__.origin); print(hub.is_kernels_available())")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    origin, available = proc.stdout.split()
    from packaging.version import Version

    assert Version(importlib.metadata.version("transformers")) >= Version("5.25") and available == "True"
    installed = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    assert origin == str(installed) and not origin.startswith(str(REPO / "kernels")), origin


def _core_closure() -> set[str]:
    """Distributions ``pip install .`` pulls in (no extra), walked through the installed metadata."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = set(), ["bmc-fast"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in importlib.metadata.requires(name) or ():
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


def test_the_core_install_holds_no_trainer_stack():
    """`pip install .` is the library (losses, model, load_model); DeepSpeed, DALI and the loaders are the
    `train` extra. Checked on the installed metadata, offline (pip's own dry run needs the package index)."""
    closure = _core_closure()
    assert {"torch", "transformers", "safetensors", "tokenizers"} <= closure, closure
    heavy = {name for name in closure if name.startswith("nvidia-dali") or name in (
        "deepspeed", "webdataset", "torchdata", "open-clip-torch", "tensorboard", "matplotlib")}
    assert not heavy, heavy


# Every package of the extras made unimportable (None in sys.modules), as in an environment without them.
_WITHOUT_EXTRAS = """
import sys
for name in ("deepspeed", "webdataset", "torchdata", "nvidia.dali", "nvidia", "open_clip", "matplotlib",
             "tensorboard", "braceexpand"):
    sys.modules[name] = None
"""


@pytest.mark.slow
def test_fused_loss_and_load_model_run_without_the_extras(tmp_path, modernbert_tokenizer):
    """The drop-in loss (forward, backward against a float64 reference) and ``load_model`` of an export, with
    every package of the extras unimportable."""
    from bmc_fast.checkpoint.export import export
    from bmc_fast.model.clip import BMCLongCLIP
    from bmc_fast.model.config import load_model_config

    cfg = load_model_config("tiny").with_tokenizer(modernbert_tokenizer)
    out = export(BMCLongCLIP(cfg).eval(), modernbert_tokenizer, cfg, tmp_path / "export")
    script = _WITHOUT_EXTRAS + f"""
import torch
from bmc_fast.kernels import FusedClipLoss, clip_loss_ref
image, text = torch.randn(7, 16, requires_grad=True), torch.randn(7, 16, requires_grad=True)
scale = torch.tensor(2.5, requires_grad=True)
loss = FusedClipLoss()(image, text, scale)
loss.backward()
inputs64 = [t.detach().double().requires_grad_() for t in (image, text, scale)]
ref = clip_loss_ref(*inputs64)
ref.backward()
assert abs(loss.item() - ref.item()) < 1e-5, (loss.item(), ref.item())
for ours, theirs in zip((image, text, scale), inputs64):
    torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-6)
import bmc_fast
model, tokenizer, transform = bmc_fast.load_model({str(out)!r})
ids = tokenizer(["a caption"], padding="max_length", max_length=model.cfg.context_length, truncation=True,
                return_tensors="pt")
with torch.no_grad():
    print(model.encode_text(ids["input_ids"], ids["attention_mask"], normalize=True).norm().item())
print(sorted(m for m in sys.modules if m.split(".")[0] in ("deepspeed", "webdataset", "torchdata")
             and sys.modules[m] is not None))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    norm, loaded = proc.stdout.strip().splitlines()[-2:]
    assert float(norm) == pytest.approx(1.0) and loaded == "[]", proc.stdout


@pytest.mark.slow
def test_train_script_runs_as_a_script():
    proc = subprocess.run([sys.executable, str(REPO / "bmc_fast" / "train.py"), "--help"], capture_output=True,
                          text=True, cwd=REPO / "bmc_fast", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "--ds_config" in proc.stdout and "--context-length" in proc.stdout


def test_setup_never_lists_pypi_apex():
    text = (REPO / "setup.py").read_text()
    assert '"apex' not in text and "'apex" not in text


@pytest.mark.slow
def test_the_gpu_extra_installs_from_wheels_but_deepspeed():
    """pip's own resolution of ``.[gpu]`` for this Python (torch as the pins cap it): every distribution it would
    install is a wheel, but deepspeed's pure-Python source archive (built with DS_BUILD_OPS=0)."""
    import json

    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", "-", f"{REPO}[gpu]"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PIP_NO_INPUT": "1", "DS_BUILD_OPS": "0"})
    if proc.returncode != 0 and "NewConnectionError" in proc.stderr:  # no index at all; a missing version fails
        pytest.skip(f"the package index is not reachable from here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    install = json.loads(proc.stdout)["install"]
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in install}
    assert {"flash-attn-4", "nvidia-dali-cuda130", "deepspeed", "torch", "bmc-fast"} <= names, names
    sources = {item["metadata"]["name"] for item in install
               if not item["download_info"]["url"].endswith(".whl") and item["metadata"]["name"] != "bmc-fast"}
    assert sources == {"deepspeed"}, sources


def test_the_dockerfile_installs_what_the_extras_hold_beside_the_containers_builds():
    """The Dockerfile's package list (NGC PyTorch holds torch, torchvision, DALI and Transformer Engine) is the
    core install's and the train and eval extras' requirements, less what the container ships."""
    import re

    from packaging.requirements import Requirement

    text = (REPO / "Dockerfile").read_text()
    command = text.split("PIP_CONSTRAINT=/tmp/container-constraints.txt pip install --no-cache-dir", 1)[1]
    command = command.split("&&", 1)[0].replace("\\\n", " ")
    listed = {Requirement(word.strip('"')).name for word in command.split()}
    setup = {}
    exec(compile((REPO / "setup.py").read_text().split("class BuildPyWithKernels", 1)[0], "setup.py", "exec"), setup)
    wanted = {Requirement(r).name for r in [*setup["INSTALL_REQUIRES"], *setup["EXTRAS_REQUIRE"]["train"],
                                            *setup["EXTRAS_REQUIRE"]["eval"]]}
    shipped = {"torch", "torchvision", "pillow", "numpy", "packaging"}
    shipped |= {name for name in wanted if re.match("nvidia-dali", name)}
    assert listed == wanted - shipped, (listed ^ (wanted - shipped))
