"""WebDataset + PIL loader: image-caption shards -> ready (pixels, input_ids, attention_mask) batches.

Training: every epoch the shards are reshuffled with a seed shared by all ranks, then split by rank and
by DataLoader worker, so within an epoch every shard is read by exactly one worker of one rank; the
stream repeats epochs forever (the trainer stops at ``max_steps``). A worker's samples pass a shuffle
buffer seeded by (seed, epoch, rank, worker), are checked and decoded (``bmc_fast.data.samples``: every
image kind to RGB; a broken sample is skipped and counted by kind, never raised) and augmented with a
generator seeded by their place in that order (RandomResizedCrop, scale (0.9, 1.0) as open_clip; no
flip, because captions state laterality), then batched and tokenised in the workers. Evaluation: every
sample once, in order. Remote shards (``http(s)://``, ``hf://``, ``s3://``, ``pipe:``) are fetched ahead into a
bounded local cache (``shard_fetch``); one that cannot be fetched is skipped and counted (``unreachable_shard``).
With ``decode=False`` the same stream hands encoded images and their crop windows to a DALI graph instead
(``bmc_fast.dali_pipelines.stream_loader``).

The order is therefore a function of (seed, epoch, rank, worker) alone, and a worker's place in it is
two numbers: its epoch and the samples of that epoch it has consumed (``stream_places``). ``ShardStream`` is
``Stateful``: torchdata's ``StatefulDataLoader`` collects the places from every worker with each batch, and a
resumed stream re-reads the epoch's tar members up to that place without decoding them. Resumed under another cut
(ranks or workers), the stream first finishes the old workers' epoch, dealt over the new ones
(``stream_places.resplit``), so no sample of it is repeated or skipped. Each batch
carries ``"skipped"``: the skip counts since the previous batch of its worker (a batch is held back
until the next one is full, so skips at the end of a bounded stream are not lost).
"""
from __future__ import annotations

import contextlib
import logging
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count

import torch
from torch.utils.data import IterableDataset, get_worker_info

from bmc_fast.data.mixture import Mixture
from bmc_fast.data.samples import SampleError, check_encoded, check_sample
from bmc_fast.data.shard_fetch import FetchPolicy, FetchTally, fetched
from bmc_fast.data.stream_places import Cut, Place, resplit, start_place
from bmc_fast.data.tar_samples import wds_tar_samples
from bmc_fast.data.text_tokenizer import tokenize_captions
from bmc_fast.data.transforms import TRAIN_RATIO, TRAIN_SCALE, image_transform
from bmc_fast.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)


@dataclass
class Collate:
    """Stack images and tokenise captions: truncate to ``context_length``, pad to the batch's longest."""

    tokenizer: object
    context_length: int

    def __call__(self, samples: list[tuple[torch.Tensor, str, str, int]],
                 skipped: dict[str, int] | None = None) -> dict:
        """``samples``: (image, caption, sample id, epoch) each."""
        images, captions, ids, epochs = zip(*samples)
        return {
            "pixels": torch.stack(images),  # (B, 3, H, W) float32
            # input_ids (B, L <= context_length) int64, attention_mask (B, L) 1 = real token
            **tokenize_captions(self.tokenizer, captions, self.context_length),
            "skipped": dict(skipped or {}),  # {skip kind: samples skipped since this worker's previous batch}
            "keys": list(ids),  # "<shard url>#<key>" of each row (sample_id), for --audit-samples
            "epochs": list(epochs),  # the epoch each row was read in
        }


