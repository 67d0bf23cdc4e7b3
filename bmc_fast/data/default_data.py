"""The embedded default dataset: synthetic shards and a tokenizer trained on them, generated once.

Generated into ``$BMC_FAST_CACHE`` (default ``~/.cache/bmc_fast``) under a file lock, so concurrent
ranks wait for one writer; a finished cache is marked by ``done.json`` and reused.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from bmc_fast.data import synthetic
from bmc_fast.data.samples import CAPTION_EXTENSION
from bmc_fast.data.tar_samples import read_tar_samples
from bmc_fast.data.text_tokenizer import train_tokenizer

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefaultData:
    train: str  # shard pattern
    eval: str  # shard pattern
    tokenizer: str  # Hugging Face tokenizer directory


def cache_root() -> Path:
    return Path(os.environ.get("BMC_FAST_CACHE", Path.home() / ".cache" / "bmc_fast"))


def ensure_default_data(seed: int = 0, root: str | Path | None = None, **sizes: int) -> DefaultData:
    """Return the embedded dataset for ``seed``, generating it first if the cache lacks it. ``sizes``
    (``n_train``, ``n_eval``: ``synthetic.generate``'s) make a smaller one, for tests and ``make gpu-check``:
    the cache keeps whichever was generated first."""
    from filelock import FileLock

    root = Path(root) if root is not None else cache_root()
    out = root / f"synthetic-v{synthetic.VERSION}-seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{out.name}.lock")):
        done = out / "done.json"
        if not done.is_file():
            shutil.rmtree(out, ignore_errors=True)  # a half-written cache from a killed run
            _logger.info("generating the embedded synthetic dataset into %s (once)", out)
            manifest = synthetic.generate(out, seed=seed, **sizes)
            train_tokenizer(shard_captions(out / "train"), out / "tokenizer")
            done.write_text(json.dumps(manifest, indent=2))
        manifest = json.loads(done.read_text())
    return DefaultData(train=manifest["train"], eval=manifest["eval"], tokenizer=str(out / "tokenizer"))


def shard_captions(directory: Path):
    """The caption of every sample in ``directory``'s shards, in order (the tokenizer's corpus)."""
    for shard in sorted(directory.glob("*.tar")):
        for sample in read_tar_samples(shard):
            if CAPTION_EXTENSION in sample:
                yield sample[CAPTION_EXTENSION].decode()
