r"""Fused contrastive losses over gathered negatives: CLIP's symmetric InfoNCE and SigLIP's sigmoid loss.

Per rank r of W, with local image features I and text features T (b × D), the gathered texts
T_all (N = W·b rows, rank order), a scale s (``logit_scale.exp()``, as open_clip passes it) and an
optional bias β, both losses live on one b × N block

    X = I T_allᵀ,   S = s·X + β,   positive pair of local row i: column p(i) = r·b + i.

CLIP (open_clip ``ClipLoss(local_loss=True, gather_with_grad=True)``)::

    L_r = 1/(2b) Σ_i [ lse_j S_ij − S_i,p(i) ]  +  1/(2b) Σ_{j owned by r} [ lse_{i∈all ranks} S_ij − S_j ]

The first term (image→text) is a row log-sum-exp of the block. The second (text→image) is a column
log-sum-exp over *all* images: each rank computes its block's partial column max and Σexp, and two
all-reduces complete the columns on every rank: a MAX over the N column maxima, then a SUM over 2·N
floats (the rescaled Σexp and the Σexp·X statistic below). The gradient of Σ_q g_q L_q (g_q: rank
q's upstream gradient, all-gathered, W floats) on the block is

    ∂/∂S_ij = g_r/(2b)·softmax_row(S)_ij + g_{owner(j)}/(2b)·softmax_col(S)_ij − [j = p(i)]·g_r/b,

so dI = s·(∂/∂S)·T_all stays local and dT_all = s·(∂/∂S)ᵀ·I is reduce-scattered to the texts'
owners, which is exactly the gradient open_clip's differentiable all-gather produces. ∂L_r/∂s is
Σ ∂L_r/∂S·X, built in the forward from Σ_j softmax·X per row and per column (so it needs no extra
pass); ∂L/∂β = 0 because a shared shift cancels in both softmaxes.

SigLIP (open_clip ``SigLipLoss``, any ``dist_impl``)::

    L_r = 1/b Σ_i Σ_{j∈all} softplus(−z_ij S_ij),   z_ij = +1 if j = p(i) else −1
    ∂L_r/∂S_ij = −z_ij σ(−z_ij S_ij)/b;   ∂L_r/∂s, ∂L_r/∂β accumulated in the forward.

Cost per rank (GEMM-equivalents of b×N×D multiply-adds): forward 1 (the block once, both
directions' statistics from it); backward 3 on the torch path (one recomputation feeding dI and
dT_all) and 4 on the Triton path (dI and dT_all are separate atomic-free kernels, each recomputing
the block) — 4 and 5 in all, against open_clip's 6 (two b×N logit matrices, each with two gradient
GEMMs). Memory: no b×N matrix; O(b + N) statistics, the gathered N×D texts (as open_clip keeps them)
and one N×D fp32 gradient buffer; the torch path reuses one row-chunk × N workspace of
``DEFAULT_CHUNK_BYTES`` (32 MiB) per call, the Triton path 12·G·N bytes of partial columns,
G = min(⌈b/64⌉, 256), and 8·G·N bytes more while merging them (``contrastive_triton.py``).
Communication: all-gather of T (N×D), two all-reduces (MAX of N floats, then SUM of 2N; CLIP),
all-gather of W upstream gradients, reduce-scatter of dT_all (N×D) on every backend, gloo included
(torch >= 2.2; older gloo lacks it and gets an all-reduce of N×D plus a copy of the own b rows).

open_clip's other ``ClipLoss`` flag combinations reuse the same block: ``local_loss=False`` returns
the mean of the ranks' losses (one more all-reduce of 2 floats, which also averages ∂L/∂s) and
scales the upstream gradients by 1/W (no gather grads) or averages them (gather with grads);
``local_loss=True, gather_with_grad=False`` keeps only this rank's own rows in the backward, which
needs the gathered images (N×D) too. For ``local_loss=False, gather_with_grad=False`` the per-rank
gradients equal open_clip's only when every rank backpropagates its loss with the same weight, as
training does (open_clip's gradient there depends on the rank's own weight only; ours on every rank's
weight, the all-gathered upstream gradients). The loss is returned in fp32 for fp16/bf16 features.

All ranks must pass the same b, as for open_clip. Non-finite features give a non-finite loss.
References: open_clip ``loss.py``; Inf-CL (Wang et al. 2024, "Breaking the memory barrier"), which
tiles one direction per call; flash-attention's online softmax.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")  # the legal values of backend=
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_logged_choices: set[tuple[str, str, str]] = set()
SINGLE_PROCESS = "single_process"  # process_group value: no collectives, even inside an initialised world
# gloo implements reduce_scatter_tensor since torch 2.2 (pytorch#112144, Oct 2023). torch.__version__
# is a TorchVersion, which compares as a version (2.14.1+cu130 > 2.2; a 2.2 pre-release takes the fallback).
_GLOO_HAS_REDUCE_SCATTER = torch.__version__ >= (2, 2)


# ---------------------------------------------------------------------------------------------------
# References: the public semantics in plain torch, one process, whole matrices.
# ---------------------------------------------------------------------------------------------------
def clip_loss_ref(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                  logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """open_clip ``ClipLoss`` on one process: (CE(S) + CE(Sᵀ)) / 2 with S = s·I Tᵀ + β (B × B)."""
    logits = logit_scale * image @ text.T
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_loss_ref(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                    logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """open_clip ``SigLipLoss`` on one process: −Σ log σ(z ⊙ S) / B, z = 2·eye − 1."""
    logits = logit_scale * image @ text.T
    if logit_bias is not None:
        logits = logits + logit_bias
    z = 2 * torch.eye(image.shape[0], device=image.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / image.shape[0]


# ---------------------------------------------------------------------------------------------------
# Backend choice and collectives.
# ---------------------------------------------------------------------------------------------------
def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype):
    """The module implementing the kernels for ``backend`` on ``device``; logs each new choice once."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from . import contrastive_torch

    chosen = backend
    if backend == "auto":
        chosen = "triton" if device.type == "cuda" and dtype != torch.float64 and _triton_available() else "torch"
    if chosen == "triton":
        require_triton()
        from . import contrastive_triton

        if device.type != "cuda" and not contrastive_triton._interpreted():
            raise ValueError(f"backend='triton' needs CUDA tensors (got {device.type}) or TRITON_INTERPRET=1; "
                             "use backend='torch' or 'auto' on the CPU")
        if dtype == torch.float64:
            raise TypeError("backend='triton' takes float16, bfloat16 or float32 features, got float64; use "
                            "backend='torch' for float64")
        module = contrastive_triton
    else:
        module = contrastive_torch
    key = (backend, chosen, device.type)
    if key not in _logged_choices:
        _logged_choices.add(key)
        _logger.info("fused contrastive loss: backend=%s (requested %s) on %s", chosen, backend, device.type)
    return module


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def require_triton() -> None:
    """Raise one ImportError saying what to install when backend='triton' is asked for without triton."""
    if not _triton_available():
        raise ImportError("backend='triton' needs the triton package, which is not importable: install it with "
                          "`pip install triton` (CUDA builds of torch on Linux ship a matching one), or pass "
                          "backend='torch' (or 'auto', which falls back to torch without triton)")


