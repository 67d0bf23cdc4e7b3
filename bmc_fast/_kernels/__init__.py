"""Fused contrastive losses for CLIP-style training, importable as ``bmc_fast.kernels``.

Depends on torch (and triton for the CUDA kernels) only, so it drops into any CLIP codebase::

    from bmc_fast.kernels import FusedClipLoss      # instead of open_clip.loss.ClipLoss
    loss_fn = FusedClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)

Layers: ``contrastive_triton`` / ``contrastive_torch`` (kernels and their tiled torch twin),
``contrastive`` (math, references, autograd, functional API), ``modules`` (open_clip-shaped modules).

Where the files are: the modules live in the repository's top-level ``kernels/`` folder (the design card's
layout), which has no ``__init__.py``, so it is never a regular package named ``kernels``: from the
repository root (``python -m`` puts it first on ``sys.path``) ``import kernels`` still finds Hugging Face's
``kernels`` package, which transformers >= 5.25 imports. This file is the package's ``__init__``:
``setup.py`` maps it to ``bmc_fast.kernels``; a wheel holds the folder's modules beside it, and in a source
checkout (``pip install -e .``, where this file is ``bmc_fast/_kernels/__init__.py``) the folder joins
``__path__``.
"""
from pathlib import Path as _Path

if _Path(__file__).parent.name == "_kernels":  # a source checkout: the modules are in <repo>/kernels
    __path__.append(str(_Path(__file__).resolve().parents[2] / "kernels"))

from .contrastive import BACKENDS, SINGLE_PROCESS, clip_loss, clip_loss_ref, siglip_loss, siglip_loss_ref
from .modules import FusedClipLoss, FusedSigLipLoss

__all__ = ["BACKENDS", "FusedClipLoss", "FusedSigLipLoss", "SINGLE_PROCESS", "clip_loss", "clip_loss_ref",
           "siglip_loss", "siglip_loss_ref"]
