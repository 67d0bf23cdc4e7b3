"""Tiled torch twin of the fused contrastive kernels: the same algorithm, in (rows × cols) tiles.

Runs on CPU in training and is the GPU fallback without Triton. Each function matches its Triton
counterpart in ``contrastive_triton.py`` argument for argument; see ``contrastive.py`` for the math.
Logits exist one tile at a time, in a workspace allocated once per call (no per-tile allocation,
so no allocator churn); row statistics run online across column tiles, as in the kernels.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

# Bytes of the tile workspace one call reuses (3 planes in the forward, 2 in the backward).
DEFAULT_CHUNK_BYTES = 32 * 2**20
# Tiles keep at least this many rows: every tile reads its columns' features once, so fewer rows
# would make the tile GEMMs memory-bound (at N = 262,144 a 10-row tile reads 256 MiB per 10 rows).
MIN_TILE_ROWS = 256


def tile_shape(n_rows: int, n_cols: int, planes: int, chunk_bytes: int | None = None) -> tuple[int, int]:
    """(rows, cols) of a tile so that ``planes`` fp32 tiles fit in ``chunk_bytes``; full rows when they fit."""
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    per_row = planes * 4 * max(n_cols, 1)
    rows = max(1, min(n_rows, max(budget // per_row, MIN_TILE_ROWS)))
    cols = max(1, min(n_cols, budget // (planes * 4 * rows)))
    return rows, cols


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 (float64 references run the same code)."""
    return torch.promote_types(dtype, torch.float32)


def _tiles(n_rows: int, n_cols: int, planes: int, like: torch.Tensor, dtype: torch.dtype,
           chunk_bytes: int | None) -> Iterator[tuple[slice, slice, list[torch.Tensor]]]:
    """Row-major (row slice, column slice, [plane views (rows, cols)]) over one preallocated workspace."""
    tile_rows, tile_cols = tile_shape(n_rows, n_cols, planes, chunk_bytes)
    work = torch.empty(planes, tile_rows * tile_cols, device=like.device, dtype=dtype)
    for r0 in range(0, n_rows, tile_rows):
        rows = slice(r0, min(r0 + tile_rows, n_rows))
        for c0 in range(0, n_cols, tile_cols):
            cols = slice(c0, min(c0 + tile_cols, n_cols))
            shape = (rows.stop - rows.start, cols.stop - cols.start)
            yield rows, cols, [plane[: shape[0] * shape[1]].view(shape) for plane in work]