def _world(group) -> tuple[int, int]:
    if group is SINGLE_PROCESS or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def _all_gather_rows(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """(b, ...) from each rank -> (world·b, ...) in rank order; no autograd."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def _backend_for(group, device: torch.device) -> str:
    """The collective backend serving ``device`` tensors: "gloo" for "gloo", and for "cpu:gloo,cuda:nccl" on CPU."""
    name = str(torch.distributed.get_backend(group)).lower()
    for part in name.split(","):
        dev, sep, backend = part.partition(":")
        if sep and dev.strip() == device.type:
            return backend.strip()
    return name


def _reduce_scatter_rows(x: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
    """Sum (world·b, ...) over ranks and keep this rank's b rows (a tensor of its own, b rows only)."""
    if world == 1:
        return x
    b = x.shape[0] // world
    if not _GLOO_HAS_REDUCE_SCATTER and _backend_for(group, x.device) == "gloo":
        if ("text gradients", "all_reduce", "gloo") not in _logged_choices:
            _logged_choices.add(("text gradients", "all_reduce", "gloo"))
            _logger.info("fused loss: gloo on torch %s has no reduce-scatter; text gradients go by an all-reduce "
                         "of N×D floats", torch.__version__)
        torch.distributed.all_reduce(x, group=group)  # torch < 2.2: gloo has no reduce-scatter
        return x[rank * b:(rank + 1) * b].clone()  # a copy, so the gradient does not pin the N×D buffer
    out = torch.empty((b,) + x.shape[1:], device=x.device, dtype=x.dtype)
    # reduce_scatter_single is torch 2.14's name for reduce_scatter_tensor (deprecated there, same op).
    dist = torch.distributed
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter(out, x.contiguous(), group=group)
    return out


def _complete_columns(col_max, col_sum, col_wx, group, world):
    """Merge every rank's partial column statistics: returns (column lse, Σ softmax_col · X)."""
    if world > 1:
        local_max = col_max.clone()
        torch.distributed.all_reduce(col_max, op=torch.distributed.ReduceOp.MAX, group=group)
        keep = torch.exp(local_max - col_max).nan_to_num_(0.0)
        sums = torch.stack([col_sum * keep, col_wx * keep])
        torch.distributed.all_reduce(sums, group=group)
        col_sum, col_wx = sums[0], sums[1]
    return col_max + torch.log(col_sum), col_wx / col_sum


# ---------------------------------------------------------------------------------------------------
# Autograd functions.
# ---------------------------------------------------------------------------------------------------
class _ClipLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, group, backend, local_loss, gather_with_grad):
        rank, world = _world(group)
        b = image.shape[0]
        kernels = resolve_backend(backend, image.device, image.dtype)
        texts = _all_gather_rows(text, group, world)  # (N, D)
        row_lse, row_ex, col_max, col_sum, col_wx = kernels.softmax_forward(image, texts, scale, bias)
        col_lse, col_ex = _complete_columns(col_max, col_sum, col_wx, group, world)
        dtype = row_lse.dtype
        pos_x = (image.to(dtype) * text.to(dtype)).sum(dim=1)  # (b,) X of the positive pairs
        pos_s = scale.to(dtype).reshape(()) * pos_x + (bias.to(dtype).reshape(()) if bias is not None else 0)
        own = slice(rank * b, (rank + 1) * b)
        loss = ((row_lse - pos_s).sum() + (col_lse[own] - pos_s).sum()) / (2 * b)
        dscale = ((row_ex - pos_x).sum() + (col_ex[own] - pos_x).sum()) / (2 * b)
        if not local_loss and world > 1:  # open_clip's global loss: the mean over ranks, same on each
            both = torch.stack([loss, dscale])
            torch.distributed.all_reduce(both, group=group)
            loss, dscale = both[0] / world, both[1] / world
        images = _all_gather_rows(image, group, world) if (local_loss and not gather_with_grad and world > 1) else None
        ctx.save_for_backward(image, text, texts, scale, bias, row_lse, col_lse, dscale, images)
        ctx.config = (group, kernels, rank, world, local_loss, gather_with_grad)
        return loss

    @staticmethod
    def backward(ctx, grad):
        image, text, texts, scale, bias, row_lse, col_lse, dscale, images = ctx.saved_tensors
        group, kernels, rank, world, local_loss, gather_with_grad = ctx.config
        b = image.shape[0]
        g = grad.to(row_lse.dtype).reshape(1)
        if images is not None:  # local loss, gathered copies detached: only this rank's own rows
            coef = (g / (2 * b)).expand(b).contiguous()
            d_image, _ = kernels.backward(image, texts, scale, bias, sigmoid=False, a_lse=row_lse, a_coef=coef,
                                          b_lse=None, b_coef=None, diag_offset=rank * b, diag_coef=g / (2 * b),
                                          want_b=False)
            own = slice(rank * b, (rank + 1) * b)
            d_text, _ = kernels.backward(text, images, scale, bias, sigmoid=False,
                                         a_lse=col_lse[own].contiguous(), a_coef=coef, b_lse=None, b_coef=None,
                                         diag_offset=rank * b, diag_coef=g / (2 * b), want_b=False)
        else:
            upstream = _all_gather_rows(g, group, world)  # (W,) every rank's upstream gradient
            if not local_loss:
                # open_clip's global loss, one per rank: without gather grads each rank's features see
                # 1/W of every rank's terms; with them, the gather's backward sums W such copies.
                upstream = upstream / world if not gather_with_grad else upstream.mean().expand(world)
            col_coef = (upstream / (2 * b)).repeat_interleave(b)  # (N,)
            row_coef = col_coef[rank * b:(rank + 1) * b].contiguous()
            d_image, d_texts = kernels.backward(image, texts, scale, bias, sigmoid=False, a_lse=row_lse,
                                                a_coef=row_coef, b_lse=col_lse, b_coef=col_coef,
                                                diag_offset=rank * b, diag_coef=upstream[rank] / b)
            d_text = _reduce_scatter_rows(d_texts, group, rank, world)
        d_scale = (g * dscale).reshape(scale.shape).to(scale.dtype)
        d_bias = torch.zeros_like(bias) if bias is not None else None
        return d_image.to(image.dtype), d_text.to(text.dtype), d_scale, d_bias, None, None, None, None


