"""The DeepSpeed JSON, read in one place for the trainer and the memory planner (``bmc_fast.plan``).

The JSON is the one source of truth for batch size, optimizer, schedule, precision and ZeRO: ``load_ds_config``
reads it, ``batch_plan`` solves (and checks) its batch arithmetic for a world size, ``deepspeed_settings`` reads
what the planner needs. What the trainer changes or refuses in it is ``bmc_fast.trainer.ds_config``'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bmc_fast.cli import read_json_object
from bmc_fast.errors import ConfigError

FLAG = "--ds_config"


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int  # train_batch_size: pairs per optimizer step, all ranks together
    micro_batch: int  # pairs per rank per forward
    accumulation: int  # gradient_accumulation_steps
    world_size: int


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """The DeepSpeed JSON at ``path`` as a dict; a missing file, a directory or a malformed JSON is a ConfigError
    naming ``--ds_config``."""
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


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What the planner reads from a DeepSpeed JSON, for a run on ``gpus`` GPUs."""
    stage: int  # zero_optimization.stage
    offload: bool  # zero_optimization.offload_optimizer.device is "cpu"
    dtype: torch.dtype  # bf16 (or bfloat16) / fp16 enabled, else float32
    micro_batch: int | None  # pairs a GPU a forward: train_micro_batch_size_per_gpu, else derived; None: unset
    accumulation: int  # gradient_accumulation_steps K
    global_batch: int | None  # pairs a step, all GPUs: train_batch_size, else micro x K x gpus; None: unset


def deepspeed_settings(ds_config: dict[str, Any], gpus: int) -> DeepSpeedSettings:
    """Stage, offload, dtype and batch sizes of a DeepSpeed JSON for the memory planner, which also plans JSONs
    without batch sizes or for another number of GPUs (the trainer solves and checks them with ``batch_plan``)."""
    zero = ds_config.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") == "cpu"
    enabled = {section for section in ("bf16", "bfloat16", "fp16") if (ds_config.get(section) or {}).get("enabled")}
    dtype = torch.bfloat16 if enabled & {"bf16", "bfloat16"} else torch.float16 if enabled else torch.float32
    accumulation = int(ds_config.get("gradient_accumulation_steps") or 1)
    total = ds_config.get("train_batch_size")
    micro = ds_config.get("train_micro_batch_size_per_gpu") or (total // (gpus * accumulation) if total else 0) or None
    return DeepSpeedSettings(int(zero.get("stage", 0)), offload, dtype, micro, accumulation,
                             total or (micro * accumulation * gpus if micro else None))
