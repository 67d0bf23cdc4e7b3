"""The DeepSpeed JSON is the one source of truth for batch size, optimizer, schedule, precision and ZeRO.

The trainer reads the batch arithmetic from it and checks it against the world size before any model
is built; it changes one thing: the scheduler's ``total_num_steps`` follows ``--max-steps``.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bmc_fast.cli import read_json_object
from bmc_fast.errors import ConfigError

_logger = logging.getLogger(__name__)

FLAG = "--ds_config"


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int  # train_batch_size: pairs per optimizer step, all ranks together
    micro_batch: int  # pairs per rank per forward
    accumulation: int  # gradient_accumulation_steps
    world_size: int


def load_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{FLAG} {str(path)!r} is a directory, not a DeepSpeed JSON file: pass one of "
                          "ds_configs/zero1.json, zero2.json, zero3.json or your own DeepSpeed JSON")
    if not path.is_file():
        raise ConfigError(f"{FLAG} {str(path)!r} does not exist: pass one of ds_configs/zero1.json, zero2.json, "
                          "zero3.json or your own DeepSpeed JSON")
    return read_json_object(path, f"{FLAG} {str(path)!r}", "write the DeepSpeed config as one JSON object, as "
                                                           "ds_configs/zero2.json does")


def batch_plan(config: dict[str, Any], world_size: int, source: str = FLAG) -> BatchPlan:
    """Solve train_batch_size = micro × accumulation × world_size from the fields the JSON sets."""
    total = config.get("train_batch_size")
    micro = config.get("train_micro_batch_size_per_gpu")
    accum = config.get("gradient_accumulation_steps")
    for name, value in (("train_batch_size", total), ("train_micro_batch_size_per_gpu", micro),
                        ("gradient_accumulation_steps", accum)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{source}: {name} must be a positive integer, got {value!r}")
    if total is None and micro is None:
        raise ConfigError(f"{source}: set train_batch_size (pairs per step, all ranks) in the DeepSpeed JSON")
    if total is None:
        accum = accum or 1
        total = micro * accum * world_size
    elif micro is None:
        accum = accum or 1
        if total % (accum * world_size):
            raise ConfigError(
                f"{source}: train_batch_size {total} is not divisible by gradient_accumulation_steps {accum} × "
                f"world size {world_size}: set train_batch_size to a multiple of {accum * world_size} or change "
                "the number of ranks")
        micro = total // (accum * world_size)
    elif accum is None:
        if total % (micro * world_size):
            raise ConfigError(f"{source}: train_batch_size {total} is not divisible by "
                              f"train_micro_batch_size_per_gpu {micro} × world size {world_size}")
        accum = total // (micro * world_size)
    if total != micro * accum * world_size:
        raise ConfigError(f"{source}: train_batch_size {total} != micro {micro} × accum {accum} × world size "
                          f"{world_size}: fix one of the three fields")
    return BatchPlan(total, micro, accum, world_size)


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
    """On CPU, train Adam/AdamW with ``torch.optim.AdamW`` (DeepSpeed's ``"torch_adam": true``) unless the JSON
    chooses, so that a resumed run continues bit for bit.

    DeepSpeed 0.19's CPU FusedAdam keeps β₁ᵗ and β₂ᵗ in C++ as float32 running products (β·β·…) and, in a
    fresh process, starts them with ``pow(β, t)``: after a resume from step t ≥ 6 (β₂ = 0.95) the bias
    correction differs by one float32 ulp, so weights drift from the uninterrupted run's. torch's AdamW
    computes ``1 - β ** t`` in float64 from the saved step. The CUDA FusedAdam calls ``pow`` every step, so
    GPU runs keep DeepSpeed's default. ZeRO-Offload's DeepSpeedCPUAdam has the same running product.
    """
    optimizer = config.get("optimizer") or {}
    params = optimizer.get("params") or {}
    if device_type != "cpu" or str(optimizer.get("type", "")).lower() not in ("adam", "adamw"):
        return config
    if "torch_adam" in params:
        _logger.info("optimizer: torch_adam %s as the DeepSpeed JSON sets it", params["torch_adam"])
        return config
    config = copy.deepcopy(config)
    config["optimizer"].setdefault("params", {})["torch_adam"] = True
    _logger.info('optimizer: torch.optim.AdamW on CPU ("torch_adam": true), whose bias correction a resume '
                 'reproduces exactly; set "torch_adam": false in the DeepSpeed JSON for DeepSpeed\'s CPU FusedAdam')
    return config
