"""Loading tower weights into a built ``BMCLongCLIP``: the only place in ``bmc_fast.model`` that reads files.

- ``load_image_weights``: an open_clip checkpoint (a whole CLIP with ``visual.*``, as DFN-2B ships, or the image
  tower alone) or a timm ``vit_large_patch14_clip_224`` one, ``.safetensors`` or a torch file
  (``weights_only=True``);
- ``load_text_weights``: a Hugging Face ``save_pretrained`` directory of ``ModernBertModel`` or
  ``ModernBertForMaskedLM`` (``config.json``, ``model.safetensors`` or its sharded index, or
  ``pytorch_model.bin``), checked against the preset's text config first.

Each reads the checkpoint into bmc-fast's names through its format's adapter
(``bmc_fast.model.state_dict_adapters``), checks it against the tower (missing, unexpected or misshapen keys are
errors that list them, in the checkpoint's names), and copies it in (into Transformer Engine names when the model
is built on TE layers).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn

from bmc_fast.errors import ConfigError
from bmc_fast.model.state_dict_adapters import ModernBert, OpenClip, State, Timm, TransformerEngine

_logger = logging.getLogger(__name__)

# ModernBertConfig attributes that fix the network a checkpoint was trained as: the run's config.json
# records the preset, and evaluation rebuilds from it, so every one must agree with the preset's.
_ARCH_ATTRIBUTES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "local_attention",
                    "layer_types", "rope_parameters", "hidden_activation", "norm_eps", "norm_bias", "attention_bias",
                    "mlp_bias", "max_position_embeddings", "vocab_size")


def read_state_dict(path: str | Path, flag: str = "image_weights") -> State:
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


def detect_layout(state: State) -> str:
    """'open_clip' (full CLIP, ``visual.*``), 'open_clip_visual' (tower only) or 'timm'."""
    if any(k.startswith("visual.") for k in state):
        return "open_clip"
    if "patch_embed.proj.weight" in state:
        return "timm"
    if "conv1.weight" in state:
        return "open_clip_visual"
    raise ConfigError("image_weights: neither an open_clip (visual.conv1.weight) nor a timm "
                      f"(patch_embed.proj.weight) ViT state dict; first keys: {sorted(state)[:5]}")


def load_image_weights(model: nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``model.visual``; the model config's ``image_proj='linear'`` keeps its fresh projection."""
    raw = read_state_dict(path)
    layout = detect_layout(raw)
    state = Timm.from_timm(raw) if layout == "timm" else OpenClip.from_open_clip(raw)
    if "visual.head.bias" in state:
        raise ConfigError("image_weights: the timm head has a non-zero bias, which a CLIP projection cannot hold; "
                          "load with image_proj='linear' after removing head.* from the checkpoint")
    state = {k: v for k, v in state.items() if k.startswith("visual.")}
    keep_fresh = {"visual.proj"} if model.cfg.image_proj == "linear" else set()
    state = {k: v for k, v in state.items() if k not in keep_fresh}
    missing, unexpected, misshapen = _compare(model, state, "visual.", keep_fresh)
    if missing or unexpected or misshapen:
        raise ConfigError(f"image_weights {str(path)!r} does not fit the image tower: missing {missing}, "
                          f"unexpected {unexpected}, wrong shape {misshapen}; check the preset's vision config")
    _copy_in(model, state)
    _logger.info("image tower: loaded %d tensors from %s (%s layout, projection %s)", len(state), path, layout,
                 model.cfg.image_proj)


def load_text_weights(model: nn.Module, directory: str | Path) -> None:
    """Load a ``save_pretrained`` ModernBERT directory into ``model.text.transformer``, after checking that it was
    trained as the network the preset describes."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"text_weights {str(directory)!r} has no config.json: pass a directory written by "
                          "save_pretrained (config.json + model.safetensors)")
    _check_text_architecture(directory, model.cfg.text)
    state = ModernBert.from_hf(read_hf_weights(directory))
    missing, unexpected, misshapen = _compare(model, state, "text.transformer.")
    if missing or unexpected or misshapen:
        raise ConfigError(f"text_weights {str(directory)!r}: missing keys {missing}, unexpected keys {unexpected}, "
                          f"mismatched {misshapen}")
    _copy_in(model, state)
    _logger.info("text tower: loaded ModernBertModel weights from %s", directory)


def read_hf_weights(directory: Path) -> State:
    """The tensors of a Hugging Face checkpoint directory: ``model.safetensors``, its sharded index, or (no
    safetensors at all) ``pytorch_model.bin`` read with ``weights_only=True``."""
    from safetensors.torch import load_file

    if (directory / "model.safetensors").is_file():
        return load_file(str(directory / "model.safetensors"))
    if (index := directory / "model.safetensors.index.json").is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(directory / shard)).items()}
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ConfigError(f"text_weights {str(directory)!r} has no model.safetensors (nor an index of shards, nor "
                      "pytorch_model.bin): pass a directory written by save_pretrained")


def _check_text_architecture(directory: Path, text_cfg) -> None:
    from transformers import AutoConfig, ModernBertConfig

    hf_config = AutoConfig.from_pretrained(str(directory))
    vocab_size = text_cfg.vocab_size if text_cfg.vocab_size is not None else hf_config.vocab_size
    preset = ModernBertConfig(**dataclasses.replace(text_cfg, vocab_size=vocab_size).to_hf_kwargs())
    differs = {a: (getattr(hf_config, a, None), getattr(preset, a, None)) for a in _ARCH_ATTRIBUTES}
    differs = {a: v for a, v in differs.items() if v[0] != v[1]}
    if differs:
        raise ConfigError(f"text_weights {str(directory)!r} does not match the preset's text config "
                          f"(checkpoint, preset): {differs}")


def load_torch_state(model: nn.Module, state: State) -> None:
    """Copy a whole state dict in torch-layer names (``BMCLongCLIP.state_dict()`` of a torch-layer model) into
    ``model``, whatever layers it was built with: every key must fit."""
    missing, unexpected, misshapen = _compare(model, state, "")
    if missing or unexpected or misshapen:
        raise ConfigError(f"the state dict does not fit the model: missing {missing}, unexpected {unexpected}, "
                          f"wrong shape {misshapen}")
    _copy_in(model, state)


def _torch_names(model: nn.Module) -> State:
    """The model's state dict in torch-layer names, whatever layers it was built with."""
    state = model.state_dict()
    return TransformerEngine.from_te(state) if model.cfg.te_precision != "none" else state


def _compare(model: nn.Module, state: State, prefix: str, fresh: set[str] = frozenset()):
    """(missing, unexpected, wrong shape) of ``state`` against the model's tensors under ``prefix``, named without
    the prefix (as the checkpoint names them)."""
    expected = {k: v for k, v in _torch_names(model).items() if k.startswith(prefix) and k not in fresh}
    short = len(prefix)
    missing = sorted(k[short:] for k in set(expected) - set(state))
    unexpected = sorted(k[short:] for k in set(state) - set(expected))
    misshapen = sorted(f"{k[short:]}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    return missing, unexpected, misshapen


def _copy_in(model: nn.Module, state: State) -> None:
    """Copy ``state`` (torch-layer names, already checked) into the model, in TE names where it has TE layers."""
    if model.cfg.te_precision != "none":
        state = TransformerEngine.to_te(state)
    own = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)
