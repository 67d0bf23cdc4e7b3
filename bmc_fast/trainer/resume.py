"""What a resumed run may change: runtime switches yes, the model no; a changed set-up is logged."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from bmc_fast.checkpoint.run_dir import RunDir, tag_step
from bmc_fast.ds_json import BatchPlan
from bmc_fast.errors import ConfigError
from bmc_fast.model.config import ModelConfig
from bmc_fast.trainer.rank_state import saved_world_size

_logger = logging.getLogger(__name__)

# Model-config keys that change how the model runs, not its weights: a resumed run may switch them.
RUNTIME_SWITCHES = {"text_unpad", "attn_backend", "vision.grad_checkpointing", "text.grad_checkpointing"}


def check_resumable(run: RunDir, model_cfg: ModelConfig, ds_config: dict[str, Any], plan: BatchPlan,
                    max_steps: int) -> None:
    """The checkpoint exists, holds the same weights layout and steps are left; a changed set-up is logged."""
    tag = run.latest_tag()
    if tag is None:
        raise ConfigError(f"--resume: {str(run.path)!r} has no checkpoints/latest to resume from; drop --resume "
                          "to start a new run")
    if (done := tag_step(tag)) is not None and done >= max_steps:
        raise ConfigError(f"--resume: the checkpoint {tag!r} is at step {done} and --max-steps is "
                          f"{max_steps}: nothing is left to train; raise --max-steps")
    saved = run.read_config()
    ranks = saved_world_size(run.checkpoints / tag) or saved.get("batch", {}).get("world_size")
    if ranks is not None and ranks != plan.world_size:
        raise ConfigError(f"--resume: checkpoint {tag!r} was written by {ranks} rank(s) and this run has "
                          f"{plan.world_size}: DeepSpeed cannot re-partition ZeRO optimizer state over another number "
                          f"of ranks; resume with {ranks} rank(s)")
    differs = sorted(set(differing_keys(saved.get("model", {}), model_cfg.to_dict())) - RUNTIME_SWITCHES)
    if differs:
        raise ConfigError(f"--resume: the run in {str(run.path)!r} used a different model ({differs} differ); "
                          "resume with the same --preset, --context-length and --tokenizer")
    changed = differing_keys(saved.get("deepspeed", {}), ds_config) + differing_keys(
        saved.get("batch", {}), dataclasses.asdict(plan), prefix="batch.")
    if changed:
        _logger.warning("--resume: the training set-up differs from the saved run's config.json in %s; "
                        "continuing with the new values", changed)


def differing_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
