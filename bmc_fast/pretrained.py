"""``load_model``: a trained model, ready for ``encode_image`` / ``encode_text``, from an export or a run.

Weights load from safetensors only; a file that would run code when loaded is never unpickled.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bmc_fast.errors import ConfigError

_logger = logging.getLogger(__name__)


def load_model(path: str | Path, device: str = "cpu") -> tuple[Any, Any, Callable]:
    """(model in eval mode, tokenizer, eval image transform) from ``python -m bmc_fast.export``'s directory or
    a training run directory (its ``checkpoints/latest``).

    The tokenizer pads and truncates to the model's context: ``tokenizer(texts, padding="max_length",
    max_length=model.cfg.context_length, truncation=True, return_tensors="pt")``."""
    from bmc_fast.data.transforms import image_transform
    from bmc_fast.export import BMC_CONFIG_NAME, CONFIG_NAME

    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        model, tokenizer = _load_export(path)
    elif (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        from bmc_fast.eval.checkpoint import load_run

        model, tokenizer, _ = load_run(path)
    else:
        raise ConfigError(f"load_model: {str(path)!r} is neither an export ({CONFIG_NAME} and {BMC_CONFIG_NAME}, "
                          "from python -m bmc_fast.export) nor a run directory (config.json, checkpoints/)")
    _logger.info("loaded %s (%s)", path, "export" if (path / CONFIG_NAME).is_file() else "run")
    return model.to(device).eval(), tokenizer, image_transform(model.cfg.vision.image_size, train=False)


def _load_export(path: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from bmc_fast.data.text_tokenizer import load_tokenizer
    from bmc_fast.export import BMC_CONFIG_NAME, WEIGHTS_NAME, bmc_state_dict
    from bmc_fast.model import BMCLongCLIP
    from bmc_fast.model_config import ModelConfig

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
    model.load_state_dict(bmc_state_dict(state), strict=True)
    return model, load_tokenizer(path, flag="load_model")
