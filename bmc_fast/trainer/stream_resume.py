"""How a resumed run's data stream continues from the rank states of its checkpoint (``rank_state``).

- The same cut (loader, ranks, workers, micro batch): every rank loads its own saved loader state and RNG states, and
  the run continues exactly as if never stopped.
- Another cut with the PIL or dali-stream loader (the same stream; resumed on another number of ranks, or with other
  ``--workers``): every rank reads
  all the old ranks' states and the stream finishes the old workers' epoch over the new cut
  (``bmc_fast.data.stream_places.resplit``): no sample of it is repeated or skipped. RNG states are seeded anew.
- Another cut with DALI: a DALI reader's saved state belongs to its own shard of the data and cannot be re-split, so
  the stream starts a new epoch on the new cut; the samples of the interrupted epoch not yet read are counted and
  logged, and are not seen in that epoch.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bmc_fast.trainer import rank_state

_logger = logging.getLogger(__name__)

STREAM_LOADERS = ("pil", "dali-stream")  # loaders whose state is a ShardStream's places (re-split on a new cut)


def _stream_workers(split: dict) -> int:
    """The ShardStream workers of a rank: --workers for PIL; dali-stream's one feeder (--workers are DALI threads)."""
    from bmc_fast.dali_pipelines.stream_loader import FEEDER_WORKERS

    return split["workers"] if split["loader"] == "pil" else FEEDER_WORKERS


@dataclass
class StreamStart:
    """Where this rank's training stream starts."""

    data_seed: int  # the seed its loader is built with
    loader_state: dict | None = None  # the same cut: this rank's saved loader state
    resplit_from: list[dict] | None = None  # PIL under a new cut: every old worker's place
    rng: dict | None = None  # the same cut: this rank's saved RNG states
    skipped: Counter = field(default_factory=Counter)  # samples skipped so far (by this rank)
    skipped_steps: list[int] = field(default_factory=list)  # steps the NaN guard skipped so far

    @property
    def exact(self) -> bool:
        return self.loader_state is not None


def stream_start(tag_dir: Path, split: dict[str, Any], fresh_seed: int, global_batch: int) -> StreamStart:
    """This rank's stream start from checkpoint ``tag_dir``, for a rank whose stream is cut as ``split`` (loader,
    rank, world size, workers, micro batch). ``fresh_seed``: the seed of a stream that cannot continue (it moves with
    the step, so a resumed run never replays steps 1, 2, ... ); ``global_batch``: pairs a step, to count what a
    DALI stream leaves unread."""
    rank, tag = split["rank"], tag_dir.name
    mine = rank_state.rank_state_path(tag_dir, rank)
    saved = rank_state.read(mine) if mine.is_file() else None
    if saved is not None and saved["split"] == split:
        if rank == 0:
            _logger.info("resumed the data stream, RNG states and skip counts of %s: the run continues exactly", tag)
        return StreamStart(saved["data_seed"], saved["loader"], None, saved["rng"], Counter(saved["skipped"]),
                           list(saved["skipped_steps"]))
    states = [rank_state.read(path) for path in sorted(tag_dir.glob("trainer_rank*.pt"))]
    if not states:
        _logger.warning("resumed run: checkpoint %s holds no data-stream state; the data is reshuffled with seed %d",
                        tag, fresh_seed)
        return StreamStart(fresh_seed)
    old = states[0]["split"]
    changed = {key: f"{old.get(key)} -> {value}" for key, value in split.items()
               if key != "rank" and old.get(key) != value}
    # skip counts stay whole: rank 0 carries the old ranks' sum
    skipped = sum((Counter(s["skipped"]) for s in states), Counter()) if rank == 0 else Counter()
    steps = list(states[0]["skipped_steps"])
    if old["loader"] == split["loader"] and split["loader"] in STREAM_LOADERS:
        from bmc_fast.data.stream_places import loader_places

        places = [place for s in states for place in loader_places(
            s["loader"], s["split"]["rank"], s["split"]["world_size"], _stream_workers(s["split"]))]
        if rank == 0:
            _logger.info("resumed the data stream of %s under a new cut (%s): the %d old stream(s) finish their epoch "
                         "over the new ranks and workers, no sample repeated or skipped; RNG states seeded anew",
                         tag, changed, len(places))
        return StreamStart(states[0]["data_seed"], None, places, None, skipped, steps)
    if rank == 0:
        why = (f"{split['loader']} cannot continue a {old['loader']} stream" if old["loader"] != split["loader"] else
               "a dali stream's state cannot be re-split")
        _logger.warning("resumed run: the data stream of %s was cut differently (%s) and %s: it starts a new epoch "
                        "with seed %d%s", tag, changed, why, fresh_seed,
                        _unread(old, tag_dir, global_batch) if old["loader"] == "dali" else "")
    return StreamStart(fresh_seed, None, None, None, skipped, steps)


def _unread(old: dict, tag_dir: Path, global_batch: int) -> str:
    """What the interrupted DALI epoch leaves unread: each old rank read its shard of the N good samples in order,
    ``step × micro batch × accumulation`` of them (DALI's FILL policy runs epochs back to back)."""
    from bmc_fast.checkpoint.run_dir import tag_step

    state = rank_state.read(rank_state.rank_state_path(tag_dir, 0))
    samples, step = state.get("epoch_samples"), tag_step(tag_dir.name)
    if not samples or step is None:
        return ""
    read = step * global_batch % samples
    return (f"; the interrupted epoch had {read} of its {samples} samples read (step {step} × {global_batch} pairs), "
            f"the other {samples - read} are not seen in that epoch")
