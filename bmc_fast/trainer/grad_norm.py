"""The dtype in which DeepSpeed's ZeRO optimizers take the gradient norm for clipping.

DeepSpeed 0.19's ZeRO-1/2/3 step computes the norm per gradient as
``vector_norm(g.to(get_norm_dtype()))``. ``get_norm_dtype()`` is float64 on every accelerator with fp64
(``deepspeed.runtime.zero.utils``), so each step makes a float64 copy of every gradient. On a GPU that
is a few milliseconds. On a CPU it is not: for the 454M bf16 parameters of ``bmc-longclip-l14-512`` on 2
cores it costs 1-2 s a step (more without transparent huge pages), as much as open_clip's whole AdamW
step there (``benchmarks/bench_train.py``).

``grad_norm_dtype`` picks that dtype. ``float64`` is DeepSpeed's own. ``float32`` takes each gradient's norm
in float32, as ``torch.nn.utils.clip_grad_norm_`` does for fp32 models: fp32 gradients need no copy, bf16
ones a copy half the size. The per-tensor norms are then squared and summed in float32, which overflows to
inf only past a norm of about 1.8e19. Such a step counts as non-finite and is skipped, like a NaN. ``auto``
is float32 on CPU and DeepSpeed's float64 elsewhere. The choice is set on the two ZeRO modules, which import
``get_norm_dtype`` by name; it is logged, and a DeepSpeed without that name is an error.
"""
from __future__ import annotations

import logging

import torch

from bmc_fast.errors import ConfigError

_logger = logging.getLogger(__name__)

GRAD_NORM_DTYPES = ("auto", "float32", "float64")
ZERO_MODULES = ("deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3")


def resolve_grad_norm_dtype(choice: str, device_type: str) -> torch.dtype | None:
    """The dtype to use, or None for DeepSpeed's own ``get_norm_dtype()``."""
    if choice not in GRAD_NORM_DTYPES:
        raise ConfigError(f"--grad-norm-dtype {choice!r}: choose one of {', '.join(GRAD_NORM_DTYPES)}")
    if choice == "float32" or (choice == "auto" and device_type == "cpu"):
        return torch.float32
    return None


def set_grad_norm_dtype(choice: str, device_type: str) -> torch.dtype:
    """Make DeepSpeed's ZeRO optimizers take gradient norms in ``choice``'s dtype; returns that dtype."""
    import importlib

    from deepspeed.runtime.zero import utils as zero_utils

    dtype = resolve_grad_norm_dtype(choice, device_type)
    for name in ZERO_MODULES:
        module = importlib.import_module(name)
        if not hasattr(module, "get_norm_dtype"):
            if dtype is None:  # DeepSpeed's own norm: nothing to set, whatever this version does
                continue
            raise ConfigError(f"--grad-norm-dtype {choice}: {name} has no get_norm_dtype in this DeepSpeed; "
                              "pass --grad-norm-dtype float64 to keep DeepSpeed's own norm")
        module.get_norm_dtype = zero_utils.get_norm_dtype if dtype is None else (lambda: dtype)
    chosen = zero_utils.get_norm_dtype() if dtype is None else dtype
    how = "DeepSpeed's own" if dtype is None else f"{choice} on {device_type}"
    _logger.info("gradient norm for clipping: %s (%s)", str(chosen).removeprefix("torch."), how)
    return chosen
