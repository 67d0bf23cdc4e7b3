"""WebDataset + PIL loader: image-caption shards -> ready (pixels, input_ids, attention_mask) batches.

Training: shards are reshuffled every epoch with a seed shared by all ranks, then split by rank and
by DataLoader worker, so within an epoch every shard is read by exactly one worker of one rank; the
stream repeats epochs forever (the trainer stops at ``max_steps``). Samples are shuffled in a buffer,
decoded, augmented (RandomResizedCrop, scale (0.9, 1.0) as open_clip; no flip, because captions state
laterality), batched and tokenised in the workers. Evaluation: every sample once, in order.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = "png;jpg;jpeg;webp"


def image_transform(image_size: int, train: bool) -> Callable:
    """open_clip's transform: RGB, RandomResizedCrop(scale 0.9-1) or resize + centre crop, CLIP normalise."""
    from torchvision import transforms as T

    if train:
        resize = [T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC)]
    else:
        resize = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    return T.Compose([_to_rgb, *resize, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def _to_rgb(image):
    return image.convert("RGB")


@dataclass
class Collate:
    """Stack images and tokenise captions: truncate to ``context_length``, pad to the batch's longest."""

    tokenizer: object
    context_length: int

    def __call__(self, samples: list[tuple[torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        images, captions = zip(*samples)
        tokens = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.context_length,
                                return_tensors="pt")
        return {
            "pixels": torch.stack(images),  # (B, 3, H, W) float32
            "input_ids": tokens["input_ids"],  # (B, L <= context_length) int64
            "attention_mask": tokens["attention_mask"],  # (B, L) 1 = real token
        }


class EpochShardList(IterableDataset):
    """Yields ``{"url": shard}`` for this rank and worker; reshuffled each epoch, forever if ``repeat``."""

    def __init__(self, urls: list[str], rank: int = 0, world_size: int = 1, seed: int = 0, repeat: bool = True,
                 shuffle: bool = True):
        super().__init__()
        self.urls, self.rank, self.world_size = list(urls), rank, world_size
        self.seed, self.repeat, self.shuffle = seed, repeat, shuffle

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for epoch in itertools.count() if self.repeat else range(1):
            urls = list(self.urls)
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(urls)  # same order on every rank: disjoint splits
            for url in urls[self.rank::self.world_size][worker::workers]:
                yield {"url": url}


def make_loader(urls: list[str], tokenizer, *, context_length: int, image_size: int, batch_size: int,
                train: bool, rank: int = 0, world_size: int = 1, workers: int = 1, seed: int = 0,
                shuffle_buffer: int = 1000):
    """A ``webdataset.WebLoader`` of batch dicts (see ``Collate``).

    Train batches are always full; eval batches keep the remainder and every rank sees all samples.
    """
    import webdataset as wds

    if train and len(urls) < world_size * max(workers, 1):
        from bmc_fast.config import ConfigError

        raise ConfigError(f"--train-data has {len(urls)} shard(s) but {world_size} rank(s) × {max(workers, 1)} "
                          "worker(s) each need one: write more, smaller shards or lower --workers")
    shards = (EpochShardList(urls, rank, world_size, seed) if train
              else EpochShardList(urls, repeat=False, shuffle=False))
    stages = [shards, wds.tarfile_to_samples()]
    if train:
        # Reproducible for a given seed; workers and ranks differ anyway because they read other shards.
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed * 1000 + rank))
    stages += [
        wds.decode("pil"),
        wds.to_tuple(IMAGE_EXTENSIONS, "txt"),
        wds.map_tuple(image_transform(image_size, train), str.strip),
        wds.batched(batch_size, collation_fn=Collate(tokenizer, context_length), partial=not train),
    ]
    dataset = wds.DataPipeline(*stages)
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=train and workers > 0)

