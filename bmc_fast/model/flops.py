"""Analytic FLOPs of the two towers, from the config and the real token counts (nanoGPT's estimate_mfu idea).

Matrix products only (2 FLOPs per multiply-add), as ``torch.utils.flop_counter`` counts them; norms,
activations and softmax are left out. Per image, the ViT of ``n = grid² + 1`` tokens, width ``w``,
MLP width ``m``::

    patch embedding 2·grid²·3p²·w;  per layer 2n·w·3w (qkv) + 4n²·w (scores, values) + 2n·w² (out) + 4n·w·m
    projection 2·w·E (class token only)

Per caption of ℓ tokens, ModernBERT of width h and GeGLU width I::

    per layer 2ℓ·h·3h (Wqkv) + 4·h·K (scores, values) + 2ℓ·h² (Wo) + 2ℓ·h·2I + 2ℓ·I·h (MLP)
    projection 2h² + 2h·E (pooled vector)

K is the number of (query, key) pairs attended: ℓ² on global layers, the pairs with |i − j| ≤
local_attention/2 on local layers (what flash-attn's windowed kernel computes). ``padded_to=L``
gives the FLOPs a padded SDPA forward executes instead: every caption at length L, every layer L²
(a mask hides keys, it does not skip them). The backward costs twice the forward.
"""
from __future__ import annotations

from collections.abc import Iterable

from bmc_fast.model.config import ModelConfig, TextConfig, VisionConfig


def vision_forward_flops(cfg: VisionConfig, embed_dim: int) -> int:
    """Forward FLOPs of one image."""
    grid, w = cfg.grid_size, cfg.width
    n, m = grid * grid + 1, int(cfg.width * cfg.mlp_ratio)
    per_layer = 2 * n * w * 3 * w + 4 * n * n * w + 2 * n * w * w + 4 * n * w * m
    return 2 * grid * grid * 3 * cfg.patch_size ** 2 * w + cfg.layers * per_layer + 2 * w * embed_dim


def window_pairs(length: int, half_window: int) -> int:
    """Number of (i, j) in [0, length)² with |i − j| ≤ half_window."""
    d = min(half_window, length - 1)
    return length + 2 * (d * length - d * (d + 1) // 2)


def text_forward_flops(cfg: TextConfig, embed_dim: int, lengths: Iterable[int], padded_to: int | None = None) -> int:
    """Forward FLOPs of captions with ``lengths`` real tokens (or all at ``padded_to``, as padded SDPA runs)."""
    h, inner = cfg.hidden_size, cfg.intermediate_size
    total, captions = 0, 0
    for length in lengths:
        captions += 1
        ell = padded_to if padded_to is not None else int(length)
        for layer in range(cfg.num_hidden_layers):
            is_global = layer % cfg.global_attn_every_n_layers == 0
            pairs = ell * ell if is_global or padded_to is not None else window_pairs(ell, cfg.local_attention // 2)
            total += (2 * ell * h * 3 * h + 4 * h * pairs + 2 * ell * h * h + 2 * ell * h * 2 * inner
                      + 2 * ell * inner * h)
    return total + captions * (2 * h * h + 2 * h * embed_dim)


def train_step_flops(cfg: ModelConfig, n_images: int, lengths: Iterable[int], padded_to: int | None = None) -> int:
    """Forward + backward (3× forward) FLOPs of one step's towers; the loss is negligible beside them."""
    forward = n_images * vision_forward_flops(cfg.vision, cfg.embed_dim)
    forward += text_forward_flops(cfg.text, cfg.embed_dim, lengths, padded_to)
    return 3 * forward


# Dense bf16 peak FLOP/s per GPU, from the vendors' data sheets, for MFU. Unknown devices get no MFU.
# Checked in order: the PCIe and NVL H100s come before the SXM default.
PEAK_BF16_FLOPS = {"A100": 312e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                   "B200": 2250e12}


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None."""
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None
