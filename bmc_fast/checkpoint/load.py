"""A trained model, ready for ``encode_image`` / ``encode_text``: ``load_model`` from an export or a run directory,
``load_run`` from a run directory's DeepSpeed checkpoint.

A run's fp32 weights are consolidated from its ZeRO checkpoint (any stage; read with ``torch.load(weights_only=True)``,
``bmc_fast.checkpoint.zero_weights``); a run trained on Transformer Engine layers loads onto the torch layers (TE
names mapped back), so it evaluates on any device. An export's weights load from safetensors only: a file that
would run code when loaded is never unpickled. Nothing here writes; ``bmc_fast.checkpoint.export`` does.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bmc_fast.checkpoint.run_dir import RunDir
from bmc_fast.errors import ConfigError
from bmc_fast.model.config import ModelConfig

_logger = logging.getLogger(__name__)

# An export directory (python -m bmc_fast.export), as open_clip's local-dir: scheme reads it.
CONFIG_NAME = "open_clip_config.json"  # written last: its presence marks a finished export
WEIGHTS_NAME = "open_clip_model.safetensors"
BMC_CONFIG_NAME = "bmc_fast_config.json"  # the ModelConfig, so load_model rebuilds the same model


def load_model(path: str | Path, device: str = "cpu") -> tuple[Any, Any, Callable]:
    """(model in eval mode, tokenizer, eval image transform) from ``python -m bmc_fast.export``'s directory or
    a training run directory (its ``checkpoints/latest``).

    The tokenizer is open_clip's kind: ``tokenizer(list[str]) -> LongTensor(n, context_length)``, captions cleaned as
    the model was trained (``bmc_fast.data.text_tokenizer.CaptionTokenizer``); with keyword arguments it is the
    Hugging Face tokenizer, e.g. ``tokenizer(texts, padding="longest", return_tensors="pt")`` for the attention
    mask too."""
    from bmc_fast.data.transforms import image_transform

    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        model, tokenizer = load_export(path)
    elif (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        model, tokenizer, _ = load_run(path)
    else:
        raise ConfigError(f"load_model: {str(path)!r} is neither an export ({CONFIG_NAME} and {BMC_CONFIG_NAME}, "
                          "from python -m bmc_fast.export) nor a run directory (config.json, checkpoints/)")
    _logger.info("loaded %s (%s)", path, "export" if (path / CONFIG_NAME).is_file() else "run")
    return model.to(device).eval(), tokenizer, image_transform(model.cfg.vision.image_size, train=False)


def load_export(path: Path):
    """(model, tokenizer) of an export directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from bmc_fast.data.text_tokenizer import load_tokenizer
    from bmc_fast.model.clip import BMCLongCLIP
    from bmc_fast.model.state_dict_adapters import OpenClip

    if not (path / BMC_CONFIG_NAME).is_file():
        raise ConfigError(f"load_model: {str(path)!r} has no {BMC_CONFIG_NAME}: it was not written by "
                          "bmc_fast.export (load it with open_clip.create_model_and_transforms('local-dir:...'))")
    cfg = ModelConfig.from_dict(json.loads((path / BMC_CONFIG_NAME).read_text()), source=str(path / BMC_CONFIG_NAME))
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        raise ConfigError(f"load_model: {str(path)!r} has no {WEIGHTS_NAME}" + (
            f"; {pickles} are pickles, which can run code when loaded and are never read here: re-export "
            "with python -m bmc_fast.export" if pickles else ""))
    try:
        state = load_file(str(weights))
    except SafetensorError as error:
        raise ConfigError(f"load_model: {str(weights)!r} is not a safetensors file ({error}): re-export it, "
                          "a renamed pickle is never unpickled") from error
    model = BMCLongCLIP(cfg)
    model.load_state_dict(OpenClip.from_open_clip(state), strict=True)
    return model, load_tokenizer(path, flag="load_model", clean=cfg.text_clean, context_length=cfg.context_length)


def check_run(run_dir: str | Path, tag: str | None = None, flag: str = "run_dir") -> RunDir:
    """``run_dir`` as a ``RunDir`` if it holds a finished run (with the checkpoint ``tag``, when given: the CLIs'
    ``--tag``); otherwise ``ConfigError`` naming ``flag``, how the caller's command line names ``run_dir``
    (``--checkpoint`` in retrieval, the positional ``run_dir`` in export)."""
    run = RunDir(run_dir)
    if not run.is_run() or run.latest_tag() is None:
        raise ConfigError(f"{flag} {str(run.path)!r} is not a finished run directory (it needs config.json "
                          "and checkpoints/latest, as bmc_fast/train.py writes them)")
    if tag is not None and not (run.checkpoints / tag).is_dir():
        raise ConfigError(f"--tag {tag!r}: {flag} {str(run.path)!r} has no such checkpoint; its tags are "
                          f"{run.checkpoint_tags()}: pass one of them, or leave --tag out for the latest")
    return run


def load_run(run_dir: str | Path, tag: str | None = None, flag: str = "run_dir"):
    """(model in eval mode with fp32 weights, tokenizer, ModelConfig) from a training run directory;
    ``tag``: a checkpoint tag (default: the one ``checkpoints/latest`` names); ``flag``: how the caller's
    command line names ``run_dir`` in its errors (``check_run``)."""
    from bmc_fast.data.text_tokenizer import load_tokenizer
    from bmc_fast.model.clip import BMCLongCLIP

    run = check_run(run_dir, tag, flag)
    model_cfg = ModelConfig.from_dict(run.read_config()["model"], source=str(run.config))
    tokenizer = load_tokenizer(run.tokenizer, flag=flag, clean=model_cfg.text_clean,
                               context_length=model_cfg.context_length)
    state = run_state_dict(run, model_cfg, tag)
    model_cfg = dataclasses.replace(model_cfg, te_precision="none")  # TE-trained: the same weights on torch layers
    model = BMCLongCLIP(model_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)  # lists persistent keys only
    if missing or unexpected:
        raise ConfigError(f"checkpoint in {str(run.checkpoints)!r} does not fit the run's model config: "
                          f"missing {missing}, unexpected {unexpected}")
    return model.eval(), tokenizer, model_cfg


def run_state_dict(run: RunDir, model_cfg: ModelConfig, tag: str | None = None) -> dict[str, Any]:
    """The fp32 weights of a run's checkpoint ``tag`` (default: ``latest``) in torch-layer names (a run trained on
    Transformer Engine layers mapped back)."""
    from bmc_fast.checkpoint.zero_weights import fp32_state_dict
    from bmc_fast.model.state_dict_adapters import TransformerEngine

    state = fp32_state_dict(run.checkpoints, tag or run.latest_tag())
    return TransformerEngine.from_te(state) if model_cfg.te_precision != "none" else state
