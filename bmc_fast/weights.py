"""Image-tower weights from local checkpoints: open_clip (``visual.*``, as DFN-2B ships) or timm names.

The tower keeps open_clip's parameter names, so an open_clip state dict loads after stripping
``visual.``; a timm ``vit_large_patch14_clip_224`` state dict is renamed back (the inverse of timm's
``_convert_openai_clip``). Missing, unexpected or misshapen keys are errors that list them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from bmc_fast.errors import ConfigError

_logger = logging.getLogger(__name__)

# timm name -> open_clip name, applied in order to each key (inverse of timm's _convert_openai_clip).
_TIMM_TO_OPEN_CLIP = (
    ("patch_embed.proj.", "conv1."),
    ("blocks.", "transformer.resblocks."),
    ("norm_pre.", "ln_pre."),
    (".norm1.", ".ln_1."),
    (".norm2.", ".ln_2."),
    (".attn.qkv.", ".attn.in_proj_"),
    (".attn.proj.", ".attn.out_proj."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
)


def read_state_dict(path: str | Path, flag: str = "image_weights") -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch checkpoint (``state_dict`` / ``model`` nesting unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {str(path)!r} is not a file: pass a local .safetensors/.pt/.bin checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"{flag} {str(path)!r} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """'open_clip' (full CLIP, ``visual.*``), 'open_clip_visual' (tower only) or 'timm'."""
    if any(k.startswith("visual.") for k in state):
        return "open_clip"
    if "patch_embed.proj.weight" in state:
        return "timm"
    if "conv1.weight" in state:
        return "open_clip_visual"
    raise ConfigError("image_weights: neither an open_clip (visual.conv1.weight) nor a timm "
                      f"(patch_embed.proj.weight) ViT state dict; first keys: {sorted(state)[:5]}")


def open_clip_visual_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's state dict in open_clip names, from any supported layout."""
    layout = detect_layout(state)
    if layout == "open_clip":
        return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    if layout == "open_clip_visual":
        return dict(state)
    out = {}
    for key, value in state.items():
        if key == "cls_token":
            out["class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            out["positional_embedding"] = value.reshape(value.shape[-2], value.shape[-1])
        elif key == "head.weight":
            out["proj"] = value.T
        elif key == "head.bias":
            if value.abs().max() > 0:
                raise ConfigError("image_weights: the timm head has a non-zero bias, which a CLIP projection cannot "
                                  "hold; load with image_proj='linear' after removing head.* from the checkpoint")
        elif key.startswith("norm."):
            out["ln_post." + key.removeprefix("norm.")] = value
        else:
            for old, new in _TIMM_TO_OPEN_CLIP:
                key = key.replace(old, new)
            out[key] = value
    return out


def load_image_weights(visual: nn.Module, path: str | Path, image_proj: str = "pretrained") -> None:
    """Load ``path`` into ``visual`` (a ``VisionTransformer``); ``image_proj='linear'`` keeps the fresh projection."""
    raw = read_state_dict(path)
    layout = detect_layout(raw)
    state = open_clip_visual_state(raw)
    if image_proj == "linear":
        state.pop("proj", None)
    expected = visual.state_dict()
    missing = sorted(set(expected) - set(state) - ({"proj"} if image_proj == "linear" else set()))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or misshapen:
        raise ConfigError(f"image_weights {str(path)!r} does not fit the image tower: missing {missing}, "
                          f"unexpected {unexpected}, wrong shape {misshapen}; check the preset's vision config")
    visual.load_state_dict(state, strict=image_proj != "linear")
    _logger.info("image tower: loaded %d tensors from %s (%s layout, projection %s)", len(state), path, layout,
                 image_proj)
