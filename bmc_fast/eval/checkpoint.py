"""A trained model from a run directory: fp32 weights consolidated from its DeepSpeed checkpoint (any
ZeRO stage; read with ``torch.load(weights_only=True)``, ``bmc_fast.zero_weights``), the run's tokenizer and
its model config. A run trained on Transformer Engine layers loads onto the torch layers (TE names mapped
back), so it evaluates on any device."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from bmc_fast.errors import ConfigError
from bmc_fast.model_config import ModelConfig
from bmc_fast.run_dir import RunDir


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
    from bmc_fast.model import BMCLongCLIP
    from bmc_fast.zero_weights import fp32_state_dict

    run = check_run(run_dir, tag, flag)
    model_cfg = ModelConfig.from_dict(run.read_config()["model"], source=str(run.config))
    tokenizer = load_tokenizer(run.tokenizer, flag=flag)
    state = fp32_state_dict(run.checkpoints, tag or run.latest_tag())
    if model_cfg.te_precision != "none":  # trained on TE layers: evaluate the same weights on torch layers
        from bmc_fast.te_swap import torch_state_from_te

        state = torch_state_from_te(state)
        model_cfg = dataclasses.replace(model_cfg, te_precision="none")
    model = BMCLongCLIP(model_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)  # lists persistent keys only
    if missing or unexpected:
        raise ConfigError(f"checkpoint in {str(run.checkpoints)!r} does not fit the run's model config: "
                          f"missing {missing}, unexpected {unexpected}")
    return model.eval(), tokenizer, model_cfg
