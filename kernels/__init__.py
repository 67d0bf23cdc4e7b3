"""Fused contrastive losses for CLIP-style training, importable as ``bmc_fast.kernels``.

Depends on torch (and triton for the CUDA kernels) only, so it drops into any CLIP codebase::

    from bmc_fast.kernels import FusedClipLoss      # instead of open_clip.loss.ClipLoss
    loss_fn = FusedClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)

Layers: ``contrastive_triton`` / ``contrastive_torch`` (kernels and their tiled torch twin),
``contrastive`` (math, references, autograd, functional API), ``modules`` (open_clip-shaped modules).
"""
from .contrastive import BACKENDS, SINGLE_PROCESS, clip_loss, clip_loss_ref, siglip_loss, siglip_loss_ref
from .modules import FusedClipLoss, FusedSigLipLoss

__all__ = ["BACKENDS", "FusedClipLoss", "FusedSigLipLoss", "SINGLE_PROCESS", "clip_loss", "clip_loss_ref",
           "siglip_loss", "siglip_loss_ref"]
