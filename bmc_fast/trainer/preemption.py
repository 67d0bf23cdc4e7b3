"""Preemption: SIGUSR1 or SIGTERM stops every rank at the same optimizer step, with a checkpoint there.

A signal only sets a flag; the step in progress finishes. After each optimizer step the ranks agree with one
all-reduce (MAX) of their flags, so a signal that reached one rank stops all of them at that step. The loop then
saves a checkpoint of the step (unless it just did), every rank waits at a barrier, and the run raises
``bmc_fast.errors.Preempted``: the CLI exits with ``EXIT_PREEMPTED`` (75, ``EX_TEMPFAIL``: "try again"), which a
batch script turns into a requeue (``scripts/slurm/``), and ``--resume auto`` continues exactly where it stopped.

Launchers: under SLURM, ``--signal=USR1@180`` (no ``B:``) signals every task, ``--signal=B:USR1@180`` only the batch
shell, which must forward it (the scripts trap it and ``kill -USR1`` the job step). DeepSpeed's launcher passes
SIGTERM on to its ranks (and SIGKILLs them 30 s later) but not SIGUSR1; when one rank exits non-zero it kills the
others, which is why no rank exits before the barrier after the save.
"""
from __future__ import annotations

import logging
import signal
import threading
import time

import torch

_logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignals:
    """Catches SIGUSR1 and SIGTERM (from the main thread; elsewhere it catches nothing, said in the log) until
    ``restore()``; ``agreed(device)`` is the signal any rank got, 0 when none (one all-reduce)."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.received = 0
        self.received_at = 0.0  # time.monotonic() of the first signal
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            _logger.warning("preemption: not on the main thread, so SIGUSR1/SIGTERM are not caught")
            return
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._catch)

    def _catch(self, signum, frame) -> None:
        if not self.received:
            self.received, self.received_at = signum, time.monotonic()  # no I/O in a handler: the loop logs

    def agreed(self, device: torch.device) -> int:
        if torch.distributed.get_world_size() == 1:  # nobody to agree with: no collective, no device sync
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