@dataclass
class EncodedCollate(Collate):
    """``Collate`` for rows a DALI graph decodes (``ShardStream(decode=False)``): the images stay encoded, each with
    its RandomResizedCrop window (``"encoded"``: bytes, ``"windows"``: (left, top, width, height) each)."""

    def __call__(self, samples: list[tuple[tuple[bytes, tuple], str, str, int]],
                 skipped: dict[str, int] | None = None) -> dict:
        rows, captions, ids, epochs = zip(*samples)
        return {"encoded": [data for data, _ in rows], "windows": [window for _, window in rows],
                **tokenize_captions(self.tokenizer, captions, self.context_length), "skipped": dict(skipped or {}),
                "keys": list(ids), "epochs": list(epochs)}


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
    one worker's place in its stream (``stream_places``: its cut, epoch, samples consumed, inherited segments).
    ``resplit_from``: every worker's place when the stream was last cut another way (a run resumed on another number
    of ranks or workers): the stream first finishes their epoch (``stream_places.resplit``)."""

    def __init__(self, urls: list[str], *, collate: Collate, transform: Callable, batch_size: int, train: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, epochs: int | None = None,
                 shuffle_buffer: int = 1000, resplit_from: list[Place] | None = None, mixture: Mixture | None = None,
                 fetch: FetchPolicy | None = None, decode: bool = True):
        super().__init__()
        self.urls, self.collate, self.transform, self.batch_size = list(urls), collate, transform, batch_size
        self.mixture = mixture if train else None
        self.train, self.seed = train, seed
        self.rank, self.world_size = (rank, world_size) if train else (0, 1)  # eval: every rank sees all
        self.epochs = epochs if train else 1
        self.shuffle_buffer = shuffle_buffer
        self._state: Place | None = None  # the place after the last batch this worker yielded
        self._resume: Place | None = None  # a place to continue from, set by load_state_dict
        self._resplit_from = resplit_from
        self.fetch = fetch or FetchPolicy()  # remote shards (shard_fetch)
        self.decode = decode  # False: rows keep the encoded image and its crop window, for DALI (EncodedCollate)
        self._fetches = FetchTally()  # shards that could not be fetched, counted by shard_fetch

    def _cut(self) -> Cut:
        return Cut(self.rank, self.world_size, *_worker())

    def _start(self) -> Place:
        """Where this worker's next iteration starts."""
        if self._resume is not None:
            return {"inherited": [], **self._resume}  # places saved before segments existed have none
        if self._resplit_from is not None:
            return resplit(self._resplit_from, self._cut())
        return start_place(self._cut())

    def state_dict(self) -> Place:
        return dict(self._state or self._start())

    def load_state_dict(self, state: Place) -> None:
        where = self._cut()._asdict()
        saved = {key: state.get(key) for key in where}
        if saved != where:
            raise ConfigError(f"data stream state of {saved} cannot continue as {where}: resume with the same "
                              "ranks and --workers (or start the stream anew)")
        self._resume = state

    def __iter__(self) -> Iterator[dict]:
        place = self._start()
        resumed = place["epoch"] > 0 or place["consumed"] > 0 or bool(place["inherited"])
        self._resume = self._resplit_from = None
        rows, skipped, held = [], Counter(), None  # held: (batch, its place), yielded once the next is full
        delivered = int(resumed)  # good samples so far (a resumed stream had some)
        for sample, origin, after in self._samples_from(place):
            if sample is None:  # a full pass over this worker's own shards ended
                if not delivered and self.train and self.epochs is None:  # an endless stream would wait forever
                    raise DataError(f"all {origin[0]} sample(s) of a full pass over {len(origin[1])} shard(s) "
                                    f"{sorted(origin[1])[:5]} were skipped, none good (skipped {dict(skipped)}): these "
                                    "shards hold no usable sample; python -m bmc_fast.data.index SHARDS --report "
                                    "REPORT.json shows why")
                continue
            skipped.update(self._fetches.skipped)
            self._fetches.skipped.clear()
            try:
                row = self._row(sample, origin)
            except SampleError as error:
                skipped[error.kind] += 1
                _logger.debug("skipping %s from %s: %s", sample.get("__key__"), sample.get("__url__"), error)
                continue
            delivered += 1
            rows.append((*row, sample_id(sample), origin[0]))
            if len(rows) == self.batch_size:
                if held is not None:
                    yield self._deliver(held)
                held = (self.collate(rows, skipped), after)
                rows, skipped = [], Counter()
        if rows and (not self.train or self.epochs is not None):
            if held is not None:
                yield self._deliver(held)
            held = (self.collate(rows, skipped), {**self._cut()._asdict(), "epoch": self.epochs, "consumed": 0,
                                                   "inherited": []})
            skipped = Counter()
        if held is not None:
            held[0]["skipped"] = dict(Counter(held[0]["skipped"]) + skipped + self._fetches.skipped)
            self._fetches.skipped.clear()
            yield self._deliver(held)

    def _row(self, sample: dict, origin: tuple[int, int, int, int]) -> tuple:
        """(pixels, caption), or with ``decode=False`` ((image bytes, crop window), caption); ``SampleError`` for a
        sample to skip."""
        if self.decode:
            image, caption = check_sample(sample)
            return self._augment(image, origin), caption
        data, caption, size = check_encoded(sample)
        return (data, self._crop_window(size, origin)), caption

    def _crop_window(self, size: tuple[int, int], origin: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """(left, top, width, height) of the sample's RandomResizedCrop (torchvision's ``get_params`` under the
        generator ``_augment`` seeds); the whole image for evaluation."""
        from torchvision import transforms as T

        width, height = size
        if not self.train:
            return 0, 0, width, height
        with self._seeded(origin):
            shape_only = torch.empty(1, 1, 1).expand(1, height, width)  # get_params reads the shape alone
            top, left, h, w = T.RandomResizedCrop.get_params(shape_only, list(TRAIN_SCALE), list(TRAIN_RATIO))
        return left, top, w, h

    def _samples_from(self, place: Place) -> Iterator[tuple[dict | None, tuple, Place]]:
        """(raw sample, its origin (epoch, rank, worker, index), the place after it) from ``place`` on: the inherited
        segments, then this worker's own epochs; (None, (samples, shards), place) after each full own epoch."""
        cut, inherited = self._cut(), place["inherited"]
        for k, (rank, world_size, worker, workers, epoch, first, stride, offset) in enumerate(inherited):
            old = Cut(rank, world_size, worker, workers)
            for index, sample in self._epoch_samples(old, epoch, first):
                if index % stride == offset:
                    yield sample, (epoch, rank, worker, index), {
                        **place, "inherited": [[*old, epoch, index + 1, stride, offset], *inherited[k + 1:]]}
        own = {**cut._asdict(), "inherited": []}
        epochs = count(place["epoch"]) if self.epochs is None else range(place["epoch"], self.epochs)
        for epoch in epochs:
            first, seen = place["consumed"] if epoch == place["epoch"] else 0, 0
            for index, sample in self._epoch_samples(cut, epoch, first):
                seen = index + 1
                yield sample, (epoch, cut.rank, cut.worker, index), {**own, "epoch": epoch, "consumed": index + 1}
            yield None, (seen, self._shards(cut, epoch)), own

    def _deliver(self, held: tuple[dict, Place]) -> dict:
        batch, self._state = held
        return batch

    def _shards(self, cut: Cut, epoch: int) -> list[str]:
        urls = self.mixture.epoch_shards(epoch, self.seed) if self.mixture else self.urls
        return epoch_shards(urls, epoch, rank=cut.rank, world_size=cut.world_size, worker=cut.worker,
                            workers=cut.workers, seed=self.seed, shuffle=self.train)

    def _epoch_samples(self, cut: Cut, epoch: int, first: int) -> Iterator[tuple[int, dict]]:
        """(index, raw sample) of one epoch of ``cut``'s stream from index ``first`` on: its shards' samples through a
        seeded buffer; the samples before ``first`` are read (the buffer needs them), never decoded."""
        import webdataset as wds

        samples = wds_tar_samples(fetched(self._shards(cut, epoch), self.fetch, self._fetches))
        if self.train:
            rng = random.Random(hash((self.seed, epoch, cut.rank, cut.worker)))  # ints hash the same in every process
            samples = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)(samples)
        return ((index, sample) for index, sample in enumerate(samples) if index >= first)

    def _augment(self, image, origin: tuple[int, int, int, int]) -> torch.Tensor:
        """The transform under a torch generator seeded by the sample's origin (epoch, rank, worker, index): the same
        crop whatever ran before (a resumed stream), and the caller's RNG untouched."""
        if not self.train:
            return self.transform(image)
        with self._seeded(origin):
            return self.transform(image)

    @contextlib.contextmanager
    def _seeded(self, origin: tuple[int, int, int, int]):
        """torch's generator seeded by the sample's origin for the block, the caller's RNG state restored after."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, *origin)) & 0xFFFF_FFFF_FFFF)
            yield


def sample_id(sample: dict) -> str:
    """``<shard url>#<key>``: a sample's name in ``--audit-samples`` files, the same for both loaders."""
    return f"{sample.get('__url__')}#{sample.get('__key__')}"


