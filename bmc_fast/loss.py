"""Symmetric InfoNCE over negatives gathered from every rank.

Semantics of open_clip ``ClipLoss(local_loss=True, gather_with_grad=True)``: with local features
I, T (b, E) and gathered features I_all, T_all (N = b * world, E), rank r's loss is

    L_r = ( CE(s · I T_allᵀ, r·b + i) + CE(s · T I_allᵀ, r·b + i) ) / 2,   mean over its b rows.

The gather is differentiable (its backward sums each rank's gradient for every gathered row back to
the owner), so after DeepSpeed averages gradients over ranks every parameter holds the gradient of
mean_r L_r, which is exactly the loss of the global batch of N pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate ``x`` (b, E) from all ranks in rank order -> (world_size * b, E), differentiably."""
    if world_size == 1:
        return x
    import torch.distributed.nn

    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


class ContrastiveLoss(nn.Module):
    """``forward(image (b, E), text (b, E), scale ())`` -> scalar loss for this rank's b rows."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.rank = rank
        self.world_size = world_size

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if image.shape != text.shape or image.ndim != 2:
            raise ValueError(f"image and text features must both be (batch, dim); got {tuple(image.shape)} "
                             f"and {tuple(text.shape)}")
        dtype = torch.promote_types(image.dtype, torch.float32)  # bf16/fp16 towers: the softmax runs in fp32
        image, text = image.to(dtype), text.to(dtype)
        all_image = gather_with_grad(image, self.world_size)  # (N, E)
        all_text = gather_with_grad(text, self.world_size)  # (N, E)
        labels = torch.arange(image.shape[0], device=image.device) + self.rank * image.shape[0]
        logits_per_image = scale * image @ all_text.T  # (b, N)
        logits_per_text = scale * text @ all_image.T  # (b, N)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
