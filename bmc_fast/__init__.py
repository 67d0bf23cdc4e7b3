"""bmc-fast: long-context biomedical CLIP training.

``create_model`` (``bmc_fast.model.clip``: a BMC-LongCLIP from a preset, with optional tower weights) and
``load_model`` (``bmc_fast.checkpoint.load``: model, tokenizer and eval transform from an export or a run) are the
library's front door. They are the functions themselves, imported on first use (PEP 562), so ``import bmc_fast``
alone loads neither torch nor transformers (``python -m bmc_fast.data.index`` runs without them).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bmc_fast.checkpoint.load import load_model
    from bmc_fast.model.clip import create_model

__all__ = ["create_model", "load_model"]
_HOMES = {"create_model": "bmc_fast.model.clip", "load_model": "bmc_fast.checkpoint.load"}


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value  # the next lookup skips this function
        return value
    raise AttributeError(f"module 'bmc_fast' has no attribute {name!r}")