def make_loader(urls: list[str], tokenizer, *, context_length: int, image_size: int, batch_size: int,
                train: bool, rank: int = 0, world_size: int = 1, workers: int = 1, seed: int = 0,
                shuffle_buffer: int = 1000, epochs: int | None = None,
                transform: Callable | None = None, resplit_from: list[Place] | None = None,
                mixture: Mixture | None = None, fetch: FetchPolicy | None = None, decode: bool = True):
    """A torchdata ``StatefulDataLoader`` of batch dicts (see ``Collate``) over a ``ShardStream``.

    Train batches are always full and the stream repeats forever, unless ``epochs`` bounds it (then the
    last batch may be partial); eval batches keep the remainder and every rank sees all samples.
    ``transform`` (RGB PIL image -> (3, S, S) tensor) replaces ``image_transform(image_size, train)``;
    ``resplit_from``: see ``ShardStream``; ``mixture``: train on these weighted sources (``bmc_fast.data.mixture``)
    instead of ``urls`` alone; ``fetch``: how remote shards are fetched (``shard_fetch``); ``decode=False``: batches of
    encoded images and crop windows for a DALI graph (``EncodedCollate``).
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    shards = len(mixture.epoch_shards(0, seed)) if train and mixture else len(urls)
    if train and shards < world_size * max(workers, 1):
        raise ConfigError(f"--train-data has {shards} shard(s) an epoch but {world_size} rank(s) × {max(workers, 1)} "
                          "worker(s) each need one: write more, smaller shards or lower --workers")
    collate = (Collate if decode else EncodedCollate)(tokenizer, context_length)
    stream = ShardStream(urls, collate=collate, batch_size=batch_size, train=train,
                         transform=transform or image_transform(image_size, train), rank=rank,
                         world_size=world_size, seed=seed, epochs=epochs, shuffle_buffer=shuffle_buffer,
                         resplit_from=resplit_from, mixture=mixture, fetch=fetch, decode=decode)
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.14
        warnings.filterwarnings("ignore", "'set_vital' is deprecated", UserWarning)
        return StatefulDataLoader(stream, batch_size=None, num_workers=workers,
                                  persistent_workers=train and workers > 0)
