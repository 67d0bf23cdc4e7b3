"""Which optional accelerator packages are importable, asked in one place and one way.

Each ``<package>_installed()`` looks the package up without importing it (no CUDA initialisation, no
import-time cost), so callers can choose a backend and log why; the code that uses a package imports
it where it runs and raises one ``ImportError`` saying what to install. ``bmc_fast.kernels`` keeps its
own triton check, because it imports nothing but torch and triton (it drops into other CLIP code).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util


def installed(module: str) -> bool:
    """Whether ``module`` (dotted names allowed) can be imported, without importing it."""
    parent, _, _ = module.rpartition(".")
    if parent and not installed(parent):  # find_spec("a.b") imports "a" and raises when it is absent
        return False
    return importlib.util.find_spec(module) is not None


def distribution_installed(name: str) -> bool:
    """Whether the distribution ``name`` (as pip names it) is installed, read from its metadata alone."""
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def dali_installed() -> bool:
    """NVIDIA DALI (``nvidia-dali-cuda*``): the DALI loader and the index scan's DALI decode check."""
    return installed("nvidia.dali")


def flash_attn_installed() -> bool:
    """flash-attn 2: ``flash_attn_func`` in the image tower, HF's ``flash_attention_2`` in the text tower.
    Asked by its distribution: flash-attn-4 alone also makes ``flash_attn`` importable (a namespace package)."""
    return distribution_installed("flash-attn")


def fa4_installed() -> bool:
    """flash-attn-4 (``flash_attn.cute``): the kernels torch switches to with activate_flash_attention_impl."""
    return distribution_installed("flash-attn-4")


def wandb_installed() -> bool:
    """Weights & Biases (``pip install wandb``): ``--report-to wandb``."""
    return installed("wandb")


def transformer_engine_installed() -> bool:
    """NVIDIA Transformer Engine (``transformer-engine[pytorch]``): ``te_precision`` bf16 / fp8."""
    return installed("transformer_engine")


def triton_installed() -> bool:
    """triton: the fused loss's CUDA kernels (``bmc_fast.kernels``, which asks for itself)."""
    return installed("triton")
