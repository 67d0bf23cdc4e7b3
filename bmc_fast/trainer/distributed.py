"""Ranks and devices: the launcher's environment, this rank's device, and DeepSpeed's leftovers on CPU."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int  # global rank: data sharding, who writes the run directory
    local_rank: int  # rank on this node: which device
    world_size: int
    local_size: int  # ranks on this node: how they share its CPU cores

    @classmethod
    def from_environ(cls) -> DistEnv:
        """Read the launcher's variables; a lone ``python train.py`` becomes a 1-rank world on loopback."""
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
        world = int(os.environ["WORLD_SIZE"])
        local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
        return cls(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), world, local_size)


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
    node = os.environ.get("CROSS_RANK", "0")  # the DeepSpeed launcher's --node_rank
    mine = f"rank {env.rank} = node {node} ({socket.gethostname()}) local rank {env.local_rank}: {device}, {data}"
    layout: list[str | None] = [None] * env.world_size
    torch.distributed.all_gather_object(layout, mine)
    _logger.info("rank layout: %s", "; ".join(layout))
