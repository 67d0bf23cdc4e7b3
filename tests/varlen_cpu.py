"""CPU kernels for the ops torch's ``varlen_attn`` dispatches to, so its plumbing runs here.

On CUDA, ``torch_attn::_varlen_attn`` and ``torch_attn::_varlen_attn_backward`` call FlashAttention-2 (or
cuDNN, or FA4 once activated); on CPU they raise. These stand-ins take the ops' own signatures and compute
each caption's attention in float64 with flash-attn's window convention (key j visible from query i when
i − left ≤ j ≤ i + right, −1 meaning no limit), the backward written out in the same float64 maths.
Everything above the ops (``varlen_attn``'s argument handling, its autograd function, our HF attention
function and the packed text tower) then runs for real.
"""
from __future__ import annotations

import functools

import torch


def _probabilities(q, k, scale, window_size):
    """Softmax of one sequence's masked scores, q, k (H, L, D) float64 -> P (H, L, L), lse (H, L)."""
    left, right = window_size if window_size is not None else (-1, -1)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)  # (H, L, L)
    pos = torch.arange(q.shape[1])
    offset = pos[None, :] - pos[:, None]  # key − query
    visible = torch.ones_like(offset, dtype=torch.bool)
    if left >= 0:
        visible &= offset >= -left
    if right >= 0:
        visible &= offset <= right
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1), torch.logsumexp(scores, dim=-1)


def _sequences(cu_seq_q, *tensors):
    """Each packed sequence of ``tensors`` (T, H, D) as float64 (H, L, D)."""
    bounds = cu_seq_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        yield tuple(t[start:end].double().transpose(0, 1) for t in tensors)


def _attend(query, key, value, cu_seq_q, scale, window_size):
    """float64 attention of each packed sequence: (T, H, D) -> out (T, H, D), lse (H, T)."""
    outs, lses = [], []
    for q, k, v in _sequences(cu_seq_q, query, key, value):
        probs, lse = _probabilities(q, k, scale, window_size)
        outs.append((probs @ v).transpose(0, 1))  # (L, H, D)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)


def _forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None, window_size=None,
             enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert not is_causal and not enable_gqa and seqused_k is None and block_table is None
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
    lengths = cu_seq_q.diff()
    assert int(lengths.max()) <= max_q == max_k  # the kernel trusts max_q; a smaller one would be a bug
    out, lse = _attend(query, key, value, cu_seq_q, scale, window_size)
    return out.to(query.dtype), lse.float(), torch.zeros(2, dtype=torch.uint64)


def _backward(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, rng_state,
              scale=None, window_size=None):
    """dQ, dK, dV written out (a kernel runs below autograd): dV = PᵀdO, dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)),
    dQ = s·dS K, dK = s·dSᵀ Q."""
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    grads = ([], [], [])
    for q, k, v, d_out in _sequences(cu_seq_q, query, key, value, grad_out):
        probs, _ = _probabilities(q, k, scale, window_size)  # (H, L, L)
        d_probs = d_out @ v.transpose(-2, -1)
        d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))
        for grad, value_ in zip(grads, (d_scores @ k * scale, d_scores.transpose(-2, -1) @ q * scale,
                                        probs.transpose(-2, -1) @ d_out)):
            grad.append(value_.transpose(0, 1))  # (L, H, D)
    return tuple(torch.cat(g).to(t.dtype) for g, t in zip(grads, (query, key, value)))


@functools.cache
def register() -> None:
    """Register the stand-ins for CPU tensors, once per process (CUDA keeps torch's own kernels)."""
    import torch.nn.attention.varlen  # defines the ops

    torch.library.register_kernel("torch_attn::_varlen_attn", "cpu", _forward)
    torch.library.register_kernel("torch_attn::_varlen_attn_backward", "cpu", _backward)


def reference(query, key, value, cu_seqlens, window_size=(-1, -1)):
    """The same float64 maths, for tests to compare with: (T, H, D) -> (T, H, D) float64."""
    return _attend(query, key, value, cu_seqlens, None, window_size)[0]
