"""A run's data: its loaders and training stream, the caption tokens its context throws away, and the samples it
skipped."""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from bmc_fast.data.samples import SKIP_KINDS
from bmc_fast.data.select_loader import build_loader
from bmc_fast.data.shard_fetch import REMOTE_PREFIXES, SHARD_SKIP
from bmc_fast.trainer import rank_state
from bmc_fast.trainer.distributed import log_rank_layout
from bmc_fast.trainer.prepare import Prepared
from bmc_fast.trainer.sample_audit import SampleAudit, drop_steps_after
from bmc_fast.trainer.stream_resume import StreamStart, stream_start

_logger = logging.getLogger(__name__)


@dataclass
class TrainStream:
    """This rank's training batches: the loader (its ``state_dict()`` is the stream's place, ``rank_state``), the
    endless iterator over it, the seed it was built with, the samples it skipped so far (PIL loader) and, with
    ``--audit-samples``, the file its samples are written to."""

    loader: Any
    seed: int
    batches: Iterator[dict]  # iter(loader), or what a StepHooks.batches made of it
    skipped: Counter = field(default_factory=Counter)
    audit: SampleAudit | None = None

    def next(self) -> dict:
        batch = next(self.batches)
        self.skipped.update(batch["skipped"])
        if self.audit is not None:
            self.audit.add(batch)
        return batch

    def end_step(self, step: int) -> None:
        if self.audit is not None:
            self.audit.write(step)

    def state(self, skipped_steps: list[int]) -> dict[str, Any]:
        """What a checkpoint keeps of this stream (and the RNG states and the guard's skipped steps)."""
        return rank_state.capture(self.loader, data_seed=self.seed, skipped=self.skipped, skipped_steps=skipped_steps)


def open_train_stream(p: Prepared, device: torch.device, half: bool, first_step: int, split: dict[str, Any],
                      resumed_tag: str | None) -> tuple[TrainStream, Any, list[int]]:
    """(this rank's training stream, the eval loader or None, the steps the NaN guard skipped so far): new, or
    continued from checkpoint ``resumed_tag`` (``stream_resume``: exactly, re-split, or a new epoch), with its
    ``--audit-samples`` file."""
    # A stream that cannot continue must not replay the batches and augmentations of steps 1, 2, ...: its loaders
    # and RNG start from a seed that moves with the step.
    fresh_seed = p.cfg.seed + first_step - 1
    begin = (stream_start(p.run.checkpoints / resumed_tag, split, fresh_seed, p.plan.global_batch) if resumed_tag
             else StreamStart(fresh_seed))
    torch.manual_seed(begin.data_seed)
    train, evaluation = make_loaders(p, device, half, begin.data_seed, begin.resplit_from)
    if begin.exact:
        train.load_state_dict(begin.loader_state)  # before iter(): an iterator starts where its loader is
        rank_state.restore_rng(begin.rng)
    audit = None
    if p.cfg.audit_samples:
        if p.env.rank == 0:
            drop_steps_after(p.run.audit, first_step - 1)
        torch.distributed.barrier()  # before any rank appends
        audit = SampleAudit(p.run.audit, p.env.rank)
    return TrainStream(train, begin.data_seed, iter(train), begin.skipped, audit), evaluation, begin.skipped_steps


def make_loaders(p: Prepared, device: torch.device, half: bool, seed: int, resplit_from: list[dict] | None = None):
    """(train loader, eval loader or None) of the kind ``--loader`` chose; eval batches reach every rank whole.
    ``resplit_from``: the PIL stream's old places (``stream_resume``)."""
    cfg, env = p.cfg, p.env
    common = dict(kind=cfg.loader, tokenizer=p.tokenizer, context_length=p.model_cfg.context_length,
                  image_size=p.model_cfg.vision.image_size, batch_size=p.plan.micro_batch, workers=cfg.workers,
                  device_id=None if device.type == "cpu" else env.local_rank, half=half)
    train = build_loader(p.train_urls, train=True, rank=env.rank, world_size=env.world_size, seed=seed,
                         resplit_from=resplit_from, mixture=p.mixture, **common)
    evaluation = build_loader(p.eval_urls, train=False, **common) if p.eval_urls else None
    if cfg.loader == "dali":  # as the pipeline was built
        placement = f"DALI shard_id {train.split['rank']} of {train.split['world_size']}, device_id {train.device_id}"
    elif cfg.loader == "dali-stream":
        placement = f"stream shard {env.rank} of {env.world_size}, DALI device_id {train.device_id}"
    else:
        placement = f"PIL shard {env.rank} of {env.world_size}"
    log_rank_layout(env, device, placement)
    return train, evaluation


def log_token_waste(p: Prepared) -> None:
    """Rank 0: how many caption tokens this run's context length throws away (first 2,000 captions)."""
    from bmc_fast.data.token_stats import shard_waste

    if all(url.startswith(REMOTE_PREFIXES) for url in p.train_urls):
        _logger.info("caption tokens: not measured (remote shards; python -m bmc_fast.data.token_stats reads "
                     "local copies)")
        return
    context = p.model_cfg.context_length
    stats = shard_waste(p.train_urls, p.tokenizer, sorted({77, context}), max_texts=2000)  # local shards only
    waste = ", ".join(f"{row['waste_pct']:.1f}% of tokens beyond {row['cutoff']} ({row['truncated_pct']:.1f}% of "
                      "captions truncated)" for row in stats["cutoffs"])
    _logger.info("caption tokens: mean %.1f, median %.0f over %d captions; %s", stats["mean"], stats["median"],
                 stats["n_texts"], waste)


def total_skips(skipped: Counter, loader: str, urls: list[str], device: torch.device) -> dict[str, int]:
    """Samples skipped by kind, summed over ranks (PIL and dali-stream: counted while reading, with the shards that
    could not be fetched; DALI: by the index scan)."""
    if loader == "dali":
        from bmc_fast.data.index import index_skips

        return index_skips(urls)
    kinds = (*SKIP_KINDS, SHARD_SKIP)
    counts = torch.tensor([skipped[kind] for kind in kinds], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(counts)  # on the training device: NCCL takes no CPU tensors
    return {kind: int(n) for kind, n in zip(kinds, counts.tolist()) if n}
