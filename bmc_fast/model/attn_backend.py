"""Which attention kernels run, for both towers: one choice from the device, the dtype and what is installed.

``attn_backend`` names one of:

- ``fa4``: FlashAttention-4 (the ``flash-attn-4`` wheel, pure Python) switched into torch with
  ``torch.nn.attention.activate_flash_attention_impl("FA4")``. It replaces the CUDA kernels behind torch's
  flash SDPA and ``varlen_attn``, so it runs through the same calls as ``torch_flash``. Compute capability
  9.x / 10.x, fp16 / bf16.
- ``torch_flash``: torch's own FlashAttention-2, no package to build: SDPA's flash backend in the image tower,
  ``torch.nn.attention.varlen.varlen_attn`` on the packed captions of the text tower (ModernBERT's sliding
  window as ``window_size``). CUDA sm80+, fp16 / bf16.
- ``flash``: the flash-attn 2 package (``flash_attn_func``; HF's ``flash_attention_2`` in the text tower).
- ``sdpa``: torch SDPA on any device and dtype; the packed text path runs ``bmc_varlen_sdpa``.
- ``eager``: softmax(QKᵀ/√d)V written out, a reference.

``auto`` takes, for fp16 / bf16 on CUDA, the first that can run of fa4, flash, torch_flash, then sdpa;
elsewhere sdpa. An explicit request that cannot run is an error naming what is missing, never a fallback.
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import torch

from bmc_fast.errors import ConfigError
from bmc_fast.model.config import ATTN_BACKENDS
from bmc_fast.optional import fa4_installed, flash_attn_installed

_logger = logging.getLogger(__name__)

FA4_CAPABILITIES = (9, 10)  # major versions FA4 runs on (torch's _fa4 checks the same)
TORCH_FLASH_MIN_CAPABILITY = (8, 0)  # torch's FlashAttention-2 kernels: Ampere and newer


@dataclass(frozen=True)
class AttentionSupport:
    """What a device offers the attention kernels."""

    device_type: str  # "cuda", "cpu", ...
    capability: tuple[int, int] | None = None  # CUDA compute capability; None elsewhere
    fa4: bool = False  # flash-attn-4 installed and this torch can activate it
    flash_attn: bool = False  # flash-attn 2 installed
    torch_varlen: bool = False  # torch.nn.attention.varlen.varlen_attn, with window_size


@functools.cache
def torch_varlen_available() -> bool:
    """Whether this torch has ``varlen_attn`` taking ``window_size`` (torch 2.10+; 2.9 had no window)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return "window_size" in inspect.signature(varlen_attn).parameters


def torch_can_activate_fa4() -> bool:
    try:
        from torch.nn.attention import activate_flash_attention_impl  # noqa: F401
    except ImportError:
        return False
    return True


def attention_support(device: torch.device) -> AttentionSupport:
    """The support of ``device`` as installed here (asks CUDA for the capability only on CUDA devices)."""
    if device.type != "cuda":
        return AttentionSupport(device.type)
    return AttentionSupport("cuda", tuple(torch.cuda.get_device_capability(device)),
                            fa4=fa4_installed() and torch_can_activate_fa4(), flash_attn=flash_attn_installed(),
                            torch_varlen=torch_varlen_available())


def why_not(backend: str, dtype: torch.dtype, support: AttentionSupport) -> str | None:
    """Why ``backend`` cannot run on ``support`` with ``dtype`` activations, or None when it can."""
    if backend in ("sdpa", "eager"):
        return None
    if support.device_type != "cuda":
        return f"it runs on CUDA only, not {support.device_type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"it takes fp16/bf16 activations, not {dtype} (train with bf16, or evaluate under autocast)"
    capability = support.capability or (0, 0)
    if backend == "fa4":
        if capability[0] not in FA4_CAPABILITIES:
            return f"FA4 needs compute capability 9.x or 10.x, this GPU is {capability[0]}.{capability[1]}"
        if not support.fa4:
            return "flash-attn-4 is not installed (pip install 'flash-attn-4>=4.0.0b40'; torch 2.12+)"
    elif backend == "torch_flash":
        if capability < TORCH_FLASH_MIN_CAPABILITY:
            return f"torch's FlashAttention-2 needs sm80+, this GPU is sm{capability[0]}{capability[1]}"
        if not support.torch_varlen:
            return f"torch {torch.__version__} has no varlen_attn with window_size (torch 2.10+)"
    elif backend == "flash" and not support.flash_attn:
        return "flash-attn 2 is not installed (a source build: pip install flash-attn --no-build-isolation)"
    return None


def choose_attention(requested: str, dtype: torch.dtype, support: AttentionSupport) -> str:
    """The backend that runs for ``requested`` (one of ``ATTN_BACKENDS``); a pure function of its arguments."""
    if requested not in ATTN_BACKENDS:
        raise ConfigError(f"attn_backend must be one of {ATTN_BACKENDS}, got {requested!r}")
    if requested == "auto":
        return next(b for b in ("fa4", "flash", "torch_flash", "sdpa") if why_not(b, dtype, support) is None)
    reason = why_not(requested, dtype, support)
    if reason is not None:
        raise ConfigError(f"attn_backend={requested!r} cannot run here: {reason}; use 'auto' or 'sdpa'")
    return requested


_logged: set[tuple] = set()


def resolve(requested: str, device: torch.device, dtype: torch.dtype, where: str) -> str:
    """``choose_attention`` for ``device`` and ``dtype`` activations, logged once per (where, choice); activates
    FA4 when it is the choice."""
    support = attention_support(device)
    chosen = choose_attention(requested, dtype, support)
    key = (where, requested, chosen, dtype, support.device_type)
    if key not in _logged:
        _logged.add(key)
        _logger.info("%s attention: %s (requested %s; %s %s%s)", where, chosen, requested, support.device_type,
                     str(dtype).removeprefix("torch."),
                     f", sm{support.capability[0]}{support.capability[1]}" if support.capability else "")
    if chosen == "fa4":
        activate_fa4()
    return chosen


@functools.cache
def activate_fa4() -> None:
    """Switch torch's flash kernels (SDPA and varlen_attn) to FlashAttention-4, once per process."""
    from torch.nn.attention import activate_flash_attention_impl

    activate_flash_attention_impl("FA4")
    _logger.info("FlashAttention-4 activated in torch's dispatcher (flash SDPA and varlen_attn run FA4 kernels)")
