"""Text tower: the Hugging Face ``ModernBertModel``, masked mean pooling, MLP projection.

The HF class and its parameter names stay untouched (``text.transformer.*`` holds exactly a
``ModernBertModel`` state dict), so BioClinical-ModernBERT weights load as they ship.

Two paths compute the same embedding:

- **unpadded** (``text_unpad=True``, default): the batch's real tokens are packed into one sequence
  (1, T) with ``cu_seqlens``; embeddings, norms and MLPs see real tokens only, RoPE positions restart
  per caption, and attention stays inside each caption (and inside ModernBERT's sliding window on
  local layers). It goes through transformers' attention-function interface, by the backend that
  ``bmc_fast.model.attn_backend`` chooses: ``bmc_varlen_torch``, registered here (torch's ``varlen_attn``:
  FlashAttention-2 built into torch, or FA4 once activated; ``torch_flash`` / ``fa4``), HF's own
  ``flash_attention_2`` (flash-attn 2's ``flash_attn_varlen_func``; ``flash``), or ``bmc_varlen_sdpa``,
  registered here, which runs SDPA over groups of similar-length captions with a per-caption key mask
  and the same window (``sdpa`` / ``eager``, and every device but CUDA).
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


BUCKET_SLACK = 1.25  # a bucket's padded attention cost may exceed its real cost by this factor


def caption_buckets(lengths: list[int], slack: float = BUCKET_SLACK) -> list[list[int]]:
    """Group captions of similar length so each group runs as one padded SDPA call.

    Captions are taken longest first; a group closes when padding it to its longest member would cost
    more than ``slack`` × its real attention cost (Σ len²). Few calls, little padding.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
            group = buckets[-1]
            longest = lengths[group[0]]
            real = sum(lengths[j] ** 2 for j in group) + lengths[i] ** 2
            if (len(group) + 1) * longest ** 2 <= slack * real:
                group.append(i)
                continue
        buckets.append([i])
    return buckets


def varlen_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask, dropout: float = 0.0, scaling: float | None = None,
                          sliding_window: int | None = None, cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """Attention confined to each packed caption: q, k, v (1, heads, T, d) -> ((1, T, heads, d), None).

    Captions of similar length are gathered into padded groups (``caption_buckets``), one SDPA call per
    group with a key mask; every query sees exactly its own caption's keys, so the result equals
    caption-by-caption attention. ``sliding_window`` follows ModernBERT's attention module (half
    window + 1, flash-attn's inclusive convention): key j is visible from query i when |i − j| ≤ sliding_window − 1.
    The groups' index tensors are built once per forward (``_BucketPlan``, kept on ``cu_seq_lens_q``, which
    every layer receives): a layer costs one gather and one SDPA call per group and one reordering.
    """
    if cu_seq_lens_q is None:
        raise ValueError(f"{VARLEN_SDPA} attention needs cu_seq_lens_q (the packed captions' boundaries): call the "
                         "model through bmc_fast's TextTower, or set_attn_implementation('sdpa') on the HF model first")
    plan = getattr(cu_seq_lens_q, "_bmc_bucket_plan", None)
    if plan is None or plan.device != query.device:
        plan = _BucketPlan(cu_seq_lens_q, query.device)
        cu_seq_lens_q._bmc_bucket_plan = plan
    heads, d = query.shape[1], query.shape[3]
    outs = []  # (heads, n_group_tokens, d) per group, in the plan's order
    for group in plan.groups:
        if group.gather is None:  # one caption: a view, no copy
            q, k, v = (t[:, :, group.start:group.start + group.longest] for t in (query, key, value))
        else:  # (G, heads, Lg, d); padded positions hold a copy of token 0, masked as keys
            q, k, v = (t[0][:, group.gather].view(heads, group.size, group.longest, d).transpose(0, 1)
                       for t in (query, key, value))
        mask = group.mask(sliding_window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
        out = out.transpose(0, 1).reshape(heads, -1, d)  # (heads, G·Lg, d)
        outs.append(out if group.valid is None else out[:, group.valid])
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]  # (heads, T, d), captions in plan order
    if plan.restore is not None:
        out = out[:, plan.restore]  # back to packed order
    return out.transpose(0, 1).unsqueeze(0).contiguous(), None  # (1, T, heads, d)


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