class _SigLipLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, group, backend):
        rank, world = _world(group)
        b = image.shape[0]
        kernels = resolve_backend(backend, image.device, image.dtype)
        texts = _all_gather_rows(text, group, world)
        row_loss, row_ds, row_db = kernels.sigmoid_forward(image, texts, scale, bias, rank * b)
        ctx.save_for_backward(image, texts, scale, bias, row_ds.sum() / b, row_db.sum() / b)
        ctx.config = (group, kernels, rank, world)
        return row_loss.sum() / b

    @staticmethod
    def backward(ctx, grad):
        image, texts, scale, bias, dscale, dbias = ctx.saved_tensors
        group, kernels, rank, world = ctx.config
        b = image.shape[0]
        g = grad.to(dscale.dtype).reshape(())
        d_image, d_texts = kernels.backward(image, texts, scale, bias, sigmoid=True, a_lse=None,
                                            a_coef=(g / b).reshape(1), b_lse=None, b_coef=None,
                                            diag_offset=rank * b, diag_coef=None)
        d_text = _reduce_scatter_rows(d_texts, group, rank, world)
        d_scale = (g * dscale).reshape(scale.shape).to(scale.dtype)
        d_bias = (g * dbias).reshape(bias.shape).to(bias.dtype) if bias is not None else None
        return d_image.to(image.dtype), d_text.to(texts.dtype), d_scale, d_bias, None, None


