"""Run output: console logging set up once per process, metrics to JSONL and TensorBoard on rank 0."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

LOG_FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"


def setup_logging(rank: int, verbose_all_ranks: bool = False) -> None:
    """INFO on rank 0, WARNING elsewhere (unless ``verbose_all_ranks``); called once from a ``main``."""
    level = logging.INFO if rank == 0 or verbose_all_ranks else logging.WARNING
    logging.basicConfig(level=level, format=LOG_FORMAT.format(rank=rank), force=True)
    for noisy in ("DeepSpeed", "deepspeed"):  # DeepSpeed logs every step at INFO
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


class MetricsWriter:
    """Appends ``{"step": s, "time": t, **scalars}`` to ``metrics.jsonl`` and TensorBoard; no-op off rank 0."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self._tb = None
        self._file = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._file = open(run_dir / "metrics.jsonl", "a")
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{f"{prefix}/{k}": v for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in scalars.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()
