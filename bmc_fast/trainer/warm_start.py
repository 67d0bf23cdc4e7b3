"""``--pretrained SOURCE``: a new run that starts from a whole trained model (towers, projections, logit scale and
bias), with a fresh optimizer.

A source is a ``python -m bmc_fast.export`` directory (or its Hub id, ``hf-hub:ORG/NAME``, fetched by
``bmc_fast.checkpoint.hub``), a bmc-fast run directory (its ``checkpoints/latest``, consolidated in fp32), or an
open_clip checkpoint file of the same architecture (``open_clip_model.safetensors``, or open_clip's training
checkpoint ``epoch_N.pt`` with its ``state_dict``; read with ``weights_only=True``). ``source_config`` reads what it
is before any model is built; ``load_pretrained`` copies its weights into the new model, every key checked.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bmc_fast.checkpoint.load import BMC_CONFIG_NAME, CONFIG_NAME, WEIGHTS_NAME, check_run
from bmc_fast.checkpoint.run_dir import RunDir
from bmc_fast.errors import ConfigError
from bmc_fast.model.config import ModelConfig

_logger = logging.getLogger(__name__)

FLAG = "--pretrained"
# Model-config fields that do not change the weights' layout: a warm start may differ in them.
FREE_FIELDS = {"context_length", "text_unpad", "attn_backend", "te_precision", "image_proj", "text_clean",
               "init_logit_scale", "init_logit_bias", "max_logit_scale", "vision.grad_checkpointing",
               "vision.drop_path", "text.grad_checkpointing"}


def source_kind(source: str) -> str:
    """``export``, ``run`` or ``file``; ``ConfigError`` for anything else."""
    path = Path(source)
    if (path / CONFIG_NAME).is_file():
        return "export"
    if RunDir(path).is_run():
        check_run(path, flag=FLAG)
        return "run"
    if path.is_file():
        return "file"
    raise ConfigError(f"{FLAG} {source!r} is not an export directory ({CONFIG_NAME}), a run directory (config.json, "
                      "checkpoints/latest) nor a checkpoint file: pass one of those, or an export's Hub id "
                      "hf-hub:ORG/NAME")


def source_config(source: str) -> ModelConfig | None:
    """The source's ModelConfig (an export written by bmc-fast, or a run); None for an open_clip file."""
    kind = source_kind(source)
    path = Path(source)
    if kind == "export" and (path / BMC_CONFIG_NAME).is_file():
        return ModelConfig.from_dict(json.loads((path / BMC_CONFIG_NAME).read_text()), str(path / BMC_CONFIG_NAME))
    if kind == "run":
        run = RunDir(path)
        return ModelConfig.from_dict(run.read_config()["model"], source=str(run.config))
    return None


def check_architecture(source: str, source_cfg: ModelConfig | None, model_cfg: ModelConfig) -> None:
    """The run's model must have the source's layout (``FREE_FIELDS`` aside) and a logit bias wherever the source
    has one."""
    from bmc_fast.trainer.resume import differing_keys

    if source_cfg is None:
        return  # an open_clip file: its keys and shapes are checked as it loads
    differs = sorted(set(differing_keys(source_cfg.to_dict(), model_cfg.to_dict())) - FREE_FIELDS)
    if differs:
        raise ConfigError(f"{FLAG} {source!r} is another architecture than --preset's ({differs} differ): pass the "
                          f"preset the source was trained with (an export's own {BMC_CONFIG_NAME} works as --preset)")
    if source_cfg.init_logit_bias is not None and model_cfg.init_logit_bias is None:
        raise ConfigError(f"{FLAG} {source!r} has a logit bias (trained with --loss siglip): pass --loss siglip to "
                          "fine-tune it with the sigmoid loss")


def pretrained_state(source: str) -> dict[str, Any]:
    """The source's weights in bmc-fast's torch-layer names, fp32."""
    from safetensors.torch import load_file

    from bmc_fast.checkpoint.load import run_state_dict
    from bmc_fast.model.state_dict_adapters import OpenClip
    from bmc_fast.model.weights import read_state_dict

    kind, path = source_kind(source), Path(source)
    if kind == "export":
        state = OpenClip.from_open_clip(load_file(str(path / WEIGHTS_NAME)))
    elif kind == "run":
        state = run_state_dict(RunDir(path), source_config(source))
    else:
        state = OpenClip.from_open_clip(read_state_dict(path, FLAG))
    return {k: v.float() for k, v in state.items()}


def load_pretrained(model, source: str) -> None:
    """Copy the source's weights into ``model`` (every tensor must fit; a model bias the source lacks keeps its
    init)."""
    from bmc_fast.model.weights import load_torch_state

    state = pretrained_state(source)
    if "logit_bias" not in state and hasattr(model, "logit_bias"):
        state["logit_bias"] = model.logit_bias.detach().clone()
        _logger.info("%s: the source has no logit bias; it starts at %g", FLAG, model.cfg.init_logit_bias)
    try:
        load_torch_state(model, state)
    except ConfigError as error:
        raise ConfigError(f"{FLAG} {source!r}: {error}; pass a checkpoint of the --preset's architecture") from None
    _logger.info("%s: initialised every weight from %s (%s); the optimizer starts fresh", FLAG, source,
                 source_kind(source))


def restore_frozen(model, checkpoints: Path, tag: str) -> None:
    """Copy the checkpoint's values of ``model``'s frozen (locked) parameters into it. A resume on another number of
    ranks loads DeepSpeed's universal checkpoint, which restores the optimizer's parameters only: locked ones would
    keep the new process's initialisation (a warm start's weights lost)."""
    import torch

    from bmc_fast.checkpoint.zero_weights import fp32_state_dict

    frozen = {name: param for name, param in model.named_parameters() if not param.requires_grad}
    if not frozen:
        return
    state = fp32_state_dict(checkpoints, tag)
    with torch.no_grad():
        for name, param in frozen.items():
            param.copy_(state[name])
    _logger.info("--resume: %d locked tensors restored from %s", len(frozen), tag)
