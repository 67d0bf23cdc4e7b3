"""Pre-norm CLIP Vision Transformer with open_clip's parameter names.

Parameter names follow open_clip's ``VisionTransformer`` (``conv1``, ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``transformer.resblocks.{i}.{ln_1,attn,ln_2,mlp}``, ``ln_post``,
``proj``) so that ViT-L/14 checkpoints map onto it key for key (``bmc_fast.model.weights`` loads open_clip
and timm state dicts after the tower is built). Attention runs the backend ``bmc_fast.model.attn_backend``
chooses (``attn_backend``): SDPA restricted to its flash kernel (``torch_flash``, and ``fa4`` once FA4 is
activated in torch), flash-attn 2's ``flash_attn_func`` (``flash``), plain SDPA, or an eager softmax(QKᵀ/√d)V;
the choice is logged once.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from bmc_fast.model.attn_backend import resolve as resolve_attention
from bmc_fast.model.config import VisionConfig

_logger = logging.getLogger(__name__)


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError as error:
        raise ImportError("attn_backend='flash' needs flash-attn 2: pip install flash-attn --no-build-isolation "
                          "(a source build; CUDA, Ampere or newer), or use 'torch_flash'") from error
    return flash_attn_func


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI CLIP and DFN checkpoints."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class DropPath(nn.Module):
    """Stochastic depth (timm's ``DropPath``): in training, each sample's residual branch is dropped with
    probability ``p`` and kept ones are scaled by 1/(1 − p); the identity in eval. One ``bernoulli_`` draw of
    shape (B, 1, 1) per call, as timm draws it, so the same RNG stream drops the same samples."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (B, ...)
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s packed parameter names."""

    def __init__(self, width: int, heads: int, backend: str = "auto"):
        super().__init__()
        self.heads = heads
        self.backend = backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (b, n, 3d)
        return self.out_proj(attention_core(qkv, self.heads, self.backend))


def attention_core(qkv: torch.Tensor, heads: int, backend: str) -> torch.Tensor:
    """softmax(QKᵀ/√d)V of packed projections qkv (b, n, 3·width) -> (b, n, width), by ``backend``."""
    b, n, three_d = qkv.shape
    d = three_d // 3
    qkv = qkv.view(b, n, 3, heads, d // heads)
    backend = resolve_attention(backend, qkv.device, qkv.dtype, "image tower")
    if backend == "flash":
        out = _flash_attn_func()(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # (b, n, h, d/h)
    else:
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 × (b, h, n, d/h)
        if backend in ("torch_flash", "fa4"):  # the flash kernel or an error, never a silent other kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v)
        elif backend == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # eager
            weights = torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1, dtype=torch.float32)
            out = weights.to(v.dtype) @ v
        out = out.transpose(1, 2)  # (b, n, h, d/h)
    return out.reshape(b, n, d)


class ResidualAttentionBlock(nn.Module):
    """x + drop(attn(ln_1(x))), then x + drop(mlp(ln_2(x))); ``drop_path``: this block's stochastic-depth rate."""

    def __init__(self, cfg: VisionConfig, attn_backend: str = "auto", drop_path: float = 0.0):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        act = QuickGELU() if cfg.act == "quick_gelu" else nn.GELU()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = SelfAttention(cfg.width, cfg.heads, attn_backend)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(cfg.width, hidden)),
            ("gelu", act),
            ("c_proj", nn.Linear(hidden, cfg.width)),
        ]))
        self.drop_path = DropPath(drop_path)  # no parameters: the state dict keeps open_clip's keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.ln_1(x)))
        return x + self.drop_path(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """``cfg.layers`` blocks of class ``block`` (``ResidualAttentionBlock``, or Transformer Engine's
    ``te_layers.TEResidualAttentionBlock``: both are built as ``block(cfg, attn_backend, drop_path)``), block i
    with drop-path rate ``cfg.drop_path_rates()[i]``."""

    def __init__(self, cfg: VisionConfig, attn_backend: str = "auto",
                 block: Callable[[VisionConfig, str, float], nn.Module] = ResidualAttentionBlock):
        super().__init__()
        self.grad_checkpointing = cfg.grad_checkpointing
        if cfg.grad_checkpointing:
            _logger.info("image tower: activation checkpointing on (%d blocks recomputed in backward)", cfg.layers)
        if cfg.drop_path:
            _logger.info("image tower: drop-path %.3g at the last block, ramped from 0 over %d blocks", cfg.drop_path,
                         cfg.layers)
        self.resblocks = nn.ModuleList(block(cfg, attn_backend, rate) for rate in cfg.drop_path_rates())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class VisionTransformer(nn.Module):
    """Image (B, 3, H, W) -> embedding (B, output_dim) via the class token."""

    def __init__(self, cfg: VisionConfig, output_dim: int, attn_backend: str = "auto",
                 block: Callable[[VisionConfig, str, float], nn.Module] = ResidualAttentionBlock):
        super().__init__()
        self.cfg = cfg
        scale = cfg.width ** -0.5
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid_size ** 2 + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.transformer = Transformer(cfg, attn_backend, block)
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, output_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.cfg.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"pixels must have shape (batch, 3, {size}, {size}), got {tuple(pixels.shape)}")
        x = self.conv1(pixels)  # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid², width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + grid², width)
        x = self.transformer(self.ln_pre(x))
        pooled = self.ln_post(x[:, 0])  # (B, width)
        return pooled @ self.proj  # (B, output_dim)
