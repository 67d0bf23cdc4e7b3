"""What a resumed run may change: runtime switches and the number of ranks yes, the model no; a changed set-up is
logged.

Resumed on another number of ranks (a job requeued on fewer or more GPUs), the run keeps its global batch: micro
batch × accumulation are re-planned for the new world size (``replan``), the checkpoint is loaded through DeepSpeed's
universal checkpoint (``bmc_fast.checkpoint.universal``) and the data stream is re-split (``trainer/resplit.py``).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from bmc_fast.checkpoint.run_dir import RunDir, tag_step
from bmc_fast.ds_json import FLAG, BatchPlan, batch_plan
from bmc_fast.errors import ConfigError
from bmc_fast.model.config import ModelConfig
from bmc_fast.trainer import rank_state

_logger = logging.getLogger(__name__)

# Model-config keys that change how the model runs, not its weights: a resumed run may switch them.
RUNTIME_SWITCHES = {"text_unpad", "attn_backend", "vision.grad_checkpointing", "text.grad_checkpointing"}
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass(frozen=True)
class Resize:
    """A resume on another number of ranks than the checkpoint's."""

    tag: str  # the checkpoint resumed from
    saved: BatchPlan  # the batch of the run that wrote it
    plan: BatchPlan  # this run's: the same global batch


def plan_resume(run: RunDir, model_cfg: ModelConfig, ds_config: dict[str, Any], world_size: int, max_steps: int,
                accumulation: str) -> tuple[dict[str, Any], BatchPlan, Resize | None]:
    """Check that the checkpoint exists, holds the same weights layout and leaves steps to train; return (the
    DeepSpeed JSON, the batch plan, the ``Resize`` when the ranks changed). A changed set-up is logged."""
    tag = run.latest_tag()
    if tag is None:
        raise ConfigError(f"--resume: {str(run.path)!r} has no checkpoints/latest to resume from; drop --resume "
                          "to start a new run")
    if (done := tag_step(tag)) is not None and done >= max_steps:
        raise ConfigError(f"--resume: the checkpoint {tag!r} is at step {done} and --max-steps is "
                          f"{max_steps}: nothing is left to train; raise --max-steps")
    saved = run.read_config()
    # with the defaults of fields added since the run began (text_clean: "none", as the run was)
    saved_model = ModelConfig.from_dict(saved["model"], source=str(run.config)).to_dict() if "model" in saved else {}
    differs = sorted(set(differing_keys(saved_model, model_cfg.to_dict())) - RUNTIME_SWITCHES)
    if differs:
        raise ConfigError(f"--resume: the run in {str(run.path)!r} used a different model ({differs} differ); "
                          "resume with the same --preset, --context-length and --tokenizer")
    saved_plan = checkpoint_plan(run, tag)
    resize = None
    if saved_plan is None or saved_plan.world_size == world_size:
        plan = batch_plan(ds_config, world_size, source=f"{FLAG} (resumed run)")
    else:
        plan = replan(saved_plan, world_size, ds_config.get("train_micro_batch_size_per_gpu"))
        ds_config = {**ds_config, **dict(zip(BATCH_KEYS, (plan.global_batch, plan.micro_batch, plan.accumulation)))}
        resize = Resize(tag, saved_plan, plan)
        _log_resize(resize, accumulation)
    changed = differing_keys(saved.get("deepspeed", {}), ds_config) + differing_keys(
        saved.get("batch", {}), dataclasses.asdict(plan), prefix="batch.")
    if resize is not None:  # the batch's new cut is logged above
        changed = [key for key in changed if key not in BATCH_KEYS and not key.startswith("batch.")]
    if changed:
        _logger.warning("--resume: the training set-up differs from the saved run's config.json in %s; "
                        "continuing with the new values", changed)
    return ds_config, plan, resize


def check_same_recipe(run: RunDir, cfg) -> None:
    """A resumed run keeps its loss, locks and learning-rate scales (``TrainConfig.RECIPE_FLAGS``): they shape the
    model's outputs and the optimizer's groups, which the checkpoint holds. Runs from before a flag existed had its
    default."""
    from bmc_fast.trainer.config import RECIPE_FLAGS, TrainConfig

    if not run.is_run():
        return
    saved = run.read_config().get("train", {})
    defaults = {name: TrainConfig.__dataclass_fields__[name].default for name in RECIPE_FLAGS}
    differs = {name: (saved.get(name, defaults[name]), getattr(cfg, name)) for name in RECIPE_FLAGS
               if saved.get(name, defaults[name]) != getattr(cfg, name)}
    if differs:
        flags = ", ".join(f"--{name.replace('_', '-')} {old} (now {new})" for name, (old, new) in differs.items())
        raise ConfigError(f"--resume: the run in {str(run.path)!r} was started with {flags}; resume with the run's "
                          "values (its config.json 'train'), or start a new run from it with --pretrained")


def checkpoint_plan(run: RunDir, tag: str) -> BatchPlan | None:
    """The batch plan of the run that wrote checkpoint ``tag`` (None for a checkpoint without rank states)."""
    tag_dir = run.checkpoints / tag
    ranks = rank_state.saved_world_size(tag_dir)
    if ranks is None:
        return None
    state = rank_state.read(rank_state.rank_state_path(tag_dir, 0))
    if "batch" in state:
        return BatchPlan(**state["batch"])
    # checkpoints of bmc-fast before resizing: the world size and micro batch of the split, the run's global batch
    micro, global_batch = state["split"]["micro_batch"], run.read_config()["batch"]["global_batch"]
    return BatchPlan(global_batch, micro, global_batch // (micro * ranks), ranks)


def replan(saved: BatchPlan, world_size: int, max_micro: int | None = None) -> BatchPlan:
    """The saved global batch over ``world_size`` ranks: the largest micro batch that divides each rank's share and
    is at most ``max_micro`` (the JSON's ``train_micro_batch_size_per_gpu``, else the saved micro batch, which
    fitted in memory), the rest accumulated. A global batch that ``world_size`` does not divide is refused."""
    if saved.global_batch % world_size:
        fits = [n for n in range(1, 2 * max(saved.world_size, world_size) + 1) if saved.global_batch % n == 0]
        raise ConfigError(f"--resume: the checkpoint's global batch of {saved.global_batch} pairs (train_batch_size, "
                          f"{saved.world_size} ranks) cannot be split over {world_size} ranks; resume on a number of "
                          f"ranks that divides it ({', '.join(map(str, fits))}), or start a new run")
    share = saved.global_batch // world_size
    bound = min(max_micro or saved.micro_batch, share)
    micro = max(n for n in range(1, bound + 1) if share % n == 0)
    return BatchPlan(saved.global_batch, micro, share // micro, world_size)


def _log_resize(resize: Resize, accumulation: str) -> None:
    old, new = resize.saved, resize.plan
    _logger.info("--resume on %d rank(s): checkpoint %s was written by %d; the global batch stays %d = %d micro × %d "
                 "accum × %d ranks (was %d × %d × %d); DeepSpeed's universal checkpoint re-partitions the optimizer "
                 "state", new.world_size, resize.tag, old.world_size, new.global_batch, new.micro_batch,
                 new.accumulation, new.world_size, old.micro_batch, old.accumulation, old.world_size)
    if accumulation == "independent" and (new.accumulation > 1 or old.accumulation > 1):
        _logger.warning("--accumulation independent: each loss now contrasts %d pairs (was %d), not the global "
                        "batch; --accumulation contrastive keeps every loss over all %d", new.micro_batch *
                        new.world_size, old.micro_batch * old.world_size, new.global_batch)


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
