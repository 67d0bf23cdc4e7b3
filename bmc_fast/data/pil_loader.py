"""WebDataset + PIL loader: image-caption shards -> ready (pixels, input_ids, attention_mask) batches.

Training: every epoch the shards are reshuffled with a seed shared by all ranks, then split by rank and
by DataLoader worker, so within an epoch every shard is read by exactly one worker of one rank; the
stream repeats epochs forever (the trainer stops at ``max_steps``). A worker's samples pass a shuffle
buffer seeded by (seed, epoch, rank, worker), are checked and decoded (``bmc_fast.data.samples``: every
image kind to RGB; a broken sample is skipped and counted by kind, never raised) and augmented with a
generator seeded by their place in that order (RandomResizedCrop, scale (0.9, 1.0) as open_clip; no
flip, because captions state laterality), then batched and tokenised in the workers. Evaluation: every
sample once, in order.

The order is therefore a function of (seed, epoch, rank, worker) alone, and a worker's place in it is
two numbers: its epoch and the samples of that epoch it has consumed. ``ShardStream`` is ``Stateful``:
torchdata's ``StatefulDataLoader`` collects those numbers from every worker with each batch, and a
resumed stream re-reads the epoch's tar members up to that place without decoding them. Each batch
carries ``"skipped"``: the skip counts since the previous batch of its worker (a batch is held back
until the next one is full, so skips at the end of a bounded stream are not lost).
"""
from __future__ import annotations

import logging
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count

import torch
from torch.utils.data import IterableDataset, get_worker_info

from bmc_fast.data.samples import SampleError, check_sample
from bmc_fast.data.tar_samples import wds_tar_samples
from bmc_fast.data.text_tokenizer import tokenize_captions
from bmc_fast.data.transforms import image_transform
from bmc_fast.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)


@dataclass
class Collate:
    """Stack images and tokenise captions: truncate to ``context_length``, pad to the batch's longest."""

    tokenizer: object
    context_length: int

    def __call__(self, samples: list[tuple[torch.Tensor, str]], skipped: dict[str, int] | None = None) -> dict:
        images, captions = zip(*samples)
        return {
            "pixels": torch.stack(images),  # (B, 3, H, W) float32
            # input_ids (B, L <= context_length) int64, attention_mask (B, L) 1 = real token
            **tokenize_captions(self.tokenizer, captions, self.context_length),
            "skipped": dict(skipped or {}),  # {skip kind: samples skipped since this worker's previous batch}
        }


def epoch_shards(urls: list[str], epoch: int, *, rank: int, world_size: int, worker: int, workers: int, seed: int,
                 shuffle: bool) -> list[str]:
    """The shards one worker of one rank reads in ``epoch``: the epoch's order (the same on every rank),
    split by rank, then by worker."""
    urls = list(urls)
    if shuffle:
        random.Random(seed + epoch).shuffle(urls)
    return urls[rank::world_size][worker::workers]