# ---------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------
def check_inputs(image_features, text_features, logit_scale, logit_bias=None) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument when the inputs cannot be a loss."""
    for name, value in (("image_features", image_features), ("text_features", text_features),
                        ("logit_scale", logit_scale)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}"
                            + (" (pass logit_scale.exp() as a tensor, as open_clip does)" if name == "logit_scale"
                               else ""))
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(f"image_features and text_features must be 2-D (batch, dim); got shapes "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if image_features.shape != text_features.shape:
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must have the same shape (one caption per image)")
    if image_features.shape[0] == 0 or image_features.shape[1] == 0:
        raise ValueError(f"image_features is empty (shape {tuple(image_features.shape)}): a batch needs >= 1 pair")
    if image_features.dtype != text_features.dtype:
        raise TypeError(f"image_features is {image_features.dtype} but text_features is {text_features.dtype}: "
                        "cast both to one dtype")
    if image_features.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"image_features must be a floating dtype {_FLOAT_DTYPES}, got {image_features.dtype}")
    for name, value in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a scalar torch.Tensor or None, got {type(value).__name__}")
        if value.numel() != 1 or value.ndim > 1:
            raise ValueError(f"{name} must be a scalar tensor (shape () or (1,)), got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    for name, value in (("text_features", text_features), ("logit_scale", logit_scale),
                        ("logit_bias", logit_bias)):
        if value is not None and value.device != image_features.device:
            raise ValueError(f"{name} is on {value.device} but image_features is on {image_features.device}: "
                             "move them to one device")


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              logit_bias: torch.Tensor | None = None, *, process_group=None, backend: Backend = "auto",
              local_loss: bool = True, gather_with_grad: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE over negatives gathered from every rank of ``process_group``, fused.

    Args:
        image_features: (b, D) this rank's image embeddings, fp16/bf16/fp32 (fp64: torch backend).
        text_features: (b, D) this rank's caption embeddings, same dtype and device; row i pairs image i.
        logit_scale: scalar tensor s, the multiplier of the cosine logits (open_clip passes
            ``logit_scale.exp()``).
        logit_bias: optional scalar tensor added to every logit (no effect on this loss; accepted as
            open_clip accepts it).
        process_group: the ranks to gather negatives from (default: the world, when initialised;
            ``SINGLE_PROCESS``: this process alone).
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (tiled twin), or "auto":
            triton on CUDA, torch otherwise. The choice is logged once.
        local_loss, gather_with_grad: open_clip's ``ClipLoss`` flags (defaults: the scalable pair).

    Returns:
        A 0-d fp32 tensor (fp64 for fp64 features; fp32 also for fp16/bf16 features, where open_clip
        returns the features' dtype): this rank's loss, as open_clip's ``ClipLoss`` with the same flags
        computes it. Gradients equal open_clip's on every rank, for any per-rank loss weights, except
        with ``local_loss=False, gather_with_grad=False``: there they match only when every rank
        backpropagates its loss with the same weight (as ``loss.backward()`` in training does).
    """
    check_inputs(image_features, text_features, logit_scale, logit_bias)
    return _ClipLossFunction.apply(image_features, text_features, logit_scale, logit_bias, process_group,
                                   backend, local_loss, gather_with_grad)


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None, *, process_group=None,
                backend: Backend = "auto") -> torch.Tensor:
    """SigLIP's sigmoid loss of this rank's images against every rank's texts, fused.

    Shapes, dtypes and ``backend`` as in ``clip_loss``; ``logit_bias`` is SigLIP's learnable bias.
    Returns this rank's loss as open_clip's ``SigLipLoss`` does (any ``dist_impl``), as a 0-d fp32
    tensor (fp64 for fp64 features; fp32 also for fp16/bf16 features).
    """
    check_inputs(image_features, text_features, logit_scale, logit_bias)
    return _SigLipLossFunction.apply(image_features, text_features, logit_scale, logit_bias, process_group,
                                     backend)
