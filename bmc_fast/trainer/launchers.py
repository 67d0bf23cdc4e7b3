"""Which launcher started this process, and the rank layout it describes.

Read in this order (the first that applies wins):

1. ``RANK`` / ``WORLD_SIZE``: the DeepSpeed launcher (it also sets ``CROSS_RANK``, its ``--node_rank``) and torchrun
   (``TORCHELASTIC_RUN_ID``, ``GROUP_RANK``), including ``srun torchrun`` with one task per node; they set
   ``MASTER_ADDR`` / ``MASTER_PORT`` themselves.
2. OpenMPI's ``OMPI_COMM_WORLD_RANK`` / ``_SIZE`` / ``_LOCAL_RANK`` / ``_LOCAL_SIZE`` (``mpirun``): the master is
   ``MASTER_ADDR`` if exported to the ranks (``mpirun -x MASTER_ADDR``), else the first host of a SLURM allocation,
   else this host when every rank is on it.
3. SLURM's job-step variables (plain ``srun``, one task per GPU): ``SLURM_PROCID``, ``SLURM_LOCALID``,
   ``SLURM_NODEID``, ``SLURM_STEP_NUM_TASKS`` (``SLURM_NTASKS``), ``SLURM_STEP_TASKS_PER_NODE`` and the first host of
   ``SLURM_STEP_NODELIST`` (``SLURM_JOB_NODELIST``) as the master, expanded as ``scontrol show hostnames`` does;
   ``MASTER_PORT`` from the job id unless set.
4. none of them: one process on the loopback interface (``python bmc_fast/train.py ...``).

``apply`` writes the layout as the ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` variables that
``torch.distributed``'s ``env://`` (and so DeepSpeed's ``init_distributed``) reads. A launch of several tasks whose
layout cannot be read is refused with the fix (``ConfigError``), never run as several independent 1-rank runs.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

from bmc_fast.errors import ConfigError

SLURM_PORT_BASE = 20000  # MASTER_PORT under SLURM: this + job id mod SLURM_PORT_SPAN, the same on every task
SLURM_PORT_SPAN = 20000
MPI_DEFAULT_PORT = 29500  # torch's default; every rank of an mpirun must agree on one


@dataclass(frozen=True)
class Layout:
    """One process's place in the run, and where rank 0 listens."""

    launcher: str  # "deepspeed", "torchrun", "env" (RANK/WORLD_SIZE from elsewhere), "openmpi", "slurm", "single"
    rank: int
    local_rank: int
    world_size: int
    local_size: int  # ranks on this node
    node: int  # this node's index
    master_addr: str
    master_port: str


def detect(environ: Mapping[str, str], free_port=None) -> Layout:
    """The layout ``environ`` describes (rules in the module docstring); ``free_port()`` picks a single process's
    port."""
    if "RANK" in environ:
        return _from_rank_variables(environ)
    if "OMPI_COMM_WORLD_RANK" in environ:
        return _from_openmpi(environ)
    if "SLURM_PROCID" in environ and ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ):  # an srun task
        return _from_slurm(environ)
    port = environ.get("MASTER_PORT") or str(free_port() if free_port else MPI_DEFAULT_PORT)
    return Layout("single", 0, 0, 1, 1, 0, environ.get("MASTER_ADDR", "127.0.0.1"), port)


