"""Text tower: the Hugging Face ``ModernBertModel``, masked mean pooling, MLP projection.

The HF class and its parameter names stay untouched (``text.transformer.*`` holds exactly a
``ModernBertModel`` state dict), so BioClinical-ModernBERT weights load as they ship.

Two paths compute the same embedding:

- **unpadded** (``text_unpad=True``, default): the batch's captions are laid out as one sequence (1, T')
  without padding to the context (``bmc_fast.model.caption_layout``); RoPE positions restart per caption,
  attention stays inside each caption (and inside ModernBERT's sliding window on local layers), and the
  mean pools real tokens only. It goes through transformers' attention-function interface, by the backend
  that ``bmc_fast.model.attn_backend`` chooses: ``bmc_varlen_torch``, registered here (torch's ``varlen_attn``:
  FlashAttention-2 built into torch, or FA4 once activated; ``torch_flash`` / ``fa4``) and HF's own
  ``flash_attention_2`` (flash-attn 2's ``flash_attn_varlen_func``; ``flash``) on the real tokens packed back
  to back (T' = T); or ``bmc_varlen_sdpa``, registered here, one SDPA call per group of similar-length
  captions padded to the group's longest, a view of the sequence (``sdpa`` / ``eager``, and every device but
  CUDA; T' exceeds T by the groups' few pad tokens).
- **padded**: HF's own forward on (B, L) with the attention mask: ``eager``, HF's ``flash_attention_2``
  for ``flash``, SDPA otherwise (a padding mask rules out the flash kernels of torch and FA4).
"""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from bmc_fast.model.attn_backend import attention_support, why_not
from bmc_fast.model.attn_backend import resolve as resolve_attention
from bmc_fast.model.caption_layout import GroupedCaptions, PackedCaptions
from bmc_fast.model.config import TextConfig

if TYPE_CHECKING:
    from bmc_fast.model.te_layers import TELayers

_logger = logging.getLogger(__name__)

VARLEN_SDPA = "bmc_varlen_sdpa"
VARLEN_TORCH = "bmc_varlen_torch"
HALF = (torch.float16, torch.bfloat16)
_PADDED_ATTENTION = {"auto": "sdpa", "sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2",
                     "torch_flash": "sdpa", "fa4": "sdpa"}
# The packed path's HF attention function for each backend bmc_fast.model.attn_backend may choose.
_VARLEN_ATTENTION = {"fa4": VARLEN_TORCH, "torch_flash": VARLEN_TORCH, "flash": "flash_attention_2",
                     "sdpa": VARLEN_SDPA, "eager": VARLEN_SDPA}
def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, L, H) over positions where ``attention_mask`` (B, L) is 1 -> (B, H)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def varlen_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: GroupedCaptions, dropout: float = 0.0, scaling: float | None = None,
                          sliding_window: int | None = None, **kwargs):
    """Attention confined to each caption of a ``GroupedCaptions`` sequence: q, k, v (1, heads, T', d) ->
    ((1, T', heads, d), None).

    One SDPA call per group of similar-length captions, on a view of q, k, v (G, heads, Lg, d) with the group's
    key mask: every real query sees exactly its own caption's keys, so real positions equal caption-by-caption
    attention. ``sliding_window`` follows ModernBERT's attention module (half window + 1, flash-attn's
    inclusive convention): key j is visible from query i when |i − j| ≤ sliding_window − 1.
    """
    if not isinstance(attention_mask, GroupedCaptions):
        raise ValueError(f"{VARLEN_SDPA} attention needs the captions' GroupedCaptions layout as its attention mask, "
                         f"got {type(attention_mask).__name__}: call the model through bmc_fast's TextTower, or "
                         "set_attn_implementation('sdpa') on the HF model first")
    heads, d = query.shape[1], query.shape[3]
    outs = []  # (G·Lg, heads, d) per group, in sequence order
    for group in attention_mask.groups:
        q, k, v = (t[0, :, group.start:group.stop].unflatten(1, (group.size, group.longest)).transpose(0, 1)
                   for t in (query, key, value))  # (G, heads, Lg, d) views
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask(sliding_window), dropout_p=dropout,
                                             scale=scaling)
        outs.append(out.transpose(1, 2).reshape(-1, heads, d))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]  # (T', heads, d)
    return out.unsqueeze(0), None


def varlen_torch_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask, dropout: float = 0.0, scaling: float | None = None,
                           sliding_window: int | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                           max_length_q: int | None = None, **kwargs):
    """torch's ``varlen_attn`` on the packed captions: q, k, v (1, heads, T, d) -> ((1, T, heads, d), None).

    ModernBERT's ``sliding_window`` (half window + 1) becomes ``window_size=(w - 1, w - 1)``, as HF passes it
    to flash-attn: key j is visible from query i when |i − j| ≤ w − 1, the keys of ``bmc_varlen_sdpa``.
    """
    from torch.nn.attention.varlen import varlen_attn

    if cu_seq_lens_q is None or max_length_q is None:
        raise ValueError(f"{VARLEN_TORCH} attention needs cu_seq_lens_q and max_length_q (the packed captions): "
                         "call the model through bmc_fast's TextTower")
    if dropout:
        raise ValueError(f"varlen_attn has no attention dropout (got {dropout}): set the text config's "
                         "attention_dropout to 0, or use attn_backend='sdpa'")
    window = -1 if sliding_window is None else sliding_window - 1
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, d), last dim contiguous
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                      window_size=(window, window))  # (T, heads, d)
    return out.unsqueeze(0), None