class _Group:
    """One SDPA call of ``varlen_sdpa_attention``: captions padded to the longest of them."""

    def __init__(self, starts: list[int], lengths: list[int], members: list[int], device: torch.device):
        self.size, self.longest = len(members), lengths[members[0]]
        self.start = starts[members[0]]
        self._masks: dict[int | None, torch.Tensor | None] = {}
        self.pos = torch.arange(self.longest, device=device)
        if self.size == 1:
            self.gather = self.valid = self.key_valid = None
            return
        n = torch.tensor([lengths[i] for i in members], device=device)[:, None]  # (G, 1)
        start = torch.tensor([starts[i] for i in members], device=device)[:, None]
        self.key_valid = self.pos[None, :] < n  # (G, Lg)
        self.gather = torch.where(self.key_valid, start + self.pos[None, :], 0).reshape(-1)  # (G·Lg,) into T
        self.valid = self.key_valid.reshape(-1)  # which of the G·Lg outputs are real tokens

    def mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """(G, 1, Lg, Lg) or (Lg, Lg) boolean mask, None when every key is visible. A padded query row sees
        every key (its output is dropped): no row is fully masked, so no NaN reaches the backward."""
        if sliding_window not in self._masks:
            mask = None
            if self.key_valid is not None:
                mask = self.key_valid[:, None, None, :]  # (G, 1, 1, Lg)
            if sliding_window is not None and self.longest > sliding_window:
                window = (self.pos[:, None] - self.pos[None, :]).abs() <= sliding_window - 1  # (Lg, Lg)
                mask = window if mask is None else mask & window  # (G, 1, Lg, Lg)
            if mask is not None and self.key_valid is not None:
                mask = mask | ~self.key_valid[:, None, :, None]  # padded query rows see all
            self._masks[sliding_window] = mask
        return self._masks[sliding_window]


class _BucketPlan:
    """The groups of one packed batch and the permutation that puts their outputs back in packed order."""

    def __init__(self, cu_seq_lens: torch.Tensor, device: torch.device):
        bounds = cu_seq_lens.tolist()
        starts, lengths = bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        self.device = device
        buckets = caption_buckets(lengths)
        self.groups = [_Group(starts, lengths, members, device) for members in buckets]
        order = [i for members in buckets for i in members]
        if order == sorted(order):
            self.restore = None
        else:  # concatenated outputs hold caption order[0]'s tokens first, ...: invert that permutation
            concat = torch.cat([torch.arange(starts[i], starts[i] + lengths[i]) for i in order])
            self.restore = torch.empty_like(concat)
            self.restore[concat] = torch.arange(len(concat))
            self.restore = self.restore.to(device)


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
        packed = input_ids[keep].unsqueeze(0)  # (1, T) real tokens only
        positions = (keep.long().cumsum(dim=1) - 1)[keep].unsqueeze(0)  # (1, T) restart at 0 per caption
        cu_seqlens = F.pad(lengths.cumsum(dim=0), (1, 0)).to(torch.int32)  # (B + 1,)
        longest = int(lengths.max())
        real = packed.shape[1]
        extra = -real % self.pad_tokens_to
        if extra:  # one more "caption" of pad tokens, never pooled, to reach the FP8 row multiple
            pad_id = self.cfg.pad_token_id or 0
            packed = torch.cat([packed, packed.new_full((1, extra), pad_id)], dim=1)
            positions = torch.cat([positions, torch.arange(extra, device=positions.device)[None]], dim=1)
            cu_seqlens = torch.cat([cu_seqlens, cu_seqlens[-1:] + extra])
            longest = max(longest, extra)
        self._use_attention(self._varlen_attention(packed.device))
        hidden = self.transformer(
            input_ids=packed, position_ids=positions,
            attention_mask={"full_attention": None, "sliding_attention": None},  # packing replaces masks
            cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=longest, max_length_k=longest,
        ).last_hidden_state[0, :real]  # (T, H)
        caption = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)  # (T,)
        sums = torch.zeros(len(lengths), hidden.shape[-1], device=hidden.device, dtype=hidden.dtype)
        sums.index_add_(0, caption, hidden)
        self.last_token_counts = (packed.shape[1], real)
        return sums / lengths[:, None].to(hidden.dtype)

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
