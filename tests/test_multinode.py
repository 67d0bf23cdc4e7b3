"""Two "nodes" on this machine (DeepSpeed's --no_ssh --node_rank; node 0 runs rank 0, node 1 ranks 1 and 2,
whose LOCAL_RANKs DeepSpeed sets to 1 and 0) train exactly as one node with 3 ranks: the global rank
is DALI's shard_id, the local rank picks the device (DALI's device_id is None on CPU), global rank 0 alone
writes the run directory, each node frees its own shared memory, and the skip counts cover every rank."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, corrupt_samples, deepspeed_config, encode_image, free_port, launch_deepspeed, write_shard

pytestmark = pytest.mark.slow  # real processes: the deepspeed launcher, twice at once

STEPS = 4
BROKEN = {"truncated_image": 1, "not_an_image": 2, "missing_caption": 1}  # not_an_image: HTML, a GIF


def _train(small_data, train_data, ds_config, run_dir, port):
    return ["--master_port", str(port), "bmc_fast/train.py", "--ds_config", str(ds_config),
            "--train-data", train_data, "--eval-data", small_data["eval"], "--tokenizer",
            small_data["tokenizer_dir"], "--max-steps", str(STEPS), "--log-every", "1", "--eval-every", "0",
            "--output-dir", str(run_dir), "--seed", "1", "--loader", "dali"]


def _losses(run_dir):
    return [r["train/loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r]


def _broken_shard(small_data, path) -> str:
    """A shard of the corrupt samples counted in ``BROKEN`` between 2 good ones."""
    with tarfile.open(next(Path(small_data["root"], "train").glob("*.tar"))) as tar:
        png = next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png"))
    jpeg = encode_image(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), "JPEG")
    bad = [(f"bad-{i}", members) for i, (kind, members) in enumerate(corrupt_samples(jpeg, png)) if kind in BROKEN
           and (kind != "truncated_image" or members[0][0] == "jpg")]
    good = [(f"good-{i}", {"jpg": jpeg, "txt": f"figure {i}: an axial CT slice".encode()}) for i in range(2)]
    return write_shard(path, good[:1] + bad + good[1:])


def test_two_nodes_of_one_and_two_ranks_match_one_node_of_three(small_data, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same threads per rank in both layouts: the same sums
    ds_config = deepspeed_config(tmp_path, 2, steps=STEPS, batch=48)  # 16 pairs per rank
    train_data = small_data["train"] + "::" + _broken_shard(small_data, tmp_path / "broken.tar")
    one_node = tmp_path / "one-node"
    launch_deepspeed(["--num_gpus", "3", *_train(small_data, train_data, ds_config, one_node, free_port())], tmp_path)

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=2\n")
    two_nodes, port = tmp_path / "two-nodes", free_port()
    launcher = Path(sys.executable).parent / "deepspeed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    nodes = [subprocess.Popen([str(launcher), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                               "--master_addr", "127.0.0.1",
                               *_train(small_data, train_data, ds_config, two_nodes, port)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    (tmp_path / "nodes.log").write_text("\n=== node 1 ===\n".join(logs))
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]

    assert len(_losses(two_nodes)) == STEPS
    assert _losses(two_nodes) == pytest.approx(_losses(one_node), rel=1e-6)  # the same shards, the same sums
    assert "dist_world_size=3" in logs[1] and "--node_rank=1" in logs[1]
    layout = next(line for line in logs[0].splitlines() if "rank layout (deepspeed launch, " in line)
    # DeepSpeed's launcher sets LOCAL_RANK = RANK mod (ranks on the node): on node 1, rank 1 -> 1 and rank 2 -> 0,
    # unique on the node, which is all the device choice needs
    for rank, node, local in ((0, 0, 0), (1, 1, 1), (2, 1, 0)):
        assert f"rank {rank} = node {node} " in layout and (
            f"local rank {local}: cpu, DALI shard_id {rank} of 3, device_id None") in layout, layout
    assert "done: " in logs[0] and "done: " not in logs[1]  # ranks 1 and 2 write nothing
    summaries = [json.loads((run / "summary.json").read_text()) for run in (two_nodes, one_node)]
    assert summaries[0]["world_size"] == 3 and summaries[0]["skipped"] == summaries[1]["skipped"] == BROKEN
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # each node cleaned its own


def _slurm_port() -> tuple[int, int]:
    """(job id, port): a free port that SLURM's MASTER_PORT rule (launchers.SLURM_PORT_BASE + job id mod span)
    gives for that job id."""
    import random
    import socket

    from bmc_fast.trainer.launchers import SLURM_PORT_BASE, SLURM_PORT_SPAN

    for _ in range(200):
        port = SLURM_PORT_BASE + random.randrange(SLURM_PORT_SPAN)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 7 * SLURM_PORT_SPAN + port - SLURM_PORT_BASE, port
    raise RuntimeError("no free port in SLURM's range")


def _direct(commands: list[list[str]], envs: list[dict], tmp_path, name: str) -> list[str]:
    """Start one process a task, as srun or torchrun would, and wait for all of them."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_SIZE", "LOCAL_WORLD_SIZE")}
    base.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    base.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    procs = [subprocess.Popen(command, cwd=REPO, env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for command, env in zip(commands, envs)]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    (tmp_path / f"{name}.log").write_text("\n=== next task ===\n".join(logs))
    assert [proc.returncode for proc in procs] == [0] * len(procs), logs[0][-3000:] + logs[-1][-3000:]
    return logs


def test_srun_and_torchrun_train_as_the_deepspeed_launcher_does(small_data, tmp_path, monkeypatch):
    """Two tasks started with the variables a 2-task srun job step sets (no RANK), and torchrun's 2 ranks, give
    the per-step losses of `deepspeed --num_gpus 2` on the same data and seed."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ds_config = deepspeed_config(tmp_path, 2, steps=STEPS, batch=32)
    runs = {name: tmp_path / name for name in ("deepspeed", "srun", "torchrun")}
    launch_deepspeed(["--num_gpus", "2", *_train(small_data, small_data["train"], ds_config, runs["deepspeed"],
                                                 free_port())], tmp_path)
    train = [sys.executable, *_train(small_data, small_data["train"], ds_config, runs["srun"], 0)[2:]]
    job, port = _slurm_port()
    step = {"SLURM_JOB_ID": str(job), "SLURM_STEP_ID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS": "2",
            "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "localhost",
            "SLURM_JOB_NODELIST": "localhost"}
    logs = _direct([train, train], [{**step, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)} for i in (0, 1)],
                   tmp_path, "srun")
    layout = f"rank layout (slurm launch, master localhost:{port}): rank 0 = node 0"  # the port from the job id
    assert layout in logs[0] and "rank 1 = node 0" in logs[0], logs[0][-2000:]

    torchrun = Path(sys.executable).parent / "torchrun"
    logs = _direct([[str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()),
                     *_train(small_data, small_data["train"], ds_config, runs["torchrun"], 0)[2:]]], [{}], tmp_path,
                   "torchrun")
    assert "rank layout (torchrun launch, " in logs[0], logs[0][-2000:]
    want = _losses(runs["deepspeed"])
    assert len(want) == STEPS
    for name in ("srun", "torchrun"):
        assert _losses(runs[name]) == pytest.approx(want, rel=1e-6), name