def apply(layout: Layout, environ: dict) -> None:
    """Write ``layout`` as the variables of torch's ``env://`` rendezvous (and DeepSpeed's ``LOCAL_SIZE``)."""
    environ.update(RANK=str(layout.rank), LOCAL_RANK=str(layout.local_rank), WORLD_SIZE=str(layout.world_size),
                   LOCAL_WORLD_SIZE=str(layout.local_size), MASTER_ADDR=layout.master_addr,
                   MASTER_PORT=layout.master_port)
    # DeepSpeed's CPU all-reduce takes its shared-memory path only when LOCAL_SIZE == WORLD_SIZE
    # (deepspeed/ops/csrc/cpu/comm/shm_interface.cpp), as under its own launcher
    environ["LOCAL_SIZE"] = str(layout.local_size)


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list in full, in ``scontrol show hostnames`` order: ``gpu[01-03,07],cpu5`` ->
    ``gpu01 gpu02 gpu03 gpu07 cpu5``; several bracket groups in one name expand as their product."""
    hosts = []
    for item in _split_top_level(nodelist.strip()):
        parts = re.split(r"(\[[^\]]*\])", item)  # literal text and [ranges], alternating
        choices = [_expand_ranges(part[1:-1], nodelist) if part.startswith("[") else [part] for part in parts]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts or any(not host for host in hosts):
        raise ConfigError(f"SLURM nodelist {nodelist!r} names no host: expected a form such as gpu[01-03,07],cpu5")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item]


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not match:
            raise ConfigError(f"SLURM nodelist {nodelist!r}: cannot read the range {part!r}")
        first, last = match.group(1), match.group(2) or match.group(1)
        width = len(first)  # zero padding, as SLURM keeps it: [08-10] -> 08 09 10
        out.extend(str(n).zfill(width) for n in range(int(first), int(last) + 1))
    return out


def _int(environ: Mapping[str, str], name: str, launcher: str, fix: str) -> int:
    value = environ.get(name)
    if value is None or not value.strip().isdigit():
        raise ConfigError(f"{launcher} launch: {name} is {'unset' if value is None else repr(value)}, so this process "
                          f"cannot know its place in the run; {fix}")
    return int(value)


def _from_rank_variables(environ: Mapping[str, str]) -> Layout:
    fix = "set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT together, or launch with deepspeed or torchrun"
    rank, world = _int(environ, "RANK", "RANK/WORLD_SIZE", fix), _int(environ, "WORLD_SIZE", "RANK/WORLD_SIZE", fix)
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in environ else "deepspeed" if "CROSS_RANK" in environ else "env"
    if world > 1 and not (environ.get("MASTER_ADDR") and environ.get("MASTER_PORT")):
        raise ConfigError(f"{launcher} launch of {world} ranks without MASTER_ADDR/MASTER_PORT: {fix}")
    local_size = int(environ.get("LOCAL_SIZE") or environ.get("LOCAL_WORLD_SIZE") or world)
    node = int(environ.get("CROSS_RANK") or environ.get("GROUP_RANK") or 0)
    return Layout(launcher, rank, int(environ.get("LOCAL_RANK", 0)), world, local_size, node,
                  environ.get("MASTER_ADDR", "127.0.0.1"), environ.get("MASTER_PORT", str(MPI_DEFAULT_PORT)))


def _from_openmpi(environ: Mapping[str, str]) -> Layout:
    fix = "launch with OpenMPI's mpirun (it sets OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK and _LOCAL_SIZE)"
    rank, world = (_int(environ, f"OMPI_COMM_WORLD_{n}", "OpenMPI", fix) for n in ("RANK", "SIZE"))
    local_rank, local_size = (_int(environ, f"OMPI_COMM_WORLD_LOCAL_{n}", "OpenMPI", fix) for n in ("RANK", "SIZE"))
    node = int(environ.get("OMPI_COMM_WORLD_NODE_RANK") or rank // max(local_size, 1))
    master = environ.get("MASTER_ADDR")
    if not master and (nodelist := environ.get("SLURM_JOB_NODELIST")):
        master = expand_nodelist(nodelist)[0]
    if not master:
        if local_size != world:
            raise ConfigError(f"OpenMPI launch of {world} ranks on several hosts without MASTER_ADDR: export the first "
                              "host's address to every rank (mpirun -x MASTER_ADDR=<host> -x MASTER_PORT=<port>)")
        master = "127.0.0.1"
    return Layout("openmpi", rank, local_rank, world, local_size, node, master,
                  environ.get("MASTER_PORT", str(MPI_DEFAULT_PORT)))


def _from_slurm(environ: Mapping[str, str]) -> Layout:
    fix = ("run it as a job step (srun, one task per GPU), which sets SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, "
           "SLURM_STEP_NUM_TASKS and SLURM_STEP_NODELIST; or use srun torchrun / the deepspeed launcher")
    rank, local_rank = _int(environ, "SLURM_PROCID", "SLURM", fix), _int(environ, "SLURM_LOCALID", "SLURM", fix)
    node = _int(environ, "SLURM_NODEID", "SLURM", fix)
    world_name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    world = _int(environ, world_name, "SLURM", fix)
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ConfigError(f"SLURM launch of {world} tasks without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: {fix}")
    per_node = tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
                              or str(world))
    local_size = per_node[node] if node < len(per_node) else per_node[-1]
    port = environ.get("MASTER_PORT")
    if not port:
        job = _int(environ, "SLURM_JOB_ID", "SLURM", "or set MASTER_PORT for every task")
        port = str(SLURM_PORT_BASE + job % SLURM_PORT_SPAN)
    return Layout("slurm", rank, local_rank, world, local_size, node,
                  environ.get("MASTER_ADDR") or expand_nodelist(nodelist)[0], port)


def tasks_per_node(text: str) -> list[int]:
    """SLURM's ``SLURM_TASKS_PER_NODE`` form, ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise ConfigError(f"SLURM tasks per node {text!r}: expected a form such as 8(x2) or 2,1")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts
