"""The optimizer's parameter groups, in the order DeepSpeed's engine receives them."""
from __future__ import annotations

import torch
from torch import nn


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip's rule: no decay for gains, biases, embeddings' 1-D tensors and the logit scale."""
    return param.ndim < 2 or "bias" in name or "norm" in name or "ln_" in name or "logit_scale" in name


def param_groups(model: nn.Module) -> list[dict]:
    """Two optimizer groups: the optimizer's own weight decay (from the DeepSpeed JSON), and none."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
