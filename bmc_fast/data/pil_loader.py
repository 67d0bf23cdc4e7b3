"""WebDataset + PIL loader: image-caption shards -> ready (pixels, input_ids, attention_mask) batches.

Training: shards are reshuffled every epoch with a seed shared by all ranks, then split by rank and
by DataLoader worker, so within an epoch every shard is read by exactly one worker of one rank; the
stream repeats epochs forever (the trainer stops at ``max_steps``). Samples are shuffled in a buffer,
checked and decoded (``bmc_fast.data.samples``: every image kind to RGB; a broken sample is skipped and
counted by kind, never raised), augmented (RandomResizedCrop, scale (0.9, 1.0) as open_clip; no flip,
because captions state laterality), batched and tokenised in the workers. Evaluation: every sample
once, in order. Each batch carries ``"skipped"``: the skip counts since the previous batch of its worker
(a batch is held back until the next one is full, so skips at the end of a stream are not lost).
"""
from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import IterableDataset, get_worker_info

from bmc_fast.data.samples import SampleError, check_sample
from bmc_fast.data.tar_samples import wds_tar_samples
from bmc_fast.data.text_tokenizer import tokenize_captions
from bmc_fast.data.transforms import image_transform
from bmc_fast.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)

ALL_BAD_LIMIT = 10_000  # skips in a row before any good sample after which a worker gives up (backstop)

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


@dataclass
class FirstPass:
    """One worker's first pass over its shards: its sample count, and whether it has ended.

    Two stages share it: ``shards`` (after ``EpochShardList``) sees the second pass start, ``count``
    (after grouping, before the shuffle) counts the samples read until then.
    """

    samples: int = 0
    done: bool = False

    def shards(self, items):
        for item in items:
            self.done = self.done or item.get("epoch", 0) > 0  # every first-pass sample was counted
            yield item

    def count(self, samples):
        for sample in samples:
            self.samples += not self.done
            yield sample


@dataclass
class GuardedSamples:
    """Pipeline stage: raw WebDataset samples -> (transformed image, caption); bad ones skipped and counted."""

    transform: Callable
    first_pass: FirstPass | None = None  # set for an endless stream: stops it when no sample is good
    skipped: Counter = field(default_factory=Counter)
    delivered: int = 0
    bad_before_first: set = field(default_factory=set)  # (shard, key) of samples skipped before the first good one
    skipped_before_first: int = 0  # skips before the first good sample (for ALL_BAD_LIMIT)

    def __call__(self, samples):
        for sample in samples:
            try:
                image, caption = check_sample(sample)
            except SampleError as error:
                self.skipped[error.kind] += 1
                _logger.debug("skipping %s from %s: %s", sample.get("__key__"), sample.get("__url__"), error)
                self._check_not_all_bad(sample)
                continue
            self.delivered += 1
            self.bad_before_first.clear()
            yield self.transform(image), caption

    def _check_not_all_bad(self, sample: dict) -> None:
        """An endless stream over shards without one good sample would wait forever: stop it with a reason.

        Raised once every sample of the first pass over this worker's shards was skipped (exact: distinct
        (shard, key) pairs, so samples of the second pass that the shuffle mixed in count once), or after
        ``ALL_BAD_LIMIT`` skips in a row (a key that occurs twice in a shard never completes the first rule).
        """
        if self.delivered:
            return
        self.skipped_before_first += 1
        self.bad_before_first.add((sample.get("__url__"), sample.get("__key__")))
        whole_pass = (self.first_pass is not None and self.first_pass.done
                      and len(self.bad_before_first) >= self.first_pass.samples)
        if whole_pass or self.skipped_before_first >= ALL_BAD_LIMIT:
            shards = sorted({str(url) for url, _ in self.bad_before_first})
            what = (f"all {self.first_pass.samples} sample(s) of a full pass" if whole_pass
                    else f"{ALL_BAD_LIMIT} samples in a row")
            raise DataError(f"{what} over {len(shards)} shard(s) {shards[:5]} were skipped, none good (skipped so "
                            f"far {dict(self.skipped)}): these shards hold no usable sample; python -m "
                            "bmc_fast.data.index SHARDS --report REPORT.json shows why")


@dataclass
class BatchWithSkips:
    """Pipeline stage: batches of ``batch_size`` collated with the skips counted since the previous batch.

    One batch is held back until the next is complete, so skips after the last sample land in the last batch.
    """

    batch_size: int
    collate: Collate
    guard: GuardedSamples
    partial: bool

    def __call__(self, samples):
        held, rows = None, []
        for sample in samples:
            rows.append(sample)
            if len(rows) == self.batch_size:
                if held is not None:
                    yield held
                held, rows = self.collate(rows, self._take_skips()), []
        if rows and self.partial:
            if held is not None:
                yield held
            held = self.collate(rows, self._take_skips())
        if held is not None:
            late = self._take_skips()
            held["skipped"] = dict(Counter(held["skipped"]) + Counter(late))
            yield held

    def _take_skips(self) -> dict[str, int]:
        taken = dict(self.guard.skipped)
        self.guard.skipped.clear()
        return taken


class EpochShardList(IterableDataset):
    """Yields ``{"url": shard, "epoch": n}`` for this rank and worker; reshuffled each epoch, forever if
    ``epochs`` is None."""

    def __init__(self, urls: list[str], rank: int = 0, world_size: int = 1, seed: int = 0, epochs: int | None = None,
                 shuffle: bool = True):
        super().__init__()
        self.urls, self.rank, self.world_size = list(urls), rank, world_size
        self.seed, self.epochs, self.shuffle = seed, epochs, shuffle

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for epoch in itertools.count() if self.epochs is None else range(self.epochs):
            urls = list(self.urls)
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(urls)  # same order on every rank: disjoint splits
            for url in urls[self.rank::self.world_size][worker::workers]:
                yield {"url": url, "epoch": epoch}


def make_loader(urls: list[str], tokenizer, *, context_length: int, image_size: int, batch_size: int,
                train: bool, rank: int = 0, world_size: int = 1, workers: int = 1, seed: int = 0,
                shuffle_buffer: int = 1000, epochs: int | None = None,
                transform: Callable | None = None):
    """A ``webdataset.WebLoader`` of batch dicts (see ``Collate``).

    Train batches are always full and the stream repeats forever, unless ``epochs`` bounds it (then the
    last batch may be partial); eval batches keep the remainder and every rank sees all samples.
    ``transform`` (RGB PIL image -> (3, S, S) tensor) replaces ``image_transform(image_size, train)``.
    """
    import webdataset as wds

    if train and len(urls) < world_size * max(workers, 1):
        raise ConfigError(f"--train-data has {len(urls)} shard(s) but {world_size} rank(s) × {max(workers, 1)} "
                          "worker(s) each need one: write more, smaller shards or lower --workers")
    shards = (EpochShardList(urls, rank, world_size, seed, epochs=epochs) if train
              else EpochShardList(urls, epochs=1, shuffle=False))
    first_pass = FirstPass() if train and epochs is None else None  # only an endless stream can hang
    stages = ([shards, first_pass.shards, wds_tar_samples, first_pass.count] if first_pass
              else [shards, wds_tar_samples])
    if train:
        # Reproducible for a given seed; workers and ranks differ anyway because they read other shards.
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed * 1000 + rank))
    guard = GuardedSamples(transform or image_transform(image_size, train), first_pass)
    stages += [guard, BatchWithSkips(batch_size, Collate(tokenizer, context_length), guard,
                                     partial=not train or epochs is not None)]
    dataset = wds.DataPipeline(*stages)
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=train and workers > 0)

