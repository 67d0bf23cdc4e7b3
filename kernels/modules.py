"""``nn.Module`` front ends with open_clip's loss signatures: swap ``ClipLoss`` for ``FusedClipLoss``.

    # open_clip/src/open_clip/factory.py, create_loss():
    return FusedClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                         cache_labels=True, rank=args.rank, world_size=args.world_size)
"""
from __future__ import annotations

import torch
from torch import nn

from .contrastive import SINGLE_PROCESS, Backend, clip_loss, siglip_loss


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

    ``cache_labels`` is accepted and has no effect (no label tensor exists). Horovod is not supported.
    ``backend`` and ``process_group`` are the extras of ``bmc_fast.kernels.clip_loss``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: Backend = "auto",
                 process_group=None):
        super().__init__()
        if use_horovod:
            raise ValueError("FusedClipLoss: use_horovod=True is not supported; run with torch.distributed "
                             "(torchrun / deepspeed) or keep open_clip's ClipLoss for Horovod")
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
    """open_clip ``SigLipLoss`` with the fused kernels; every ``dist_impl`` gives the same result."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 *, backend: Backend = "auto", process_group=None):
        super().__init__()
        if dist_impl not in (None, "bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be None, 'bidir', 'shift', 'reduce' or 'gather', got {dist_impl!r}")
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

