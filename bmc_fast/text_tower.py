"""Text tower: the Hugging Face ``ModernBertModel``, masked mean pooling, MLP projection.

The HF class and its parameter names stay untouched (``text.transformer.*`` holds exactly a
``ModernBertModel`` state dict), so BioClinical-ModernBERT weights load as they ship.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from bmc_fast.config import TextConfig

_logger = logging.getLogger(__name__)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, L, H) over positions where ``attention_mask`` (B, L) is 1 -> (B, H)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class TextTower(nn.Module):
    """Token ids (B, L) + attention mask (B, L) -> embedding (B, output_dim)."""

    def __init__(self, cfg: TextConfig, output_dim: int, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers import ModernBertConfig, ModernBertModel

        hf_config = ModernBertConfig(**cfg.to_hf_kwargs(), attn_implementation=attn_implementation)
        self.cfg = cfg
        self.transformer = ModernBertModel(hf_config)
        _logger.info("text tower: ModernBertModel, %d layers (%s), attention=%s", cfg.num_hidden_layers,
                     ",".join("g" if t == "full_attention" else "l" for t in hf_config.layer_types),
                     self.transformer.config._attn_implementation)
        width = cfg.hidden_size
        # open_clip's "mlp" text projection (bias-free), hidden -> hidden -> embed as in BMC-LongCLIP.
        self.proj = nn.Sequential(
            nn.Linear(width, width, bias=False),
            nn.GELU(),
            nn.Linear(width, output_dim, bias=False),
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, project: bool = True) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        pooled = masked_mean(hidden, attention_mask)  # (B, H)
        return self.proj(pooled) if project else pooled
