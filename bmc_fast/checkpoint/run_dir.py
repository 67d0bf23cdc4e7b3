"""The layout of a run directory, written by the trainer and read by evaluation: spelled out once here."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def checkpoint_tag(step: int) -> str:
    """The DeepSpeed checkpoint tag of ``step``: ``step0000006``."""
    return f"step{step:07d}"


def tag_step(tag: str) -> int | None:
    """The step of a ``checkpoint_tag``, or None for a tag this trainer did not write."""
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else None


class RunDir:
    """Paths inside one run directory (building one creates and reads nothing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.json"  # resolved train / model / DeepSpeed config, batch, versions
        self.tokenizer = self.path / "tokenizer"  # the tokenizer the run used (save_pretrained)
        self.metrics = self.path / "metrics.jsonl"  # one JSON line per log step and per evaluation
        self.tensorboard = self.path / "tensorboard"  # the same scalars for TensorBoard
        self.checkpoints = self.path / "checkpoints"  # DeepSpeed checkpoints, one folder per checkpoint_tag
        self.latest = self.checkpoints / "latest"  # names the newest tag (DeepSpeed writes it)
        self.summary = self.path / "summary.json"  # final loss, throughput, retrieval, skipped samples
        self.eval = self.path / "eval.json"  # what python -m bmc_fast.eval.retrieval measured (default)
        self.audit = self.path / "audit"  # --audit-samples: each rank's samples of each step

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def is_run(self) -> bool:
        """Whether a run was started here (its ``config.json`` exists)."""
        return self.config.is_file()

    def next_resume_config(self) -> Path:
        """``config.resume-N.json`` for the N-th resume, now starting (``config.json`` keeps the original)."""
        return self.path / f"config.resume-{len(list(self.path.glob('config.resume-*.json'))) + 1}.json"

    def latest_tag(self) -> str | None:
        """The tag ``checkpoints/latest`` names, or None before the first checkpoint."""
        return self.latest.read_text().strip() if self.latest.is_file() else None

    def write_latest(self, tag: str) -> None:
        """Point ``checkpoints/latest`` at ``tag`` atomically (a new file renamed over the old one): a kill
        at any moment leaves it naming either the previous complete checkpoint or this one."""
        tmp = self.latest.with_name("latest.tmp")
        with open(tmp, "w") as sink:
            sink.write(tag)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, self.latest)

    def checkpoint_tags(self) -> list[str]:
        """This trainer's checkpoint tags on disk, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        tags = [p.name for p in self.checkpoints.iterdir() if p.is_dir() and tag_step(p.name) is not None]
        return sorted(tags, key=tag_step)

    def prune_checkpoints(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` checkpoints, never the one ``latest`` names; returns the deleted."""
        latest = self.latest_tag()
        old = [tag for tag in self.checkpoint_tags()[:-keep] if tag != latest] if keep > 0 else []
        for tag in old:
            shutil.rmtree(self.checkpoints / tag)
        return old

    def read_config(self) -> dict[str, Any]:
        """The run's original resolved config (``config.json``)."""
        return json.loads(self.config.read_text())
