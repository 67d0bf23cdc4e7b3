"""What rank 0 writes into the run directory besides checkpoints and metrics: ``config.json`` and the tokenizer at
the start (a resumed run records its own resolved config beside the original), ``summary.json`` at the end."""
from __future__ import annotations

import dataclasses
import json
import shutil
from typing import Any

import torch

from bmc_fast.trainer.prepare import Prepared


def write_run_dir(p: Prepared) -> None:
    """Rank 0 (re)creates the run directory and writes config.json and the tokenizer; all ranks wait."""
    if p.env.rank == 0:
        if p.cfg.overwrite and p.run.path.exists():
            shutil.rmtree(p.run.path)
        p.run.path.mkdir(parents=True, exist_ok=True)
        p.tokenizer.save_pretrained(str(p.run.tokenizer))
        # the original stays; each resume records its own resolved config beside it
        path = p.run.next_resume_config() if p.cfg.resume else p.run.config
        path.write_text(json.dumps(resolved_config(p), indent=2))
    torch.distributed.barrier()


def resolved_config(p: Prepared) -> dict[str, Any]:
    """What ``config.json`` holds: the train, model and DeepSpeed configs as resolved, the batch, versions."""
    import deepspeed
    import transformers

    return {
        "train": dataclasses.asdict(p.cfg),
        "model": p.model_cfg.to_dict(),
        "deepspeed": p.ds_config,
        "batch": dataclasses.asdict(p.plan),
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "transformers": transformers.__version__},
    }


def write_summary(p: Prepared, summary: dict[str, Any]) -> None:
    """``summary.json``: the run's last metrics, skips and timing (rank 0)."""
    p.run.summary.write_text(json.dumps(summary, indent=2))