def _worker() -> tuple[int, int]:
    """(this DataLoader worker's id, the number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class ShardStream(IterableDataset):
    """Batches of one rank (see the module docstring); ``state_dict`` / ``load_state_dict`` give and take
    one worker's place in its stream: ``{"epoch", "consumed", "worker", "workers", "rank", "world_size"}``."""

    def __init__(self, urls: list[str], *, collate: Collate, transform: Callable, batch_size: int, train: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, epochs: int | None = None,
                 shuffle_buffer: int = 1000):
        super().__init__()
        self.urls, self.collate, self.transform, self.batch_size = list(urls), collate, transform, batch_size
        self.train, self.seed = train, seed
        self.rank, self.world_size = (rank, world_size) if train else (0, 1)  # eval: every rank sees all
        self.epochs = epochs if train else 1
        self.shuffle_buffer = shuffle_buffer
        self._state: dict | None = None  # the place after the last batch this worker yielded
        self._resume: dict | None = None  # a place to continue from, set by load_state_dict

    def state_dict(self) -> dict:
        return dict(self._state or {})

    def load_state_dict(self, state: dict) -> None:
        worker, workers = _worker()
        where = dict(worker=worker, workers=workers, rank=self.rank, world_size=self.world_size)
        saved = {key: state.get(key) for key in where}
        if saved != where:
            raise ConfigError(f"data stream state of {saved} cannot continue as {where}: resume with the same "
                              "ranks and --workers (or start the stream anew)")
        self._resume = state

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        start, resumed = self._resume or {"epoch": 0, "consumed": 0}, self._resume is not None
        self._resume = None
        place = dict(worker=worker, workers=workers, rank=self.rank, world_size=self.world_size)
        rows, skipped, held = [], Counter(), None  # held: (batch, its place), yielded once the next is full
        delivered = int(resumed)  # good samples so far (a resumed stream had some)
        epochs = count(start["epoch"]) if self.epochs is None else range(start["epoch"], self.epochs)
        for epoch in epochs:
            shards = epoch_shards(self.urls, epoch, rank=self.rank, world_size=self.world_size, worker=worker,
                                  workers=workers, seed=self.seed, shuffle=self.train)
            first = start["consumed"] if epoch == start["epoch"] else 0
            seen = 0
            for index, sample in enumerate(self._epoch_samples(shards, epoch, worker)):
                seen += 1
                if index < first:
                    continue  # consumed before the resume: read, never decoded
                try:
                    image, caption = check_sample(sample)
                except SampleError as error:
                    skipped[error.kind] += 1
                    _logger.debug("skipping %s from %s: %s", sample.get("__key__"), sample.get("__url__"), error)
                    continue
                delivered += 1
                rows.append((self._augment(image, epoch, worker, index), caption))
                if len(rows) == self.batch_size:
                    if held is not None:
                        yield self._deliver(held)
                    held = (self.collate(rows, skipped), {**place, "epoch": epoch, "consumed": index + 1})
                    rows, skipped = [], Counter()
            if not delivered and self.train and self.epochs is None:  # an endless stream would wait forever
                raise DataError(f"all {seen} sample(s) of a full pass over {len(shards)} shard(s) "
                                f"{sorted(shards)[:5]} were skipped, none good (skipped {dict(skipped)}): these "
                                "shards hold no usable sample; python -m bmc_fast.data.index SHARDS --report "
                                "REPORT.json shows why")
        if rows and (not self.train or self.epochs is not None):
            if held is not None:
                yield self._deliver(held)
            held = (self.collate(rows, skipped), {**place, "epoch": self.epochs, "consumed": 0})
            skipped = Counter()
        if held is not None:
            held[0]["skipped"] = dict(Counter(held[0]["skipped"]) + skipped)
            yield self._deliver(held)

    def _deliver(self, held: tuple[dict, dict]) -> dict:
        batch, self._state = held
        return batch

    def _epoch_samples(self, shards: list[str], epoch: int, worker: int) -> Iterator[dict]:
        """Raw samples of one epoch in this worker's order: its shards' samples through a seeded buffer."""
        import webdataset as wds

        samples = wds_tar_samples({"url": url} for url in shards)
        if not self.train:
            return samples
        rng = random.Random(hash((self.seed, epoch, self.rank, worker)))  # ints hash the same in every process
        return wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)(samples)

    def _augment(self, image, epoch: int, worker: int, index: int) -> torch.Tensor:
        """The transform under a torch generator seeded by the sample's place: the same crop whatever ran
        before (a resumed stream), and the caller's RNG untouched."""
        if not self.train:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, self.rank, worker, index)) & 0xFFFF_FFFF_FFFF)
            return self.transform(image)


def make_loader(urls: list[str], tokenizer, *, context_length: int, image_size: int, batch_size: int,
                train: bool, rank: int = 0, world_size: int = 1, workers: int = 1, seed: int = 0,
                shuffle_buffer: int = 1000, epochs: int | None = None,
                transform: Callable | None = None):
    """A torchdata ``StatefulDataLoader`` of batch dicts (see ``Collate``) over a ``ShardStream``.

    Train batches are always full and the stream repeats forever, unless ``epochs`` bounds it (then the
    last batch may be partial); eval batches keep the remainder and every rank sees all samples.
    ``transform`` (RGB PIL image -> (3, S, S) tensor) replaces ``image_transform(image_size, train)``.
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    if train and len(urls) < world_size * max(workers, 1):
        raise ConfigError(f"--train-data has {len(urls)} shard(s) but {world_size} rank(s) × {max(workers, 1)} "
                          "worker(s) each need one: write more, smaller shards or lower --workers")
    stream = ShardStream(urls, collate=Collate(tokenizer, context_length), batch_size=batch_size, train=train,
                         transform=transform or image_transform(image_size, train), rank=rank,
                         world_size=world_size, seed=seed, epochs=epochs, shuffle_buffer=shuffle_buffer)
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.14
        warnings.filterwarnings("ignore", "'set_vital' is deprecated", UserWarning)
        return StatefulDataLoader(stream, batch_size=None, num_workers=workers,
                                  persistent_workers=train and workers > 0)
