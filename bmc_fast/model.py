"""BMC-LongCLIP: a CLIP ViT image tower and a ModernBERT text tower trained contrastively."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from bmc_fast.config import ModelConfig
from bmc_fast.text_tower import TextTower
from bmc_fast.vision_tower import VisionTransformer

_logger = logging.getLogger(__name__)


class BMCLongCLIP(nn.Module):
    """``forward(pixels, input_ids, attention_mask)`` -> (image (B, E), text (B, E), scale ()).

    Features come out L2-normalised; ``scale`` is ``exp(logit_scale)`` clamped to
    ``exp(max_logit_scale)`` (the clamp is in the forward, so it holds under every ZeRO stage).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        self.text = TextTower(cfg.text, cfg.embed_dim)
        # Shape (1,), not open_clip's (): DeepSpeed's parameter broadcast cannot view a 0-d tensor as bytes.
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(pixels)  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = False,
                    project: bool = True) -> torch.Tensor:
        _check_text_inputs(input_ids, attention_mask, self.cfg)
        features = self.text(input_ids, attention_mask, project=project)  # (B, E) or (B, H) unprojected
        return F.normalize(features, dim=-1) if normalize else features

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.cfg.max_logit_scale).exp().squeeze(0)  # ()

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        image = self.encode_image(pixels, normalize=True)
        text = self.encode_text(input_ids, attention_mask, normalize=True)
        return image, text, self.scale()


def _check_text_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: ModelConfig) -> None:
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be (batch, length); got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    if input_ids.shape[1] > cfg.context_length:
        raise ValueError(f"text of length {input_ids.shape[1]} exceeds context_length {cfg.context_length}: "
                         "tokenize with truncation to the model's context length")


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
