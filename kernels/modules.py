"""``nn.Module`` front ends with open_clip's loss signatures: swap ``ClipLoss`` for ``FusedClipLoss``.

    # open_clip/src/open_clip/factory.py, create_loss():
    return FusedClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                         cache_labels=True, rank=args.rank, world_size=args.world_size)
"""
from __future__ import annotations

import torch
from torch import nn

from .contrastive import BACKENDS, SINGLE_PROCESS, Backend, clip_loss, require_triton, siglip_loss


def _check_backend(cls: str, backend) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{cls}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        require_triton()


def _check_flag(cls: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{cls}: {name} must be True or False, got {value!r} ({type(value).__name__})")


def _check_world(rank: int, world_size: int, process_group) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")
    if world_size > 1:
        dist = torch.distributed
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(f"world_size={world_size} but torch.distributed is not initialised: call "
                             "init_process_group first, or pass world_size=1")
        actual = (dist.get_rank(process_group), dist.get_world_size(process_group))
        if actual != (rank, world_size):
            raise ValueError(f"rank/world_size ({rank}, {world_size}) disagree with the process group "
                             f"({actual[0]}, {actual[1]})")


class FusedClipLoss(nn.Module):
    """open_clip ``ClipLoss`` with the fused kernels: same arguments, same loss, same gradients.

    The loss is returned in fp32 for fp16/bf16 features (open_clip returns the features' dtype).
    Gradients equal open_clip's on every rank for any per-rank loss weights, except with
    ``local_loss=False, gather_with_grad=False`` (the default flags), where they match only when
    every rank backpropagates its loss with the same weight, as ``loss.backward()`` in training does.
    ``cache_labels`` is accepted and has no effect (no label tensor exists). Horovod is not supported.
    ``backend`` and ``process_group`` are the extras of ``bmc_fast.kernels.clip_loss``; ``backend``
    is checked here (``'triton'`` without triton installed raises ImportError).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: Backend = "auto",
                 process_group=None):
        super().__init__()
        if use_horovod:
            raise ValueError("FusedClipLoss: use_horovod=True is not supported; run with torch.distributed "
                             "(torchrun / deepspeed) or keep open_clip's ClipLoss for Horovod")
        _check_flag("FusedClipLoss", "local_loss", local_loss)
        _check_flag("FusedClipLoss", "gather_with_grad", gather_with_grad)
        _check_backend("FusedClipLoss", backend)
        _check_world(rank, world_size, process_group)
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size = rank, world_size
        self.backend, self.process_group = backend, process_group

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        loss = clip_loss(image_features, text_features, logit_scale, logit_bias,
                         process_group=self.process_group if self.world_size > 1 else SINGLE_PROCESS,
                         backend=self.backend, local_loss=self.local_loss,
                         gather_with_grad=self.gather_with_grad)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}, backend={self.backend!r}")


class FusedSigLipLoss(nn.Module):
    """open_clip ``SigLipLoss`` with the fused kernels; every ``dist_impl`` gives the same result.

    The loss is returned in fp32 for fp16/bf16 features.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 *, backend: Backend = "auto", process_group=None):
        super().__init__()
        if dist_impl not in (None, "bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be None, 'bidir', 'shift', 'reduce' or 'gather', got {dist_impl!r}")
        _check_backend("FusedSigLipLoss", backend)
        _check_world(rank, world_size, process_group)
        self.cache_labels, self.rank, self.world_size, self.dist_impl = cache_labels, rank, world_size, dist_impl
        self.backend, self.process_group = backend, process_group

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        group = self.process_group if self.world_size > 1 else SINGLE_PROCESS
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, process_group=group,
                           backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}"

