"""How the text tower lays a batch's captions out as one sequence (1, T') for ModernBERT, without padding
each caption to the context.

Two layouts, chosen by the attention function that will run (``text_tower``):

- ``PackedCaptions``: the real tokens back to back (T' = T), caption boundaries in ``cu_seqlens``, for the
  varlen flash kernels (torch's ``varlen_attn``, flash-attn 2), which read each caption in place.
- ``GroupedCaptions``: captions of similar length in groups (``caption_buckets``), each group's captions
  padded to its longest and laid out row after row. SDPA takes one (G, Lg) batch per group, and that batch
  is a *view* of the sequence's q, k, v: no gather per layer (whose backward, an ``index_put_`` with
  accumulation, cost more than the attention on a CPU), at the price of the few pad tokens the grouping
  admits (``BUCKET_SLACK``), which the embeddings and MLPs also compute. Pad positions are masked as keys,
  their outputs never pooled.

Both append ``-T % multiple`` pad tokens as a last pseudo-caption when the token count must be a multiple
(FP8 GEMMs: 16 rows). Every position belongs to a caption (``caption_of``) or to none (index B), so the
tower pools with one ``index_add_`` in the batch's order. Built on the host from the caption lengths, once
per forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BUCKET_SLACK = 1.25  # a group's padded attention cost may exceed its real cost by this factor


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


class _Layout:
    """What both layouts give the tower: (T',) token ids, RoPE positions and pooling rows."""

    total: int  # T': positions in the sequence, real tokens and padding
    real: int  # T: real tokens
    positions: torch.Tensor  # (T',) int64: each token's position in its caption (its row, for padding)
    caption_of: torch.Tensor  # (T',) int64: the caption a position pools into, B for padding
    slots: torch.Tensor  # (T,) int64: where the real tokens go, in the order of ids[mask] (caption-major)

    def tokens(self, real_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
        """(T,) real token ids, caption by caption -> (T',) the sequence, padding filled with ``pad_id``."""
        ids = real_ids.new_full((self.total,), pad_id)
        ids[self.slots] = real_ids
        return ids

    def pool(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(T', H) -> the mean over each caption's real tokens (B, H)."""
        sums = hidden.new_zeros(len(lengths) + 1, hidden.shape[-1])
        sums.index_add_(0, self.caption_of, hidden)
        return sums[:-1] / lengths[:, None].to(hidden.dtype)


def _ranges(starts: list[int], counts: list[int]) -> torch.Tensor:
    """Concatenated ``arange(start, start + count)``: (Σ counts,) int64."""
    counts_t = torch.tensor(counts)
    offsets = torch.arange(int(counts_t.sum())) - torch.repeat_interleave(F.pad(counts_t.cumsum(0), (1, 0))[:-1],
                                                                          counts_t)
    return torch.repeat_interleave(torch.tensor(starts), counts_t) + offsets


class PackedCaptions(_Layout):
    """Real tokens back to back; ``cu_seqlens`` (n + 1,) int32 marks the captions (and the pad pseudo-caption)."""

    def __init__(self, lengths: list[int], device: torch.device, multiple: int = 1):
        self.real = sum(lengths)
        extra = -self.real % multiple
        self.total = self.real + extra
        spans = lengths + ([extra] if extra else [])
        self.cu_seqlens = F.pad(torch.tensor(spans).cumsum(0), (1, 0)).to(device, torch.int32)
        self.longest = max(spans)
        self.positions = _ranges([0] * len(spans), spans).to(device)
        self.caption_of = torch.repeat_interleave(torch.arange(len(spans)), torch.tensor(spans)).to(device)
        self.slots = torch.arange(self.real, device=device)

    def tokens(self, real_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
        return real_ids if self.total == self.real else super().tokens(real_ids, pad_id)

    def attention_kwargs(self) -> dict:
        """What HF's ModernBERT forward passes on to a varlen attention function."""
        return {"attention_mask": {"full_attention": None, "sliding_attention": None},  # packing replaces masks
                "cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.longest, "max_length_k": self.longest}


class GroupedCaptions(_Layout):
    """Groups of similar-length captions, each padded to its longest: group g holds ``size`` rows of
    ``longest`` positions from ``start``. It travels to the attention function as the layers' attention mask."""

    def __init__(self, lengths: list[int], device: torch.device, multiple: int = 1,
                 slack: float = BUCKET_SLACK):
        self.real = sum(lengths)
        self.groups: list[CaptionGroup] = []
        row_start = [0] * len(lengths)
        start = 0
        for members in caption_buckets(lengths, slack):
            self.groups.append(CaptionGroup(start, [lengths[i] for i in members], device))
            for row, i in enumerate(members):
                row_start[i] = start + row * self.groups[-1].longest
            start += self.groups[-1].stop - self.groups[-1].start
        extra = -start % multiple
        if extra:  # a pseudo-caption of padding, in a group of its own, pooled nowhere
            self.groups.append(CaptionGroup(start, [extra], device))
        self.total = start + extra
        self.slots = _ranges(row_start, lengths).to(device)
        self.positions = torch.cat([torch.arange(g.longest).repeat(g.size) for g in self.groups]).to(device)
        self.caption_of = torch.full((self.total,), len(lengths), dtype=torch.int64, device=device)
        self.caption_of[self.slots] = torch.repeat_interleave(torch.arange(len(lengths)),
                                                               torch.tensor(lengths)).to(device)

    def attention_kwargs(self) -> dict:
        return {"attention_mask": {"full_attention": self, "sliding_attention": self}}


class CaptionGroup:
    """One SDPA call: ``size`` captions padded to the longest of them, positions [start, stop) of the sequence."""

    def __init__(self, start: int, lengths: list[int], device: torch.device):
        self.size, self.longest = len(lengths), max(lengths)
        self.start, self.stop = start, start + self.size * self.longest
        self.pos = torch.arange(self.longest, device=device)
        self._masks: dict[int | None, torch.Tensor | None] = {}
        self.key_valid = None  # (G, Lg): which positions of each row are the caption's, None when all are
        if any(n < self.longest for n in lengths):
            self.key_valid = self.pos[None, :] < torch.tensor(lengths, device=device)[:, None]

    def mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """(G, 1, Lg, Lg), (G, 1, 1, Lg) or (Lg, Lg) boolean mask, None when every key is visible. A padded
        query row sees every key (its output is never pooled): no row is fully masked, so no NaN reaches the
        backward. ``sliding_window`` is ModernBERT's (half window + 1): key j is visible from query i when
        |i − j| ≤ sliding_window − 1."""
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
