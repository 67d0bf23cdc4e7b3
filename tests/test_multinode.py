"""Two "nodes" on this machine (DeepSpeed's --no_ssh --node_rank, 1 rank each: LOCAL_RANK 0 on both, RANK
0 and 1) train exactly as one node with 2 ranks: the global rank shards the data and alone writes the run
directory. (That the local rank picks the GPU is not visible here: on the CPU DALI's device_id is None.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, deepspeed_config, free_port, launch_deepspeed

pytestmark = pytest.mark.slow  # real processes: the deepspeed launcher, twice at once

STEPS = 4


def _train(small_data, ds_config, run_dir, port):
    return ["--master_port", str(port), "bmc_fast/train.py", "--ds_config", str(ds_config),
            "--train-data", small_data["train"], "--eval-data", small_data["eval"], "--tokenizer",
            small_data["tokenizer_dir"], "--max-steps", str(STEPS), "--log-every", "1", "--eval-every", "0",
            "--output-dir", str(run_dir), "--seed", "1", "--loader", "dali"]


def _losses(run_dir):
    return [r["train/loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r]


def test_two_nodes_of_one_rank_match_one_node_of_two(small_data, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same threads per rank in both layouts: the same sums
    ds_config = deepspeed_config(tmp_path, 2, steps=STEPS, batch=32)
    one_node = tmp_path / "one-node"
    launch_deepspeed(["--num_gpus", "2", *_train(small_data, ds_config, one_node, free_port())], tmp_path)

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    two_nodes, port = tmp_path / "two-nodes", free_port()
    launcher = Path(sys.executable).parent / "deepspeed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    nodes = [subprocess.Popen([str(launcher), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                               "--master_addr", "127.0.0.1", *_train(small_data, ds_config, two_nodes, port)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    (tmp_path / "nodes.log").write_text("\n=== node 1 ===\n".join(logs))
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]

    assert _losses(two_nodes) == pytest.approx(_losses(one_node), rel=1e-6)  # DALI shard_id = global rank
    assert len(_losses(two_nodes)) == STEPS
    assert "dist_world_size=2" in logs[1] and "--node_rank=1" in logs[1]
    assert "done: " in logs[0] and "done: " not in logs[1]  # rank 1 (LOCAL_RANK 0 on its node) writes nothing
    summary = json.loads((two_nodes / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["skipped"] == json.loads((one_node / "summary.json").read_text())[
        "skipped"]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # each node cleaned its own
