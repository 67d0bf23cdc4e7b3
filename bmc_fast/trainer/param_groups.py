"""What the optimizer trains: the towers' locks (``lock_towers``), the parameter groups in the order DeepSpeed's
engine receives them, and their learning rates.

Without ``--lr-image-scale``, ``--lr-text-scale`` or ``--layer-decay`` there are two groups: the optimizer's own
weight decay (from the DeepSpeed JSON), and none. With them, each (tower, layer, decay or not) is a group whose
rate is the schedule's × its ``lr_scale``: the tower's scale × ``layer_decay`` ^ (L + 1 − layer id), EVA-CLIP's
layer-wise decay (layer ids: ``bmc_fast.model.tower_groups.layer_id``). The scale reaches the DeepSpeed scheduler
as each group's initial ``lr`` (``WarmupCosineLR`` multiplies it by the schedule's ratio) or as per-group
``warmup_min_lr`` / ``warmup_max_lr`` lists (``WarmupLR``, ``WarmupDecayLR``): ``with_group_schedule``.
Locked (frozen) parameters are in no group: the optimizer holds no state for them.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bmc_fast.ds_json import FLAG
from bmc_fast.errors import ConfigError

_logger = logging.getLogger(__name__)

# DeepSpeed schedulers whose per-group rates follow each group's initial lr, or per-group lists of their bounds
RATIO_SCHEDULERS = ("WarmupCosineLR",)
BOUND_SCHEDULERS = ("WarmupLR", "WarmupDecayLR")


@dataclass(frozen=True)
class LrScales:
    """``--lr-image-scale``, ``--lr-text-scale``, ``--layer-decay``."""

    image: float = 1.0
    text: float = 1.0
    layer_decay: float = 1.0

    @property
    def uniform(self) -> bool:
        return self.image == self.text == self.layer_decay == 1.0

    def of(self, tower: str, layer: int, layers: int) -> float:
        """The rate multiplier of layer ``layer`` of ``layers`` in ``tower`` (``image``, ``text``, ``other``)."""
        if tower == "other":
            return 1.0
        return (self.image if tower == "image" else self.text) * self.layer_decay ** (layers + 1 - layer)


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip's rule: no decay for gains, biases, embeddings' 1-D tensors and the logit scale and bias."""
    return param.ndim < 2 or "bias" in name or "norm" in name or "ln_" in name or "logit_" in name


def param_groups(model: nn.Module, scales: LrScales = LrScales(), base_lr: float | None = None) -> list[dict]:
    """The optimizer's groups of ``model``'s trainable parameters; ``base_lr``: the JSON's optimizer lr, which the
    scaled groups' ``lr`` multiplies (needed unless ``scales.uniform``)."""
    from bmc_fast.model.tower_groups import layer_id

    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if scales.uniform:
        decay = [p for name, p in trainable if not no_weight_decay(name, p)]
        no_decay = [p for name, p in trainable if no_weight_decay(name, p)]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    if base_lr is None:
        raise ValueError("param_groups: scaled groups need base_lr, the optimizer's lr")
    image_layers, text_layers = model.cfg.vision.layers, model.cfg.text.num_hidden_layers
    groups: dict[tuple, dict] = {}
    for name, param in trainable:
        tower, layer, layers = layer_id(name, image_layers, text_layers)
        skip_decay = no_weight_decay(name, param)
        key = (tower, layer, skip_decay)
        if key not in groups:
            scale = scales.of(tower, layer, layers)
            groups[key] = {"params": [], "lr": base_lr * scale, "lr_scale": scale,
                           "name": f"{tower}.{layer}{'.no_decay' if skip_decay else ''}",
                           **({"weight_decay": 0.0} if skip_decay else {})}
        groups[key]["params"].append(param)
    return list(groups.values())


def group_scales(groups: list[dict]) -> list[float]:
    return [group.get("lr_scale", 1.0) for group in groups]


def check_schedule_takes_scales(ds_config: dict[str, Any], scales: LrScales) -> None:
    """Refuse scales the JSON's scheduler would overwrite with one rate for every group (before any model)."""
    scheduler = (ds_config.get("scheduler") or {}).get("type")
    if scales.uniform or scheduler is None or scheduler in RATIO_SCHEDULERS + BOUND_SCHEDULERS:
        return
    raise ConfigError(f"--lr-image-scale / --lr-text-scale / --layer-decay: {FLAG}'s scheduler {scheduler} sets one "
                      f"rate for every parameter group; use one of {RATIO_SCHEDULERS + BOUND_SCHEDULERS}, or drop "
                      "the scales")


def with_group_schedule(ds_config: dict[str, Any], groups: list[dict]) -> dict[str, Any]:
    """The DeepSpeed JSON whose ``WarmupLR`` / ``WarmupDecayLR`` bounds are per-group lists scaled by each group's
    ``lr_scale`` (DeepSpeed broadcasts a scalar bound to every group); other schedulers read the groups' lr."""
    scheduler = ds_config.get("scheduler") or {}
    if scheduler.get("type") not in BOUND_SCHEDULERS or all(s == 1.0 for s in group_scales(groups)):
        return ds_config
    config = copy.deepcopy(ds_config)
    params = config["scheduler"].setdefault("params", {})
    for bound in ("warmup_min_lr", "warmup_max_lr"):
        if isinstance(params.get(bound), (int, float)):
            params[bound] = [params[bound] * scale for scale in group_scales(groups)]
    return config


def log_groups(groups: list[dict], base_lr: float | None) -> None:
    """One line per group at start: its parameters, rate scale and weight decay."""
    for i, group in enumerate(groups):
        n = sum(p.numel() for p in group["params"])
        decay = group.get("weight_decay", "the JSON's")
        lr = f"lr × {group['lr_scale']:.4g} = {group['lr']:.3g}" if "lr_scale" in group else \
            f"lr {base_lr:.3g}" if base_lr is not None else "the JSON's lr"
        _logger.info("param group %d %s: %d tensors, %.3fM parameters, %s, weight decay %s", i,
                     group.get("name", ("decay", "no_decay")[i] if i < 2 else ""), len(group["params"]), n / 1e6,
                     lr, decay)


def lock_towers(model, cfg) -> None:
    """``--lock-image`` / ``--lock-text``: freeze the towers before the optimizer sees their parameters (frozen ones
    join no group, so the optimizer holds no state for them and ZeRO partitions none)."""
    for tower, locked, unlocked, flag in (
            ("image", cfg.lock_image, cfg.lock_image_unlocked_groups, "--lock-image-unlocked-groups"),
            ("text", cfg.lock_text, cfg.lock_text_unlocked_layers, "--lock-text-unlocked-layers")):
        if not locked:
            continue
        getattr(model, f"lock_{tower}")(unlocked, flag)
        module = model.visual if tower == "image" else model.text
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        _logger.info("%s tower locked: %s", tower, "every parameter frozen, run without a graph" if not trainable
                     else f"the last {unlocked} group(s) train, {trainable / 1e6:.3f}M parameters")


def schedule_lr(engine) -> float:
    """The schedule's learning rate at this step (a scaled group's rate over its ``lr_scale``)."""
    group = engine.optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)
