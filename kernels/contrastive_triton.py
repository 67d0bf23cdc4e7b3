"""Triton kernels for the fused contrastive losses (forward statistics and feature gradients).

The math (losses, ∂L/∂S, the per-rank decomposition), the cost in GEMMs and communication, and the
references (open_clip ``loss.py``, Inf-CL, flash-attention) are in ``contrastive.py``; this file only
tiles it. Two kernels serve both losses (``SIGMOID`` selects SigLIP's, else CLIP's softmax):

- ``_forward_kernel``: program g owns a group of row tiles of S = s·A Bᵀ + bias (A: local images,
  B: gathered texts). For each (row tile, column tile) it forms the logit tile from ``BLOCK_K``-wide
  slices of A and B (fp32 accumulation), keeps the rows' online max / Σexp / Σexp·X (softmax) or
  Σloss / Σ∂ℓ/∂S·X / Σ∂ℓ/∂S (sigmoid), and merges the tile's column max / Σexp / Σexp·X into the
  group's own partial-column buffer (read-modify-write; no other program touches it, so no atomics).
- ``_backward_kernel``: program p owns a row tile of A and accumulates out[rows] = Σ_cols
  s·∂L/∂S(rows, cols) · B[cols], recomputing each logit tile. Called twice per backward (dA with
  A = images, B = texts; dB with the roles swapped), so the backward is two logit recomputations
  plus the two gradient products, deterministic and atomic-free.

Memory (A: n_a × D, B: n_b × D; fp32 = 4 bytes). No n_a × n_b matrix exists: logit tiles live in
registers only. Softmax forward: 12·n_a bytes of row statistics (3 fp32 planes) plus 12·G·n_b bytes
of partial columns, G = min(⌈n_a/64⌉, ``max_groups`` = 256), plus 8·G·n_b bytes of temporaries
while the launcher merges the groups, so O(n_a + n_b); e.g. n_a = 16,384 local
rows against n_b = 262,144 gathered texts use G = 256 and 12·256·262,144 B = 768 MiB of partial
columns (a smaller ``max_groups`` trades parallelism for memory). Sigmoid forward: 12·n_a bytes.
Backward: the fp32 gradients, 4·n_a·D bytes for dA and 4·n_b·D bytes for dB, nothing else.

Offsets are int64. Scale and bias are read from device pointers: launchers never synchronise with
the host. Under ``TRITON_INTERPRET=1`` (CPU tests) bf16 and fp16 tiles are upcast to fp32 before
``tl.dot``, because the interpreter cannot multiply them.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .tiles import arch_of, tiles_for

# Block sizes, warps and stages per kernel, GPU generation and dot precision: tiles.py (checked for
# spills and shared memory by compile_report.py). The forward groups row tiles so the partial-column
# buffer stays at 3 × groups × N floats.
MAX_GROUPS = 256


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@triton.jit
def _logit_tile(
    a_ptr,  # (n_a, D) row-side features (fp16/bf16/fp32), base pointer
    b_ptr,  # (n_b, D) column-side features, same dtype, base pointer
    rows,  # (BLOCK_M,) int64 row indices into A
    cols,  # (BLOCK_N,) int64 row indices into B (the tile's columns)
    row_mask, col_mask,  # (BLOCK_M,), (BLOCK_N,) bool: index < n_a, index < n_b
    D,  # feature width, shared by A and B
    stride_a0, stride_a1,  # strides of A in elements (row, feature); any layout
    stride_b0, stride_b1,  # strides of B in elements (row, feature); any layout
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot (fp32 inputs, or the interpreter)
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 dots (see _dot_args)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # tile rows, cols, feature slice
):
    """X = A[rows] · B[cols]ᵀ as a (BLOCK_M, BLOCK_N) fp32 tile; masked rows/cols read zeros."""
    x = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        a = tl.load(a_ptr + rows[:, None] * stride_a0 + ks[None, :] * stride_a1,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
        bt = tl.load(b_ptr + cols[None, :] * stride_b0 + ks[:, None] * stride_b1,
                     mask=col_mask[None, :] & k_mask[:, None], other=0.0)  # (BK, BN)
        if UPCAST:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        x += tl.dot(a, bt, input_precision=INPUT_PRECISION)
    return x


@triton.jit
def _forward_kernel(
    a_ptr,  # (n_a, D) local image features
    b_ptr,  # (n_b, D) gathered text features
    scale_ptr,  # () logit scale s (already exponentiated), any float dtype, read as fp32
    bias_ptr,  # () logit bias, any float dtype; read only if HAS_BIAS
    row_out_ptr,  # (3, n_a) fp32 contiguous. softmax: lse, Σ softmax·X, unused;
    #               sigmoid: Σℓ, Σ∂ℓ/∂S·X, Σ∂ℓ/∂S
    col_out_ptr,  # (3, groups, n_b) fp32 contiguous partial columns (softmax): max, Σexp(S−max),
    #               Σexp(S−max)·X; unread for sigmoid (the launcher passes row_out_ptr)
    n_a, n_b, D,  # rows of A, rows of B, feature width
    stride_a0, stride_a1,  # strides of A in elements
    stride_b0, stride_b1,  # strides of B in elements
    diag_offset,  # the positive pair of row i is column i + diag_offset
    tiles_per_group,  # row tiles handled by one program
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    n_groups = tl.num_programs(0).to(tl.int64)
    s = tl.load(scale_ptr).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    for t in range(0, tiles_per_group):
        rows = (group * tiles_per_group + t) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < n_a
        acc0 = tl.zeros((BLOCK_M,), dtype=tl.float32)  # softmax: running max; sigmoid: Σℓ
        acc1 = tl.zeros((BLOCK_M,), dtype=tl.float32)  # softmax: Σexp(S−max);  sigmoid: Σ∂ℓ/∂S·X
        acc2 = tl.zeros((BLOCK_M,), dtype=tl.float32)  # softmax: Σexp(S−max)·X; sigmoid: Σ∂ℓ/∂S
        if not SIGMOID:
            acc0 = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        for c0 in range(0, n_b, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
            col_mask = cols < n_b
            x = _logit_tile(a_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_a0, stride_a1, stride_b0,
                            stride_b1, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            logits = s * x + bias
            valid = row_mask[:, None] & col_mask[None, :]
            if SIGMOID:
                z = tl.where(cols[None, :] == rows[:, None] + diag_offset, 1.0, -1.0)
                t_ = z * logits
                loss = tl.maximum(-t_, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(t_)))  # softplus(−zS), stable
                dlds = -z * tl.sigmoid(-t_)
                acc0 += tl.sum(tl.where(valid, loss, 0.0), axis=1)
                acc1 += tl.sum(tl.where(valid, dlds * x, 0.0), axis=1)
                acc2 += tl.sum(tl.where(valid, dlds, 0.0), axis=1)
            else:
                row_logits = tl.where(col_mask[None, :], logits, float("-inf"))
                new_max = tl.maximum(acc0, tl.max(row_logits, axis=1))
                alpha = tl.exp(acc0 - new_max)
                p = tl.exp(row_logits - new_max[:, None])
                acc1 = acc1 * alpha + tl.sum(p, axis=1)
                acc2 = acc2 * alpha + tl.sum(p * x, axis=1)
                acc0 = new_max
                # This tile's columns, merged into the group's partial-column buffer.
                col_logits = tl.where(valid, logits, float("-inf"))
                offs = group * n_b + cols
                plane = n_groups * n_b
                old_max = tl.load(col_out_ptr + offs, mask=col_mask, other=float("-inf"))
                old_sum = tl.load(col_out_ptr + plane + offs, mask=col_mask, other=0.0)
                old_wx = tl.load(col_out_ptr + 2 * plane + offs, mask=col_mask, other=0.0)
                col_max = tl.maximum(old_max, tl.max(col_logits, axis=0))
                q = tl.exp(col_logits - col_max[None, :])
                keep = tl.exp(old_max - col_max)
                tl.store(col_out_ptr + offs, col_max, mask=col_mask)
                tl.store(col_out_ptr + plane + offs, old_sum * keep + tl.sum(q, axis=0), mask=col_mask)
                tl.store(col_out_ptr + 2 * plane + offs, old_wx * keep + tl.sum(q * x, axis=0), mask=col_mask)
        if SIGMOID:
            tl.store(row_out_ptr + rows, acc0, mask=row_mask)
            tl.store(row_out_ptr + n_a + rows, acc1, mask=row_mask)
            tl.store(row_out_ptr + 2 * n_a + rows, acc2, mask=row_mask)
        else:
            tl.store(row_out_ptr + rows, acc0 + tl.log(acc1), mask=row_mask)
            tl.store(row_out_ptr + n_a + rows, acc2 / acc1, mask=row_mask)


@triton.jit
def _backward_kernel(
    a_ptr,  # (n_a, D) rows whose gradient this call produces
    b_ptr,  # (n_b, D) the other side
    out_ptr,  # (n_a, D) fp32, zero-initialised: s · ∂L/∂S · B
    scale_ptr, bias_ptr,  # () logit scale and bias, any float dtype (bias read only if HAS_BIAS)
    a_lse_ptr,  # (n_a,) fp32 contiguous, softmax: log-sum-exp of each A row's softmax (unused for sigmoid)
    a_coef_ptr,  # fp32 contiguous; softmax: (n_a,) weight of the A-row softmax term; sigmoid: (1,) loss weight
    b_lse_ptr,  # (n_b,) fp32 contiguous, softmax: log-sum-exp of each B column (read only if HAS_B_TERM)
    b_coef_ptr,  # (n_b,) fp32 contiguous, weight of the B-column softmax term (read only if HAS_B_TERM)
    diag_coef_ptr,  # (1,) fp32, softmax: weight subtracted on positive pairs (unused for sigmoid)
    n_a, n_b, D,  # rows of A, rows of B, feature width
    stride_a0, stride_a1,  # strides of A in elements (row, feature)
    stride_b0, stride_b1,  # strides of B in elements (row, feature)
    stride_o0, stride_o1,  # strides of out in elements (row, feature)
    diag_offset,  # the positive pair of A row i is B row i + diag_offset
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_B_TERM: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < n_a
    s = tl.load(scale_ptr).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    if SIGMOID:
        coef = tl.load(a_coef_ptr).to(tl.float32)
    else:
        a_lse = tl.load(a_lse_ptr + rows, mask=row_mask, other=0.0)
        a_coef = tl.load(a_coef_ptr + rows, mask=row_mask, other=0.0)
        diag_coef = tl.load(diag_coef_ptr).to(tl.float32)
    for c0 in range(0, n_b, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < n_b
        x = _logit_tile(a_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_a0, stride_a1, stride_b0,
                        stride_b1, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        logits = s * x + bias
        positive = cols[None, :] == rows[:, None] + diag_offset
        if SIGMOID:
            z = tl.where(positive, 1.0, -1.0)
            dlds = -coef * z * tl.sigmoid(-z * logits)
        else:
            dlds = a_coef[:, None] * tl.exp(logits - a_lse[:, None])
            if HAS_B_TERM:
                b_lse = tl.load(b_lse_ptr + cols, mask=col_mask, other=0.0)
                b_coef = tl.load(b_coef_ptr + cols, mask=col_mask, other=0.0)
                dlds += b_coef[None, :] * tl.exp(logits - b_lse[None, :])
            dlds -= tl.where(positive, diag_coef, 0.0)
        dx = tl.where(row_mask[:, None] & col_mask[None, :], dlds * s, 0.0)  # (BM, BN) ∂L/∂X
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < D
            b_tile = tl.load(b_ptr + cols[:, None] * stride_b0 + ks[None, :] * stride_b1,
                             mask=col_mask[:, None] & k_mask[None, :], other=0.0)  # (BN, BK)
            if UPCAST:
                grad = tl.dot(dx, b_tile.to(tl.float32), input_precision=INPUT_PRECISION)
            else:
                grad = tl.dot(dx.to(b_tile.dtype), b_tile)
            o_ptrs = out_ptr + rows[:, None] * stride_o0 + ks[None, :] * stride_o1
            o_mask = row_mask[:, None] & k_mask[None, :]
            tl.store(o_ptrs, tl.load(o_ptrs, mask=o_mask, other=0.0) + grad, mask=o_mask)


def _tf32_matmul_allowed() -> bool:
    """Whether torch's own fp32 CUDA matmuls may use TF32 under the user's current setting.

    torch >= 2.9 sets this with ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" / "ieee", or
    "none" to inherit ``torch.backends.fp32_precision``); reading the legacy ``allow_tf32`` then raises
    RuntimeError, so the legacy flag is read only on torch versions without the new attribute.
    """
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        precision = matmul.fp32_precision
        if precision == "none":
            precision = getattr(torch.backends, "fp32_precision", "none")
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def _mode(dtype: torch.dtype) -> str:
    """The ``tiles.MODES`` entry of a launch: fp32 inputs follow torch's own matmul setting (exact unless
    the user allowed TF32); the interpreter runs everything as exact fp32."""
    if _interpreted():
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if _tf32_matmul_allowed() else "ieee"
    return "bf16" if dtype == torch.bfloat16 else "fp16"


def _arch(device: torch.device) -> str | None:
    """The ``tiles.ARCHS`` entry of ``device``; None in the interpreter."""
    return None if _interpreted() else arch_of(torch.cuda.get_device_capability(device))


def _dot_args(mode: str) -> dict:
    """UPCAST (tiles to fp32 before tl.dot: fp32 inputs, or the interpreter) and INPUT_PRECISION."""
    upcast = mode in ("ieee", "tf32") or _interpreted()
    return {"UPCAST": upcast, "INPUT_PRECISION": "tf32" if mode == "tf32" else "ieee"}


def _check_launch(a: torch.Tensor, b_mat: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  names: tuple[str, str]) -> None:
    """Launch preconditions, named: the kernels index raw pointers, so a mismatch would read garbage.

    ``names`` are the launcher's names for ``a`` and ``b_mat`` (``image``/``texts`` or ``a``/``b_mat``).
    """
    a_name, b_name = names
    if a.device.type != "cuda" and not _interpreted():
        raise ValueError(f"Triton kernels need CUDA tensors ({a_name} is on {a.device}); set TRITON_INTERPRET=1 "
                         "to run them on the CPU")
    if a.ndim != 2 or b_mat.ndim != 2 or a.shape[1] != b_mat.shape[1]:
        raise ValueError(f"{a_name} and {b_name} must be 2-D with one width; got {a_name} {tuple(a.shape)} and "
                         f"{b_name} {tuple(b_mat.shape)}")
    if a.dtype != b_mat.dtype or a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{a_name} and {b_name} must share a dtype among float16, bfloat16, float32; got "
                        f"{a_name} {a.dtype}, {b_name} {b_mat.dtype}")
    for name, value in ((b_name, b_mat), ("scale", scale), ("bias", bias)):
        if value is not None and value.device != a.device:
            raise ValueError(f"{name} is on {value.device} but {a_name} is on {a.device}: one device for all")
    for name, value in (("scale", scale), ("bias", bias)):
        if value is not None and (value.numel() != 1 or not value.is_floating_point()):
            raise ValueError(f"{name} must be a one-element floating tensor, got shape {tuple(value.shape)}, "
                             f"{value.dtype}")


def _check_vector(name: str, value: torch.Tensor | None, length: int | None, device: torch.device) -> None:
    """A statistic the kernels read as ``ptr + index``: fp32, on ``device``, contiguous, ``length`` long.

    ``length`` None means one element (shape () or (1,)). A strided or short vector would silently
    give wrong gradients, so every mismatch is an error naming the argument.
    """
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a float32 tensor, got {type(value).__name__}")
    if length is None:
        ok_shape, expected = value.numel() == 1 and value.ndim <= 1, "() or (1,)"
    else:
        ok_shape, expected = tuple(value.shape) == (length,), f"({length},)"
    if not ok_shape:
        raise ValueError(f"{name} must have shape {expected}, got shape {tuple(value.shape)}")
    if value.dtype != torch.float32:
        raise ValueError(f"{name} must be float32 (the kernels read it as fp32), got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the features are on {device}")
    if value.numel() > 1 and value.stride() != (1,):
        raise ValueError(f"{name} must be contiguous: expected stride (1,), got stride {value.stride()}; "
                         "pass .contiguous()")


def _bias_args(scale: torch.Tensor, bias: torch.Tensor | None):
    return (bias if bias is not None else scale), bias is not None


class Launch(NamedTuple):
    """One kernel launch, prepared: ``kernel[grid](*args, **options)`` fills ``outputs`` (tensors allocated with
    the launch, by name)."""

    grid: tuple[int, ...]
    args: tuple
    options: dict
    outputs: dict[str, torch.Tensor]


def softmax_forward(image: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    max_groups: int = MAX_GROUPS):
    """Same contract as ``contrastive_torch.softmax_forward``; ``max_groups`` bounds the programs (and
    the 12·groups·N bytes of partial columns)."""
    _check_launch(image, texts, scale, bias, ("image", "texts"))
    if isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1:
        raise ValueError(f"max_groups must be a positive int, got {max_groups!r}")
    launch = softmax_forward_launch(image, texts, scale, bias, max_groups, _mode(image.dtype), _arch(image.device))
    _forward_kernel[launch.grid](*launch.args, **launch.options)
    row_out, col_out = launch.outputs["row_stats"], launch.outputs["column_partials"]
    col_max = col_out[0].max(dim=0).values  # merge the groups' partial columns
    keep = torch.exp(col_out[0] - col_max[None, :]).nan_to_num_(0.0)
    return row_out[0], row_out[1], col_max, (col_out[1] * keep).sum(0), (col_out[2] * keep).sum(0)


def softmax_forward_launch(image, texts, scale, bias, max_groups: int, mode: str, arch: str | None) -> Launch:
    """``_forward_kernel``'s launch for the softmax statistics; outputs ``row_stats`` (3, n_a) and
    ``column_partials`` (3, groups, n_b), allocated here."""
    tiles = tiles_for("forward_softmax", mode, arch)
    n_a, n_b, d = image.shape[0], texts.shape[0], image.shape[1]
    n_tiles = triton.cdiv(n_a, tiles.block_m)
    tiles_per_group = triton.cdiv(n_tiles, min(n_tiles, max_groups))  # bounds the partial-column buffer
    groups = triton.cdiv(n_tiles, tiles_per_group)
    row_out = torch.empty(3, n_a, device=image.device, dtype=torch.float32)
    col_out = torch.empty(3, groups, n_b, device=image.device, dtype=torch.float32)
    col_out[0].fill_(float("-inf"))
    col_out[1:].zero_()
    bias_arg, has_bias = _bias_args(scale, bias)
    args = (image, texts, scale, bias_arg, row_out, col_out, n_a, n_b, d,
            image.stride(0), image.stride(1), texts.stride(0), texts.stride(1), 0, tiles_per_group)
    return Launch((groups,), args, dict(SIGMOID=False, HAS_BIAS=has_bias, **_dot_args(mode), **tiles.launch_options()),
                  {"row_stats": row_out, "column_partials": col_out})


def sigmoid_forward(image: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    diag_offset: int):
    """Same contract as ``contrastive_torch.sigmoid_forward``: one program per row tile (no column state)."""
    _check_launch(image, texts, scale, bias, ("image", "texts"))
    launch = sigmoid_forward_launch(image, texts, scale, bias, diag_offset, _mode(image.dtype), _arch(image.device))
    _forward_kernel[launch.grid](*launch.args, **launch.options)
    row_out = launch.outputs["row_stats"]
    return row_out[0], row_out[1], row_out[2]


def sigmoid_forward_launch(image, texts, scale, bias, diag_offset: int, mode: str, arch: str | None) -> Launch:
    """``_forward_kernel``'s launch for SigLIP; output ``row_stats`` (3, n_a), allocated here."""
    tiles = tiles_for("forward_sigmoid", mode, arch)
    n_a, n_b, d = image.shape[0], texts.shape[0], image.shape[1]
    row_out = torch.empty(3, n_a, device=image.device, dtype=torch.float32)
    bias_arg, has_bias = _bias_args(scale, bias)
    args = (image, texts, scale, bias_arg, row_out, row_out, n_a, n_b, d,
            image.stride(0), image.stride(1), texts.stride(0), texts.stride(1), diag_offset, 1)
    return Launch((triton.cdiv(n_a, tiles.block_m),), args,
                  dict(SIGMOID=True, HAS_BIAS=has_bias, **_dot_args(mode), **tiles.launch_options()),
                  {"row_stats": row_out})


