"""fp32 weights of a DeepSpeed ZeRO checkpoint (stage 1, 2 or 3), read without unpickling code.

DeepSpeed's own consolidation (``deepspeed.utils.zero_to_fp32``) reads every shard with
``torch.load(weights_only=False)``: a checkpoint file from elsewhere could run any code it likes. Here each
shard is read with ``torch.load(weights_only=True)``, which rebuilds tensors, containers and numbers only,
plus the four plain-data DeepSpeed classes a ZeRO checkpoint pickles (``ALLOWED_GLOBALS``). A file that
names anything else is refused, with the names it holds (listed without running them). The shards, once
read, are merged by DeepSpeed's own code (its ZeRO-2 and ZeRO-3 partition arithmetic), so the result is
the same state dict, bit for bit, as ``get_fp32_state_dict_from_zero_checkpoint`` (tested for ZeRO 1/2/3).
"""
from __future__ import annotations

import importlib
import logging
import pickle
from pathlib import Path

import torch

from bmc_fast.errors import ConfigError

_logger = logging.getLogger(__name__)

# What a ZeRO 1/2/3 checkpoint of DeepSpeed 0.19 pickles besides tensors and containers: an enum, a
# dataclass of two ints and the loss scalers' numbers. None of them runs code when rebuilt.
ALLOWED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)


def load_shard(path: str | Path) -> dict:
    """One checkpoint file, read with ``torch.load(weights_only=True)`` and ``ALLOWED_GLOBALS``."""
    with torch.serialization.safe_globals(_allowed_classes()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as error:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # read, never imported or run
            refused = sorted(set(names) - set(ALLOWED_GLOBALS))
            raise ConfigError(f"checkpoint file {str(path)!r} is refused: it pickles {refused or 'code'}, which "
                              "torch.load(weights_only=True) does not rebuild (a file that names other objects can "
                              "run code when loaded). Only load checkpoints you trust, and only with DeepSpeed's "
                              "own tools") from error


def fp32_state_dict(checkpoint_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The consolidated fp32 weights of ``checkpoint_dir/tag`` (every rank's shards), as tensors."""
    from deepspeed.utils import zero_to_fp32 as ds

    tag_dir = Path(checkpoint_dir) / tag
    if not tag_dir.is_dir():
        raise ConfigError(f"checkpoint {str(tag_dir)!r} does not exist")
    shards = [(load_shard(f), f) for f in ds.get_model_state_files(str(tag_dir))]
    model_states = [_model_state(state, f) for state, f in shards]
    stage, world_size, flat_groups, paddings = _optimizer_state(tag_dir, ds.get_optim_files(str(tag_dir)))
    _logger.info("consolidating %s: ZeRO-%d, %d rank(s), DeepSpeed %s (weights_only reads)", tag_dir, stage,
                 world_size, model_states[0].ds_version)
    if stage <= 2:
        merged = ds._get_fp32_state_dict_from_zero2_checkpoint(world_size, flat_groups, model_states, False, paddings)
    else:
        merged = ds._get_fp32_state_dict_from_zero3_checkpoint(world_size, flat_groups, model_states, False)
    if stage == 1:  # ZeRO-1 saves no fragments of frozen parameters (--lock-*): every rank's module holds them whole
        module = shards[0][0]["module"]
        frozen = {k: v.float() for k, v in module.items() if k not in merged and k in _parameter_names(shards[0][0])}
        merged.update(frozen)
    return ds.to_torch_tensor(merged)


def _parameter_names(state: dict) -> set[str]:
    """The parameters of a stage-1/2 model-state file's module (its state dict holds buffers too)."""
    from deepspeed.checkpoint import constants as c

    return set(state["module"]) - set(state[c.BUFFER_NAMES])


def _model_state(state: dict, path: str):
    """What DeepSpeed's ``parse_model_states`` keeps of one ``*model_states.pt``."""
    from deepspeed.checkpoint import constants as c
    from deepspeed.utils.zero_to_fp32 import _raise_if_autoep_zero3_partitioned_state, zero_model_state

    _raise_if_autoep_zero3_partitioned_state(state)
    if c.BUFFER_NAMES not in state:
        raise ConfigError(f"{path!r} is not a DeepSpeed model-state file (no {c.BUFFER_NAMES!r})")
    buffers = {k: v.float() if v.is_floating_point() else v
               for k, v in state["module"].items() if k in state[c.BUFFER_NAMES]}
    return zero_model_state(buffers=buffers, param_shapes=state[c.PARAM_SHAPES],
                            shared_params=[[k, v] for k, v in state["shared_params"].items()],
                            ds_version=state.get(c.DS_VERSION), frozen_param_shapes=state.get(c.FROZEN_PARAM_SHAPES),
                            frozen_param_fragments=state.get(c.FROZEN_PARAM_FRAGMENTS))


def _optimizer_state(tag_dir: Path, files: list[str]):
    """(ZeRO stage, world size, every rank's fp32 flat groups, alignment paddings), as DeepSpeed's
    ``parse_optim_states`` finds them."""
    from deepspeed.checkpoint import constants as c

    states = [load_shard(f)[c.OPTIMIZER_STATE_DICT] for f in files]
    if c.ZERO_STAGE not in states[0]:
        raise ConfigError(f"{files[0]!r} is not a ZeRO checkpoint (no {c.ZERO_STAGE!r})")
    stage, world_size = int(states[0][c.ZERO_STAGE]), states[0][c.PARTITION_COUNT]
    world_size = max(world_size) if isinstance(world_size, list) else world_size
    if world_size != len(files):
        raise ConfigError(f"checkpoint {str(tag_dir)!r} was written by {world_size} ranks but holds {len(files)} "
                          "optimizer shards: it is incomplete (a save that did not finish?)")
    key = c.SINGLE_PARTITION_OF_FP32_GROUPS if stage <= 2 else c.FP32_FLAT_GROUPS
    return stage, world_size, [s[key] for s in states], states[0].get(c.PARAM_ALIGNMENT_PADDINGS)


def _allowed_classes() -> list[type]:
    classes = []
    for name in ALLOWED_GLOBALS:
        module, _, attr = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attr))
    return classes