def _skip_init(skip: bool):
    """transformers' context that builds a model without initialising its weights (buffers are still computed),
    or nothing."""
    if not skip:
        return contextlib.nullcontext()
    from transformers.initialization import no_init_weights

    return no_init_weights()


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionInterface.register(VARLEN_TORCH, varlen_torch_attention)


class TextTower(nn.Module):
    """Token ids (B, L) + attention mask (B, L) -> embedding (B, output_dim)."""

    def __init__(self, cfg: TextConfig, output_dim: int, unpad: bool = True, attn_backend: str = "auto",
                 te_layers: TELayers | None = None, weights_follow: bool = False):
        """``weights_follow``: the transformer's weights will be loaded after the build, so it is built without
        random init (transformers' ``no_init_weights``, as its ``from_pretrained`` does: ~6 s less for
        ModernBERT-base on a CPU) and leaves the global RNG where it was: the projection, and everything built
        after it, draw the same numbers whether or not text weights are loaded."""
        super().__init__()
        from transformers import ModernBertConfig, ModernBertModel

        _register_attention()
        self.cfg, self.unpad = cfg, unpad
        self.attn_backend = attn_backend
        self.padded_attention = _PADDED_ATTENTION[attn_backend]
        with torch.random.fork_rng(devices=[], enabled=weights_follow), _skip_init(weights_follow):
            self.transformer = ModernBertModel(ModernBertConfig(**cfg.to_hf_kwargs(), attn_implementation="sdpa"))
            if te_layers is not None:
                from bmc_fast.model.te_layers import convert_modernbert

                convert_modernbert(self.transformer, te_layers)
        if cfg.grad_checkpointing:
            self.transformer.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            _logger.info("text tower: activation checkpointing on (%d layers recomputed in backward)",
                         cfg.num_hidden_layers)
        self._attention = None  # the unpadded path's attention implementation, chosen at the first forward
        self.pad_tokens_to = 1  # FP8 GEMMs need row counts in multiples of 16 (32 for MXFP8): te_layers.use_fp8 sets it
        self.last_token_counts = (0, 0)  # (tokens computed, real tokens) of the last forward
        hf_config = self.transformer.config
        _logger.info("text tower: ModernBertModel, %d layers (%s), %s path", cfg.num_hidden_layers,
                     ",".join("g" if t == "full_attention" else "l" for t in hf_config.layer_types),
                     "unpadded (packed)" if unpad else f"padded ({self.padded_attention})")
        width = cfg.hidden_size
        # open_clip's "mlp" text projection (bias-free), hidden -> hidden -> embed as in BMC-LongCLIP.
        self.proj = nn.Sequential(
            nn.Linear(width, width, bias=False),
            nn.GELU(),
            nn.Linear(width, output_dim, bias=False),
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, project: bool = True) -> torch.Tensor:
        if self.unpad:
            pooled = self._pooled_unpadded(input_ids, attention_mask)
        else:
            self._use_attention(self.padded_attention)
            if input_ids.numel() % self.pad_tokens_to:
                raise ValueError(f"FP8 needs batch × length ({tuple(input_ids.shape)}) to be a multiple of "
                                 f"{self.pad_tokens_to}: pad captions to such a length, or use the unpadded path")
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
            pooled = masked_mean(hidden, attention_mask)  # (B, H)
            self.last_token_counts = (input_ids.numel(), int(attention_mask.sum()))
        return self.proj(pooled) if project else pooled

    def _pooled_unpadded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.bool()
        lengths = keep.sum(dim=1)  # (B,)
        if bool((lengths == 0).any()):
            raise ValueError("a caption has no tokens (attention_mask row of zeros); tokenize with [CLS]/[SEP]")
        attention = self._varlen_attention(input_ids.device)
        self._use_attention(attention)
        layout_class = GroupedCaptions if attention == VARLEN_SDPA else PackedCaptions
        layout = layout_class(lengths.tolist(), input_ids.device, self.pad_tokens_to)
        ids = layout.tokens(input_ids[keep], self.cfg.pad_token_id or 0)  # (T',)
        hidden = self.transformer(input_ids=ids[None], position_ids=layout.positions[None],
                                  **layout.attention_kwargs()).last_hidden_state[0]  # (T', H)
        self.last_token_counts = (layout.total, layout.real)
        return layout.pool(hidden, lengths)

    def _varlen_attention(self, device: torch.device) -> str:
        """The packed path's HF attention function, chosen for the activations' dtype: the weights', or
        autocast's where it is on (HF casts q, k, v to it before attention)."""
        dtype = self.transformer.get_input_embeddings().weight.dtype
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        if self._attention is None or self._attention[:2] != (device, dtype):
            backend = resolve_attention(self.attn_backend, device, dtype, "text tower (packed captions)")
            if self.attn_backend == "auto" and device.type == "cuda" and backend == "sdpa" and dtype in HALF:
                support = attention_support(device)
                _logger.warning("text tower: no flash kernel for the packed captions (%s), so SDPA over length "
                                "buckets runs (correct, slower)", why_not("torch_flash", dtype, support))
            self._attention = (device, dtype, _VARLEN_ATTENTION[backend])
        return self._attention[2]

    def _use_attention(self, name: str) -> None:
        if self.transformer.config._attn_implementation != name:
            self.transformer.set_attn_implementation(name)