def _backward_one(a, b_mat, scale, bias, sigmoid, a_lse, a_coef, b_lse, b_coef, diag_offset, diag_coef):
    launch = backward_launch(a, b_mat, scale, bias, sigmoid, a_lse, a_coef, b_lse, b_coef, diag_offset, diag_coef,
                             _mode(a.dtype), _arch(a.device))
    _backward_kernel[launch.grid](*launch.args, **launch.options)
    return launch.outputs["grad"]


def backward_launch(a, b_mat, scale, bias, sigmoid: bool, a_lse, a_coef, b_lse, b_coef, diag_offset: int, diag_coef,
                    mode: str, arch: str | None) -> Launch:
    """``_backward_kernel``'s launch; output ``grad`` (n_a, d) in fp32, allocated (zeroed) here."""
    tiles = tiles_for("backward_sigmoid" if sigmoid else "backward_softmax", mode, arch)
    out = torch.zeros(a.shape, device=a.device, dtype=torch.float32)
    bias_arg, has_bias = _bias_args(scale, bias)
    has_b_term = b_coef is not None
    dummy = a_coef  # a valid pointer for arguments the constexpr flags leave unread
    args = (a, b_mat, out, scale, bias_arg,
            a_lse if a_lse is not None else dummy, a_coef, b_lse if has_b_term else dummy,
            b_coef if has_b_term else dummy, diag_coef if diag_coef is not None else dummy,
            a.shape[0], b_mat.shape[0], a.shape[1],
            a.stride(0), a.stride(1), b_mat.stride(0), b_mat.stride(1), out.stride(0), out.stride(1), diag_offset)
    return Launch((triton.cdiv(a.shape[0], tiles.block_m),), args,
                  dict(SIGMOID=sigmoid, HAS_BIAS=has_bias, HAS_B_TERM=has_b_term, **_dot_args(mode),
                       **tiles.launch_options()), {"grad": out})


