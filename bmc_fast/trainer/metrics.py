"""Run output: console logging set up once per process, metrics to JSONL and to TensorBoard and/or Weights & Biases
(``--report-to``) on rank 0.

A W&B run's id is kept in the run directory (``wandb_run_id``), so a resumed run logs to the same W&B run; its
charts use the training step (``trainer/step``) as x axis, so the steps a resume repeats are logged again, not
dropped as out of order.
"""
from __future__ import annotations

import json
import logging
import math
import time

from bmc_fast.checkpoint.run_dir import RunDir

LOG_FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"


def setup_logging(rank: int, verbose_all_ranks: bool = False) -> None:
    """INFO on rank 0, WARNING elsewhere (unless ``verbose_all_ranks``); called once from a ``main``."""
    level = logging.INFO if rank == 0 or verbose_all_ranks else logging.WARNING
    logging.basicConfig(level=level, format=LOG_FORMAT.format(rank=rank), force=True)
    for noisy in ("DeepSpeed", "deepspeed"):  # DeepSpeed logs every step at INFO
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


REPORTERS = ("tensorboard", "wandb")  # the legal parts of --report-to


class MetricsWriter:
    """Appends ``{"step": s, "time": t, **scalars}`` to ``metrics.jsonl`` and logs them to the ``report_to`` trackers;
    no-op off rank 0. ``wandb_init``: keyword arguments of ``wandb.init`` (project, config)."""

    def __init__(self, run: RunDir, enabled: bool, report_to: tuple[str, ...] = ("tensorboard",),
                 wandb_init: dict | None = None):
        self.enabled = enabled
        self._tb = None
        self._file = None
        self._wandb = None
        if enabled:
            self._file = open(run.metrics, "a")
            if "tensorboard" in report_to:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run.tensorboard))
            if "wandb" in report_to:
                self._wandb = _start_wandb(run, wandb_init or {})

    def write(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{f"{prefix}/{k}": v for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        finite = {f"{prefix}/{k}": v for k, v in scalars.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            for key, value in finite.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({**finite, "trainer/step": step})

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()


def _start_wandb(run: RunDir, init: dict):
    """``wandb.init`` of this run directory's W&B run: W&B's new id the first time, kept in ``wandb_run_id``; that id
    again (``resume="allow"``) when the run is resumed."""
    import wandb

    id_file = run.path / "wandb_run_id"
    known = {"id": id_file.read_text().strip(), "resume": "allow"} if id_file.is_file() else {}
    wandb_run = wandb.init(dir=str(run.path), name=run.path.name, **known, **init)
    id_file.write_text(wandb_run.id)
    run_id = wandb_run.id
    wandb_run.define_metric("trainer/step")
    wandb_run.define_metric("*", step_metric="trainer/step")
    logging.getLogger(__name__).info("Weights & Biases: run %s (project %s, mode %s)", run_id, wandb_run.project,
                                     wandb_run.settings.mode)
    return wandb_run


class ThroughputWindow:
    """Loss and throughput since the last read, summed over ranks when read (one small all-reduce).

    ``flops_fn(n_images, lengths) -> int`` gives a micro-batch's training FLOPs (``bmc_fast.model.flops``);
    with ``peak_flops`` (per rank) the window also reports MFU.
    """

    def __init__(self, device, global_batch: int, flops_fn=None, peak_flops: float | None = None):
        import torch

        self.device, self.global_batch = device, global_batch
        self.flops_fn, self.peak_flops = flops_fn, peak_flops
        self._loss = torch.zeros(2, device=device)  # finite losses: sum, count; on the device: no host sync per step
        self._counts = torch.zeros(3, dtype=torch.float64)  # real tokens, padded tokens, FLOPs
        self._steps = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        """Start timing from now (call after work that must not count, such as an evaluation)."""
        self._start = time.perf_counter()

    def add_micro_batch(self, loss, attention_mask) -> None:
        """Count a micro batch's tokens and FLOPs, and its loss unless None (contrastive accumulation
        takes one loss over a step's micro batches) or non-finite (a skipped step)."""
        import torch

        if loss is not None:
            finite = torch.isfinite(loss.detach())
            self._loss += torch.stack([torch.where(finite, loss.detach(), 0.0), finite.float()])
        mask = attention_mask  # on the CPU: counting is free
        lengths = mask.sum(dim=1).tolist()
        flops = self.flops_fn(mask.shape[0], lengths) if self.flops_fn else 0
        self._counts += torch.tensor([sum(lengths), mask.numel(), flops], dtype=torch.float64)

    def end_step(self) -> None:
        self._steps += 1

    def read(self) -> dict[str, float]:
        """``loss`` (mean over ranks of the finite losses; absent when none was), ``samples_per_s``, real
        ``tokens_per_s``, ``padding_fraction``; then starts a new window."""
        import torch

        totals = torch.cat([self._loss.double().cpu(), self._counts]).to(self.device)
        torch.distributed.all_reduce(totals)
        loss_sum, losses, real, padded, flops = totals.cpu().tolist()
        seconds = time.perf_counter() - self._start
        scalars = {"loss": loss_sum / losses} if losses else {}
        scalars.update(samples_per_s=self._steps * self.global_batch / seconds, tokens_per_s=real / seconds,
                       padding_fraction=1 - real / padded)
        if self.flops_fn:
            scalars["tflops"] = flops / seconds / 1e12  # all ranks together
            if self.peak_flops:
                scalars["mfu"] = flops / seconds / (self.peak_flops * torch.distributed.get_world_size())
        self._loss.zero_()
        self._counts.zero_()
        self._steps = 0
        self.restart_clock()
        return scalars
