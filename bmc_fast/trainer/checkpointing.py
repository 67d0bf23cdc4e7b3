"""Checkpoints of a run: DeepSpeed's engine state plus every rank's data-stream state (``rank_state``), written so
that ``checkpoints/latest`` names a checkpoint only once every rank's part is on disk (``stream_resume`` reads the
rank states back).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from bmc_fast.checkpoint.run_dir import RunDir, checkpoint_tag
from bmc_fast.trainer import rank_state

_logger = logging.getLogger(__name__)


@dataclass
class Checkpointer:
    """Where this rank writes its checkpoints, and what it records beside DeepSpeed's files: how its data stream is
    cut (``split``: a saved place continues exactly only under the same cut) and the batch plan."""

    run: RunDir
    rank: int
    keep: int  # --keep-checkpoints: the newest this many stay (0: all)
    split: dict[str, Any]  # loader, rank, world size, workers, micro batch
    batch: dict[str, int]  # the run's BatchPlan: a resume on other ranks keeps its global batch
    last_saved: str | None = None  # tag of the last checkpoint this run wrote (or resumed from)

    def save(self, engine, step: int, stream_state: dict[str, Any]) -> str:
        """A DeepSpeed checkpoint of ``step`` with this rank's ``stream_state`` beside it; ``latest`` moves to it
        once every rank has written its part, and no rank goes on before it has. Returns the tag."""
        tag, started = checkpoint_tag(step), time.perf_counter()
        # DeepSpeed would write `latest` from rank 0 before the other ranks finish their shards: we do it after
        engine.save_checkpoint(str(self.run.checkpoints), tag=tag, client_state={"step": step}, save_latest=False)
        rank_state.write(rank_state.rank_state_path(self.run.checkpoints / tag, self.rank),
                         {**stream_state, "split": self.split, "batch": self.batch})
        torch.distributed.barrier()
        if self.rank == 0:  # every rank's part of `tag` is on disk
            self.run.write_latest(tag)
            if deleted := self.run.prune_checkpoints(self.keep):
                _logger.info("--keep-checkpoints %d: deleted %s", self.keep, ", ".join(deleted))
        torch.distributed.barrier()  # no rank goes on (or resumes) before `latest` names the new checkpoint
        if self.rank == 0:
            _logger.info("checkpoint %s saved in %.2f s", tag, time.perf_counter() - started)
        self.last_saved = tag
        return tag