def backward(a: torch.Tensor, b_mat: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, *,
             sigmoid: bool, a_lse: torch.Tensor | None, a_coef: torch.Tensor, b_lse: torch.Tensor | None,
             b_coef: torch.Tensor | None, diag_offset: int, diag_coef: torch.Tensor | None, want_b: bool = True):
    """Same contract as ``contrastive_torch.backward``: (dA, dB or None), fp32.

    Statistic vectors are fp32, contiguous, on the features' device: softmax ``a_lse``, ``a_coef``
    (n_a,), ``b_lse``, ``b_coef`` (n_b,) (both or neither; both when ``want_b``), ``diag_coef`` one
    element; sigmoid ``a_coef`` one element (the others unread).
    """
    _check_launch(a, b_mat, scale, bias, ("a", "b_mat"))
    n_a, n_b = a.shape[0], b_mat.shape[0]
    if sigmoid:
        _check_vector("a_coef", a_coef, None, a.device)
    else:
        _check_vector("a_lse", a_lse, n_a, a.device)
        _check_vector("a_coef", a_coef, n_a, a.device)
        _check_vector("diag_coef", diag_coef, None, a.device)
        if (b_lse is None) != (b_coef is None) or (want_b and b_coef is None):
            raise ValueError("b_lse and b_coef must be given together, and are required when want_b=True; got "
                             f"b_lse={'None' if b_lse is None else 'a tensor'}, "
                             f"b_coef={'None' if b_coef is None else 'a tensor'}, want_b={want_b}")
        if b_coef is not None:
            _check_vector("b_lse", b_lse, n_b, a.device)
            _check_vector("b_coef", b_coef, n_b, a.device)
    d_a = _backward_one(a, b_mat, scale, bias, sigmoid, a_lse, a_coef, b_lse, b_coef, diag_offset, diag_coef)
    if not want_b:
        return d_a, None
    if sigmoid:  # symmetric in A and B, up to the sign of the diagonal offset
        d_b = _backward_one(b_mat, a, scale, bias, True, None, a_coef, None, None, -diag_offset, None)
    else:
        d_b = _backward_one(b_mat, a, scale, bias, False, b_lse, b_coef, a_lse, a_coef, -diag_offset, diag_coef)
    return d_a, d_b
