"""The preemption flag in one process (the 2-rank stop, resume and exit status: tests/test_train_e2e.py)."""
import os
import signal

import pytest
import torch
import torch.distributed as dist

from bmc_fast.trainer.preemption import StopSignals
from helpers import free_port


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_signal_sets_the_flag_and_the_handlers_come_back(one_rank_group, monkeypatch):
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignals()
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("one rank needs no all-reduce"))
    assert stop.agreed(torch.device("cpu")) == 0
    os.kill(os.getpid(), signal.SIGUSR1)  # caught: the process goes on
    os.kill(os.getpid(), signal.SIGTERM)  # a second signal keeps the first
    assert stop.received == signal.SIGUSR1 and stop.received_at > 0
    assert stop.agreed(torch.device("cpu")) == signal.SIGUSR1
    stop.restore()
    assert signal.getsignal(signal.SIGUSR1) is before
