"""DeepSpeed universal checkpoints: a ZeRO checkpoint of N ranks rewritten so that M ranks can load it.

A ZeRO checkpoint holds each rank's flat partition of the fp32 weights and Adam moments, cut for one number of
ranks. DeepSpeed's converter (``python -m deepspeed.checkpoint.ds_to_universal``, stages 1, 2 and 3) writes every
parameter's fp32 weights and optimizer states whole, one folder each (``<tag>_universal/zero/<name>/``), and an
engine whose JSON sets ``"checkpoint": {"load_universal": true}`` re-partitions them over its own ranks on load,
from the tag ``checkpoints/latest_universal`` names. The conversion is DeepSpeed's own command line, run in a
child process: its prints and worker pool stay out of the training process.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bmc_fast.errors import TrainingError

_logger = logging.getLogger(__name__)

LATEST_UNIVERSAL = "latest_universal"  # what DeepSpeed's load_checkpoint reads under load_universal


def universal_tag(tag: str) -> str:
    return f"{tag}_universal"


def convert_to_universal(checkpoints: Path, tag: str, workers: int | None = None) -> str:
    """Write ``checkpoints/<tag>_universal`` (once: a finished conversion is reused) and point
    ``checkpoints/latest_universal`` at it; returns its tag. ``workers``: DeepSpeed's extraction processes (default:
    this machine's cores, at most 8). A failed conversion raises ``TrainingError`` with the converter's output."""
    checkpoints = Path(checkpoints)
    out = checkpoints / universal_tag(tag)
    if not out.is_dir():
        started = time.perf_counter()
        partial = checkpoints / f"{out.name}.tmp"  # renamed once complete: a kill leaves no half conversion behind
        shutil.rmtree(partial, ignore_errors=True)
        workers = workers or min(8, os.cpu_count() or 1)
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(checkpoints / tag), "--output_folder", str(partial), "--inject_missing_state",
                   "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2))]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise TrainingError(f"DeepSpeed could not convert checkpoint {tag!r} to a universal checkpoint (exit "
                                f"{proc.returncode}): {proc.stderr.strip()[-2000:] or proc.stdout.strip()[-2000:]}; "
                                f"resume on the ranks that wrote it, or run: {' '.join(command)}")
        _logger.debug("ds_to_universal output:\n%s", proc.stdout)
        partial.rename(out)
        _logger.info("converted checkpoint %s to the universal checkpoint %s in %.1f s", tag, out.name,
                     time.perf_counter() - started)
    _write_atomically(checkpoints / LATEST_UNIVERSAL, out.name)  # the converter wrote the .tmp name
    return out.name


def remove_universal(checkpoints: Path, tag: str) -> None:
    """Delete ``<tag>_universal`` and ``latest_universal`` once every rank has loaded it: the run's next checkpoint
    is a plain one, and the conversion is as large as the checkpoint."""
    shutil.rmtree(Path(checkpoints) / universal_tag(tag), ignore_errors=True)
    (Path(checkpoints) / LATEST_UNIVERSAL).unlink(missing_ok=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
