"""Places in the PIL loader's sample stream, and how the places of one cut continue under another.

The training stream is cut by rank and DataLoader worker (``pil_loader.epoch_shards``): a **cut** is
``Cut(rank, world_size, worker, workers)``, and the samples one cut reads in an epoch come in an order that depends
on (seed, epoch, rank, worker) alone. A worker's **place** is a dict::

    {"rank", "world_size", "worker", "workers",  # its cut
     "epoch", "consumed",                        # its own stream: raw samples of that epoch consumed
     "inherited": [segment, ...]}                # other cuts' unfinished epochs, read first

and a **segment** ``[rank, world_size, worker, workers, epoch, consumed, stride, offset]`` is the rest of one epoch
of another cut's stream, from raw sample ``consumed`` on, of which this worker takes the samples whose index is
``offset`` modulo ``stride``.

A run resumed on another number of ranks or workers (``resplit``) finishes the epoch that every old worker was in
before the new cut starts its own: the old workers' unread samples become segments, dealt to the new workers
(whole, round robin, when there are at least as many segments as new workers; otherwise each segment is shared by
the new workers it falls to, every k-th sample each). Every sample of that epoch is therefore read exactly once, as
in an uninterrupted run; a worker whose share ends first starts the next epoch early.
"""
from __future__ import annotations

from typing import Any, NamedTuple

Place = dict[str, Any]


class Cut(NamedTuple):
    rank: int
    world_size: int
    worker: int
    workers: int


def start_place(cut: Cut) -> Place:
    """The place of a worker that has read nothing."""
    return {**cut._asdict(), "epoch": 0, "consumed": 0, "inherited": []}


def resplit(places: list[Place], cut: Cut) -> Place:
    """Where the worker ``cut`` starts when the stream was last cut another way and its workers were at ``places``
    (every old worker's, from every old rank; see the module docstring)."""
    own_first = max((p["epoch"] + (p["consumed"] > 0) for p in places), default=0)  # the new cut's first epoch
    segments: list[list[int]] = []
    for p in sorted(places, key=lambda p: (p["rank"], p["worker"])):
        segments += [list(s) for s in p.get("inherited", [])]
        old = [p["rank"], p["world_size"], p["worker"], p["workers"]]
        segments += [[*old, epoch, p["consumed"] if epoch == p["epoch"] else 0, 1, 0]
                     for epoch in range(p["epoch"], own_first)]
    me, total = cut.rank * cut.workers + cut.worker, cut.world_size * cut.workers
    if total <= len(segments):
        mine = segments[me::total]
    elif segments:  # more workers than segments: segment s is shared by the workers me ≡ s (mod len)
        *old, epoch, consumed, stride, offset = segments[me % len(segments)]
        sharing = len(range(me % len(segments), total, len(segments)))
        mine = [[*old, epoch, consumed, stride * sharing, offset + stride * (me // len(segments))]]
    else:
        mine = []
    return {**cut._asdict(), "epoch": own_first, "consumed": 0, "inherited": mine}


def loader_places(loader_state: dict, rank: int, world_size: int, workers: int) -> list[Place]:
    """Every worker's place in a torchdata ``StatefulDataLoader`` state over a ``ShardStream`` of ``rank``; a worker
    that had read nothing yet has the start place."""
    if "_snapshot" in loader_state:  # worker processes
        snapshots = loader_state["_snapshot"]["_worker_snapshots"]
        states = [snapshots[f"worker_{worker}"]["dataset_state"] for worker in range(workers)]
    else:  # read in the main process
        states, workers = [loader_state["dataset_state"]], 1
    return [state or start_place(Cut(rank, world_size, worker, workers)) for worker, state in enumerate(states)]
