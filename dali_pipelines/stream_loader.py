"""DALI over streamed shards (``--loader dali-stream``): the PIL loader's stream, decoded and augmented by DALI.

DALI's own webdataset reader opens every shard and its index when the pipeline is built, so it reads local, indexed
shards only. Remote shards (``http(s)://``, ``hf://``, ``s3://``, ``pipe:``) therefore come through the PIL loader's
``ShardStream`` with ``decode=False``: one worker process per rank fetches shards ahead into a bounded cache
(``bmc_fast.data.shard_fetch``), shuffles, checks each sample cheaply (``samples.check_encoded``: names, caption, the
image's header and end marker), draws its RandomResizedCrop window with the generator the PIL loader would use, and
tokenises the captions. The encoded images and windows reach the DALI graph through ``fn.external_source``; DALI
decodes only the window (``fn.decoders.image_slice``; ``mixed`` on a GPU) and resizes, as ``augment.clip_augment``.

So the order, the windows, the skips (``unreachable_shard`` included) and the resume are the PIL stream's: the same
batches from a remote shard as from its local copy; ``state_dict`` is the worker's place as of the last batch handed
out (the graph holds no random state), which a resized run can re-split as it re-splits the PIL loader's.
Batches are the PIL loader's dicts (``pixels`` from DALI).
"""
from __future__ import annotations

import gc
import logging
from collections import deque

import numpy as np

from .pipeline import build_stream_pipeline

_logger = logging.getLogger(__name__)

FEEDER_WORKERS = 1  # fetching, tar parsing and header checks per rank: light next to decoding


class DaliStreamLoader:
    """Iterable of batch dicts: ``pil_loader.make_loader(decode=False)``'s stream through ``build_stream_pipeline``."""

    def __init__(self, urls: list[str], tokenizer, *, context_length: int, image_size: int, batch_size: int,
                 train: bool, rank: int = 0, world_size: int = 1, device_id: int | None = None, num_threads: int = 2,
                 seed: int = 0, epochs: int | None = None, half: bool = False, resplit_from: list[dict] | None = None,
                 mixture=None, fetch=None):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as error:
            raise ImportError("the DALI loader needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or use "
                              "--loader pil)") from error
        from bmc_fast.data.pil_loader import make_loader

        self.feeder = make_loader(urls, tokenizer, context_length=context_length, image_size=image_size,
                                  batch_size=batch_size, train=train, rank=rank, world_size=world_size,
                                  workers=FEEDER_WORKERS, seed=seed, epochs=epochs, resplit_from=resplit_from,
                                  mixture=mixture, fetch=fetch, decode=False)
        self.graph = dict(image_size=image_size, train=train, batch_size=batch_size, num_threads=num_threads,
                          device_id=device_id, half=half)
        self.device_id = device_id
        self._state: dict | None = None  # the feeder's state as of the last batch handed out
        _logger.info("DALI stream loader on %s: %d shard(s), rank %d of %d, %s", "cpu" if device_id is None else
                     f"cuda:{device_id} (mixed decode)", len(urls), rank, world_size,
                     "train (endless, shuffled)" if train and epochs is None else "one pass per epoch")

    def state_dict(self) -> dict:
        return self._state if self._state is not None else self.feeder.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.feeder.load_state_dict(state)
        self._state = None

    def __iter__(self):
        # The feeder forks its worker here. A DALI pipeline left for the garbage collector (one in a reference cycle,
        # e.g. held by an exception's traceback) must go first: a forked process that collects its copy of one hangs
        # or aborts in the pipeline's shutdown, as DALI's threads do not exist there.
        gc.collect()
        feeder = self.feeder
        batches, fed = iter(feeder), deque()  # fed: (batch, feeder state) in the order DALI takes them

        def source():
            batch = next(batches)  # StopIteration ends DALI's epoch
            fed.append((batch, feeder.state_dict()))
            left_top = [np.array(w[:2], dtype=np.float32) for w in batch["windows"]]
            width_height = [np.array(w[2:], dtype=np.float32) for w in batch["windows"]]
            return [np.frombuffer(data, dtype=np.uint8) for data in batch["encoded"]], left_top, width_height

        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe = build_stream_pipeline(source, **self.graph)
        outputs = DALIGenericIterator(pipe, ["pixels"], last_batch_policy=LastBatchPolicy.PARTIAL)
        try:
            for out in outputs:
                batch, self._state = fed.popleft()
                yield {"pixels": out[0]["pixels"], **{key: value for key, value in batch.items()
                                                       if key not in ("encoded", "windows")}}
        finally:
            # The pipeline reaches the feeder only through `source`'s cells, and is freed by the garbage collector
            # (DALI's objects hold cycles), which may close the feeder iterator's queues before the iterator itself:
            # its worker then never hears the shutdown and is killed 5 s later. Cut those references here, so that
            # the feeder goes with this loader, in order.
            batches = feeder = None
