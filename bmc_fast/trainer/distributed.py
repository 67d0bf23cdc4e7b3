"""Ranks and devices: the launcher's environment, this rank's device, and DeepSpeed's leftovers on CPU."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from bmc_fast.trainer import launchers

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int  # global rank: data sharding, who writes the run directory
    local_rank: int  # rank on this node: which device
    world_size: int
    local_size: int  # ranks on this node: how they share its CPU cores
    launcher: str = "single"  # what started the process (bmc_fast.trainer.launchers)
    node: int = 0  # this node's index

    @classmethod
    def from_environ(cls, environ: dict | None = None) -> DistEnv:
        """The rank layout of whichever launcher started this process (DeepSpeed, torchrun, OpenMPI's mpirun,
        SLURM's srun; ``trainer/launchers.py``), written back as torch's ``env://`` variables; a lone
        ``python train.py`` becomes a 1-rank world on loopback."""
        environ = os.environ if environ is None else environ
        layout = launchers.detect(environ, free_port)
        launchers.apply(layout, environ)
        if layout.launcher == "single" and int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
            _logger.warning("SLURM allocated %s tasks, but this process was not started by srun: it trains alone; "
                            "launch it with srun (one task per GPU) or srun torchrun", environ["SLURM_NTASKS"])
        return cls(layout.rank, layout.local_rank, layout.world_size, layout.local_size, layout.launcher, layout.node)


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def configure_device(accelerator, env: DistEnv) -> torch.device:
    """This rank's device (``local_rank`` on a GPU node); on CPU, the node's cores split between its ranks."""
    device = torch.device(accelerator.device_name(env.local_rank))
    if device.type == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:  # ranks on one host share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_size))
        _logger.info("device cpu: %d thread(s) per rank", torch.get_num_threads())
    else:
        accelerator.set_device(env.local_rank)
        _logger.info("device %s", device)
    return device


def use_deterministic_algorithms() -> None:
    """torch's deterministic settings (``--deterministic``): deterministic kernels where torch has them (a warning
    names each op that has none), no cuDNN autotuning, and cuBLAS's fixed workspace, which cuBLAS reads when
    its handle is created: call before the first CUDA matrix product."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    _logger.info("deterministic algorithms on (CUBLAS_WORKSPACE_CONFIG=%s)", os.environ["CUBLAS_WORKSPACE_CONFIG"])


def release_shm_buffer(env: DistEnv) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment, which DeepSpeed leaves in /dev/shm (~66 MiB a rank,
    a run). After the last barrier no rank opens it again; mappings outlive the name."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{env.rank}")  # deepspeed/ops/csrc/cpu/comm/shm.cpp
    segment = Path("/dev/shm") / name
    if segment.exists():
        segment.unlink()
        _logger.debug("removed %s", segment)


def log_rank_layout(env: DistEnv, device: torch.device, data: str) -> None:
    """Rank 0 logs, for every rank, its node, local rank, device and data shard (``data``, as this rank's loader
    was built): the one line to read when a multi-node launch mixes up global and local ranks. One
    all-gather, once per run."""
    mine = f"rank {env.rank} = node {env.node} ({socket.gethostname()}) local rank {env.local_rank}: {device}, {data}"
    layout: list[str | None] = [None] * env.world_size
    torch.distributed.all_gather_object(layout, mine)
    _logger.info("rank layout (%s launch, master %s:%s): %s", env.launcher, os.environ.get("MASTER_ADDR"),
                 os.environ.get("MASTER_PORT"), "; ".join(layout))
