"""What a checkpoint holds per rank beside DeepSpeed's files: everything the rest of the run depends on.

``checkpoints/<tag>/trainer_rank<r>.pt``: the data stream's place (the loader's ``state_dict``: DALI's
pipeline checkpoint, or torchdata's ``StatefulDataLoader`` state over ``ShardStream``), how the stream was
cut and the run's batch plan, the seed the stream was built with, the Python, NumPy and torch (CPU and CUDA)
RNG states, the samples this rank skipped and the steps the NaN guard skipped so far (``stream_resume`` reads
them back). Plain types and tensors only: read back with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rank_state_path(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"trainer_rank{rank:05d}.pt"


def saved_world_size(tag_dir: Path) -> int | None:
    """How many ranks wrote ``tag_dir`` (None for a checkpoint without rank states)."""
    return len(list(Path(tag_dir).glob("trainer_rank*.pt"))) or None


def capture(loader, *, data_seed: int, skipped: Counter, skipped_steps: list[int]) -> dict[str, Any]:
    """This rank's state now (``Checkpointer.save`` adds ``split``: how the stream was cut, kind, ranks, workers,
    micro batch; and ``batch``: the run's batch plan). ``epoch_samples``: a DALI loader's samples an epoch."""
    return {"loader": loader.state_dict(), "data_seed": data_seed, "rng": rng_states(), "skipped": dict(skipped),
            "skipped_steps": list(skipped_steps), "epoch_samples": getattr(loader, "epoch_samples", None)}


def write(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a kill leaves the old file or none, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def rng_states() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