def _logits_into(x: torch.Tensor, s: torch.Tensor | None, a_rows: torch.Tensor, b_cols: torch.Tensor,
                 scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """X = a_rows b_colsᵀ into ``x``; S = scale·X + bias into ``s`` (into ``x`` when ``s`` is None)."""
    torch.mm(a_rows.to(b_cols.dtype), b_cols.T, out=x)
    if s is None:
        s = x.mul_(scale)
    else:
        torch.mul(x, scale, out=s)
    return s.add_(bias) if bias is not None else s


def _diagonal(rows: slice, cols: slice, offset: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile-local (row, col) indices of the positive pairs, column = row + offset."""
    r = torch.arange(rows.start, rows.stop, device=device)
    c = r + offset
    keep = (c >= cols.start) & (c < cols.stop)
    return (r - rows.start)[keep], (c - cols.start)[keep]


def _cast(dtype, *tensors):
    return [t.to(dtype) if t is not None else None for t in tensors]


def softmax_forward(image: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    chunk_bytes: int | None = None):
    """Row and column softmax statistics of S = scale·I Tᵀ + bias, I (b, D), T (N, D).

    Returns ``row_lse`` (b,), ``row_ex`` (b,) = Σ_j softmax_row(S)_ij X_ij, and this block's column
    partials ``col_max``, ``col_sum`` (N,) with Σ_i exp(S_ij − col_max_j), ``col_wx`` (N,) with
    Σ_i exp(S_ij − col_max_j) X_ij. All in the compute dtype (fp32, or fp64 for fp64 inputs).
    """
    b, n = image.shape[0], texts.shape[0]
    dtype = compute_dtype(image.dtype)
    new = dict(device=image.device, dtype=dtype)
    row_max, row_sum, row_wx = torch.full((b,), float("-inf"), **new), torch.zeros(b, **new), torch.zeros(b, **new)
    col_max, col_sum, col_wx = torch.full((n,), float("-inf"), **new), torch.zeros(n, **new), torch.zeros(n, **new)
    texts, scale, bias = _cast(dtype, texts, scale, bias)  # once, not per tile (no-ops for fp32)
    for rows, cols, (x, s, p) in _tiles(b, n, 3, image, dtype, chunk_bytes):
        _logits_into(x, s, image[rows], texts[cols], scale, bias)
        # Rows: online max / Σexp / Σexp·X across column tiles.
        new_max = torch.maximum(row_max[rows], s.amax(dim=1))
        keep = torch.exp(row_max[rows] - new_max).nan_to_num_(0.0)  # first tile: exp(-inf - m) = 0
        torch.sub(s, new_max[:, None], out=p).exp_()
        row_sum[rows] = row_sum[rows] * keep + p.sum(dim=1)
        row_wx[rows] = row_wx[rows] * keep + p.mul_(x).sum(dim=1)
        row_max[rows] = new_max
        # Columns: the same statistics across row tiles.
        new_max = torch.maximum(col_max[cols], s.amax(dim=0))
        keep = torch.exp(col_max[cols] - new_max).nan_to_num_(0.0)
        torch.sub(s, new_max[None, :], out=p).exp_()
        col_sum[cols] = col_sum[cols] * keep + p.sum(dim=0)
        col_wx[cols] = col_wx[cols] * keep + p.mul_(x).sum(dim=0)
        col_max[cols] = new_max
    return row_max + torch.log(row_sum), row_wx / row_sum, col_max, col_sum, col_wx


def sigmoid_forward(image: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    diag_offset: int, chunk_bytes: int | None = None):
    """Per-row sums of the sigmoid loss ℓ_ij = softplus(−z_ij S_ij), z = +1 on col = row + diag_offset.

    Returns ``row_loss`` (b,), ``row_ds`` (b,) = Σ_j ∂ℓ/∂S_ij X_ij and ``row_db`` (b,) = Σ_j ∂ℓ/∂S_ij.
    """
    b, n = image.shape[0], texts.shape[0]
    dtype = compute_dtype(image.dtype)
    out = torch.zeros(3, b, device=image.device, dtype=dtype)
    texts, scale, bias = _cast(dtype, texts, scale, bias)
    for rows, cols, (x, t, g) in _tiles(b, n, 3, image, dtype, chunk_bytes):
        _logits_into(x, t, image[rows], texts[cols], scale, bias)
        diag = _diagonal(rows, cols, diag_offset, image.device)
        t[diag] = -t[diag]  # t = −z·S (z = −1 off the diagonal): the softplus argument
        loss = torch.clamp(t, min=0, out=g).sum(dim=1)  # softplus(t) = max(t, 0) + log1p(exp(−|t|))
        out[0, rows] += loss + torch.abs(t, out=g).neg_().exp_().log1p_().sum(dim=1)
        t.sigmoid_()  # ∂ℓ/∂S = −z·σ(t): σ(t) off the diagonal (z = −1), −σ(t) on it
        t[diag] = -t[diag]
        out[2, rows] += t.sum(dim=1)
        out[1, rows] += t.mul_(x).sum(dim=1)
    return out[0], out[1], out[2]


def backward(a: torch.Tensor, b_mat: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, *,
             sigmoid: bool, a_lse: torch.Tensor | None, a_coef: torch.Tensor, b_lse: torch.Tensor | None,
             b_coef: torch.Tensor | None, diag_offset: int, diag_coef: torch.Tensor | None, want_b: bool = True,
             chunk_bytes: int | None = None):
    """Gradients of a loss over the block S = scale·A Bᵀ + bias (A: n_a × D, B: n_b × D).

    ∂L/∂S_ij is, for the softmax (CLIP) loss,
        a_coef_i·exp(S_ij − a_lse_i) + b_coef_j·exp(S_ij − b_lse_j) − [j = i + diag_offset]·diag_coef,
    and for the sigmoid loss  −a_coef·z_ij·σ(−z_ij S_ij)  (a_coef a scalar there).
    Returns (dA = scale·∂L/∂S B  (n_a, D),  dB = scale·(∂L/∂S)ᵀ A  (n_b, D) or None) in the compute dtype.
    """
    n_a, n_b = a.shape[0], b_mat.shape[0]
    dtype = compute_dtype(a.dtype)
    d_a = torch.zeros(n_a, a.shape[1], device=a.device, dtype=dtype)
    d_b = torch.zeros(n_b, a.shape[1], device=a.device, dtype=dtype) if want_b else None
    a_up, b_up, scale, bias = _cast(dtype, a, b_mat, scale, bias)
    for rows, cols, (s, ds) in _tiles(n_a, n_b, 2, a, dtype, chunk_bytes):
        _logits_into(s, None, a_up[rows], b_up[cols], scale, bias)  # S: (r, c)
        diag = _diagonal(rows, cols, diag_offset, a.device)
        if sigmoid:  # −coef·z·σ(−zS) = coef·σ(S) off the diagonal, −coef·σ(−S) on it
            s[diag] = -s[diag]
            ds = s.sigmoid_()
            ds[diag] = -ds[diag]
            ds.mul_(a_coef)
        else:
            torch.sub(s, a_lse[rows, None], out=ds).exp_().mul_(a_coef[rows, None])
            if b_coef is not None:
                ds.add_(s.sub_(b_lse[None, cols]).exp_().mul_(b_coef[None, cols]))
            ds[diag] -= diag_coef
        dx = ds.mul_(scale)  # (r, c) ∂L/∂X
        d_a[rows].addmm_(dx, b_up[cols])
        if want_b:
            d_b[cols].addmm_(dx.T, a_up[rows])
    return d_a, d_b
