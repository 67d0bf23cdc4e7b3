"""What the trainer checks and changes in the DeepSpeed JSON (read by ``bmc_fast.ds_json``) before any model is
built: the scheduler's ``total_num_steps`` follows ``--max-steps``; settings under which the NaN guard cannot
work, or a precision the accelerator lacks, are refused; Adam on the CPU resumes exactly.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

from bmc_fast.ds_json import FLAG
from bmc_fast.errors import ConfigError

_logger = logging.getLogger(__name__)

def with_total_steps(config: dict[str, Any], max_steps: int | None) -> tuple[dict[str, Any], int]:
    """Return (config whose LR schedule spans the run, the run's step count).

    ``max_steps=None`` takes the schedule's own ``total_num_steps``.
    """
    config = copy.deepcopy(config)
    params = config.get("scheduler", {}).get("params", {})
    scheduled = params.get("total_num_steps")
    if max_steps is None:
        if scheduled is None:
            raise ConfigError(f"{FLAG}: the JSON's scheduler sets no total_num_steps; pass --max-steps")
        return config, int(scheduled)
    if scheduled is not None and scheduled != max_steps:
        _logger.info("LR schedule: total_num_steps %s -> %d to follow --max-steps", scheduled, max_steps)
        params["total_num_steps"] = max_steps
        warmup = params.get("warmup_num_steps")
        if isinstance(warmup, int) and warmup >= max_steps:
            raise ConfigError(f"{FLAG}: warmup_num_steps {warmup} >= --max-steps {max_steps}: shorten the "
                              "warmup or train longer")
    return config, max_steps


def check_skips_non_finite_steps(config: dict[str, Any]) -> None:
    """The NaN guard rests on DeepSpeed's ZeRO optimizers skipping a step whose all-reduced gradient norm is
    not finite (0.19: stages 1-3 in fp32, bf16 and fp16); refuse the settings under which they never skip."""
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage == 0:
        raise ConfigError(f"{FLAG}: zero_optimization.stage is 0, whose plain optimizer applies a step with "
                          "non-finite gradients; set stage 1, 2 or 3 (stage 1 costs nothing more on one GPU)")
    if zero.get("compute_grad_norm") is False:
        raise ConfigError(f"{FLAG}: zero_optimization.compute_grad_norm is false, so DeepSpeed cannot skip a step "
                          "with non-finite gradients; remove it")
    for section in ("bf16", "bfloat16"):
        if stage in (1, 2) and (config.get(section) or {}).get("check_grad_overflow") is False:
            raise ConfigError(f"{FLAG}: {section}.check_grad_overflow is false, so ZeRO-{stage} applies a step with "
                              "non-finite gradients; remove it")


# DeepSpeed JSON section -> (the dtype it trains in, the fix when the accelerator lacks it)
_PRECISIONS = {
    "fp16": ("float16", 'use "bf16": {"enabled": true} instead, or remove "fp16" to train in fp32'),
    "bf16": ("bfloat16", 'remove "bf16" to train in fp32'),
    "bfloat16": ("bfloat16", 'remove "bfloat16" to train in fp32'),
}


def check_precision_supported(config: dict[str, Any], device: str, supported: list[str]) -> None:
    """Refuse an enabled fp16/bf16 section whose dtype the accelerator lacks (``supported``: the names of
    DeepSpeed's ``get_accelerator().supported_dtypes()``), before any model is built. DeepSpeed's CPU
    accelerator offers float16 only where oneDNN has it (AVX512-FP16 or AMX-FP16 CPUs); elsewhere DeepSpeed
    itself fails inside ``initialize`` with "Type fp16 is not supported on your device"."""
    for section, (dtype, fix) in _PRECISIONS.items():
        if (config.get(section) or {}).get("enabled") and dtype not in supported:
            raise ConfigError(f"{FLAG}: {section}.enabled is true, but DeepSpeed's {device} accelerator has no "
                              f"{dtype} on this machine (it supports {', '.join(supported)}); {fix}")


def with_resumable_cpu_adam(config: dict[str, Any], device_type: str) -> dict[str, Any]:
    """On CPU, train Adam/AdamW with torch's fused ``torch.optim.AdamW`` (DeepSpeed's ``"torch_adam": true``, and
    ``"fused": true``, which DeepSpeed hands to the optimizer) unless the JSON chooses, so that a resumed run
    continues bit for bit, at the cost of one pass over the weights.

    DeepSpeed 0.19's CPU FusedAdam keeps β₁ᵗ and β₂ᵗ in C++ as float32 running products (β·β·…) and, in a
    fresh process, starts them with ``pow(β, t)``: after a resume from step t ≥ 6 (β₂ = 0.95) the bias
    correction differs by one float32 ulp, so weights drift from the uninterrupted run's. torch's AdamW
    computes the bias correction from the saved step (in float64). Its fused CPU kernel (``fused=True``)
    updates weights and moments in one vectorised pass; the default single-tensor loop makes ~10 passes over
    DeepSpeed's flat fp32 partition, each out-of-place op a fresh temporary (open_clip's same loop spent 12 ms
    a step in ``sqrt`` at ``tiny``: ``benchmarks/results/train_profile_cpu.md``). The CUDA FusedAdam calls
    ``pow`` every step, so GPU runs keep DeepSpeed's default. ZeRO-Offload's DeepSpeedCPUAdam has the same
    running product.
    """
    optimizer = config.get("optimizer") or {}
    params = optimizer.get("params") or {}
    if device_type != "cpu" or str(optimizer.get("type", "")).lower() not in ("adam", "adamw"):
        return config
    if params.get("torch_adam") is False:
        _logger.info("optimizer: DeepSpeed's CPU FusedAdam, as the DeepSpeed JSON sets \"torch_adam\": false")
        return config
    if "fused" in params or "foreach" in params:
        _logger.info("optimizer: torch.optim.AdamW with %s as the DeepSpeed JSON sets it",
                     ", ".join(f"{key} {params[key]}" for key in ("fused", "foreach") if key in params))
        return {**config, "optimizer": {**optimizer, "params": {**params, "torch_adam": True}}}
    _logger.info('optimizer: torch.optim.AdamW, fused, on CPU ("torch_adam": true, "fused": true), whose bias '
                 'correction a resume reproduces exactly; set "torch_adam": false in the DeepSpeed JSON for '
                 "DeepSpeed's CPU FusedAdam")
    return {**config, "optimizer": {**optimizer, "params": {**params, "torch_adam": True, "fused": True}}}
