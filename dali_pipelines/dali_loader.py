"""DALI loader: the pipeline's batches, tokenised on a host thread, as the PIL loader's batch dicts.

``{"pixels" (B, 3, S, S), "input_ids" (B, L), "attention_mask" (B, L), "skipped": {}, "keys": [...]}``: the same keys
and semantics as ``bmc_fast.data.pil_loader.make_loader``. Bad samples were dropped by the index scan
(``bmc_fast.data.index``); their counts are in the shards' ``.scan.json`` (``index.index_skips``).

Train: random shuffle, an endless stream of full batches (``LastBatchPolicy.FILL`` continues into the
next epoch, so nothing is dropped). Eval / ``epochs``: every sample of the rank's part exactly once
per epoch (``pad_last_batch`` + ``LastBatchPolicy.PARTIAL``), the last batch partial.

``state_dict()`` is DALI's own pipeline checkpoint (``enable_checkpointing``) as of the last batch handed
out, whatever the prefetch holds; ``load_state_dict`` rebuilds the pipeline from it, before iteration.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from bmc_fast.data.index import index_path, read_index
from bmc_fast.data.tar_samples import member_key
from bmc_fast.data.text_tokenizer import tokenize_captions
from bmc_fast.errors import ConfigError

from .pipeline import READER_NAME, build_pipeline

_logger = logging.getLogger(__name__)


class DaliLoader:
    """Iterable of batch dicts from ``build_pipeline``; tokenisation of batch i+1 overlaps batch i's use."""

    def __init__(self, shards: list[str], tokenizer, *, context_length: int, image_size: int, batch_size: int,
                 train: bool, rank: int = 0, world_size: int = 1, device_id: int | None = None, num_threads: int = 2,
                 seed: int = 0, epochs: int | None = None, flip: bool = False, half: bool = False):
        try:
            import nvidia.dali.plugin.pytorch  # noqa: F401
        except ImportError as error:
            raise ImportError("the DALI loader needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or use "
                              "--loader pil)") from error
        # a missing or mismatched index stops here, naming both files
        self.epoch_samples = sum(len(read_index(shard)) for shard in shards)  # good samples, all ranks
        self.tokenizer, self.context_length = tokenizer, context_length
        self.endless = train and epochs is None
        self.epochs = epochs
        self.split = {"rank": rank, "world_size": world_size, "batch_size": batch_size}  # rank = the shard_id
        self.device_id = device_id  # None: CPU; on a GPU node, the local rank

        self._pipeline = dict(shards=shards, index_paths=[str(index_path(s)) for s in shards], image_size=image_size,
                              train=train, batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                              rank=rank, world_size=world_size, seed=seed, pad_last_batch=not self.endless, flip=flip,
                              half=half)
        self._iterator = self._build()
        self._state: list[bytes] | None = None  # the pipeline's checkpoint as of the last batch handed out
        _logger.info("DALI loader on %s: %d shard(s), rank %d of %d, %s", "cpu" if device_id is None else
                     f"cuda:{device_id} (mixed decode)", len(shards), rank, world_size,
                     "train (endless, shuffled)" if self.endless else "one pass per epoch")

    def _build(self, checkpoint: bytes | None = None):
        """The pipeline's iterator. A method, not a closure over ``self``: a loader in a reference cycle would keep its
        pipeline until the garbage collector ran, and a DataLoader worker forked meanwhile that collects its copy
        aborts (DALI's threads do not exist there)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        shards, index_paths = self._pipeline["shards"], self._pipeline["index_paths"]
        pipe = build_pipeline(shards, index_paths, checkpoint=checkpoint,
                              **{k: v for k, v in self._pipeline.items() if k not in ("shards", "index_paths")})
        policy = LastBatchPolicy.FILL if self.endless else LastBatchPolicy.PARTIAL
        return DALIGenericIterator(pipe, ["pixels", "caption", "caption_len", "source", "source_len"],
                                   reader_name=READER_NAME, last_batch_policy=policy, auto_reset=True)

    def __len__(self) -> int:
        return len(self._iterator)

    def state_dict(self) -> dict:
        return {**self.split, "dali": self._state or self._iterator.checkpoints()}

    def load_state_dict(self, state: dict) -> None:
        saved = {key: state.get(key) for key in self.split}
        if saved != self.split:
            raise ConfigError(f"DALI stream state of {saved} cannot continue as {self.split}: resume with the same "
                              "ranks and batch size (or start the stream anew)")
        self._iterator = self._build(checkpoint=state["dali"][0])
        self._state = None

    def __iter__(self):
        # Fetching batch i+1 while batch i is in use is safe: DALI's dynamic executor (the default since
        # 2.0) hands tensors out by DLPack with reference-counted buffers (the eval test keeps them all).
        source = self._epochs()  # advanced only by the one pool thread
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
            pending = pool.submit(self._next_batch, source)
            while (fetched := pending.result()) is not None:
                pending = pool.submit(self._next_batch, source)
                batch, self._state = fetched
                yield batch

    def _epochs(self):
        # next(), never iter(): after a FILL epoch the iterator has already reset itself with the overflow
        # counted, and iter() would ask for a mid-epoch reset that DALI refuses with a warning every epoch.
        epoch = 0
        while self.endless or epoch < (self.epochs or 1):
            try:
                while True:
                    yield next(self._iterator)
            except StopIteration:  # auto_reset: the next pass starts with the next next()
                epoch += 1

    def _next_batch(self, source) -> tuple[dict, list[bytes]] | None:
        """(the next batch, the pipeline's checkpoint right after it), or None at the end."""
        outputs = next(source, None)
        if outputs is None:
            return None
        checkpoint = self._iterator.checkpoints()  # before the next batch is asked for: exactly this place
        out = outputs[0]
        captions = [text.strip() for text in _texts(out["caption"], out["caption_len"])]
        return {"pixels": out["pixels"], **tokenize_captions(self.tokenizer, captions, self.context_length),
                "skipped": {}, "keys": [_sample_id(info) for info in _texts(out["source"], out["source_len"])]}, \
            checkpoint


def _texts(padded, lengths) -> list[str]:
    """UTF-8 strings from a (B, L) uint8 batch zero-padded to its longest and their (B, 1) lengths."""
    raw = padded.cpu().numpy()
    return [bytes(raw[i, :n]).decode("utf-8") for i, n in enumerate(lengths.reshape(-1).tolist())]


def _sample_id(source_info: str) -> str:
    """``<shard>#<key>`` (as ``pil_loader.sample_id``) from DALI's webdataset ``source_info``:
    ``<shard>:<member offset>:<member name>``."""
    shard, _, member = source_info.rsplit(":", 2)
    return f"{shard}#{member_key(member)[0]}"
