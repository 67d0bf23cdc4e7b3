"""Which launcher started a process and the layout it describes (bmc_fast/trainer/launchers.py), from the
variables each launcher sets; the real launches are in tests/test_multinode.py."""
import pytest

from bmc_fast.errors import ConfigError
from bmc_fast.trainer import launchers
from bmc_fast.trainer.distributed import DistEnv
from helpers import REPO


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("node017", ["node017"]),
    ("a,b,c", ["a", "b", "c"]),
    ("n[008-011]", ["n008", "n009", "n010", "n011"]),
    ("rack[1-2]-gpu[3,5]", ["rack1-gpu3", "rack1-gpu5", "rack2-gpu3", "rack2-gpu5"]),
    ("x[9-10],y[1]", ["x9", "x10", "y1"]),
])
def test_slurm_nodelists_expand_as_scontrol_does(nodelist, hosts):
    assert launchers.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("text, counts", [("8", [8]), ("8(x2)", [8, 8]), ("2(x3),1", [2, 2, 2, 1]), ("4,2", [4, 2])])
def test_slurm_tasks_per_node(text, counts):
    assert launchers.tasks_per_node(text) == counts


def test_a_bad_nodelist_is_named():
    with pytest.raises(ConfigError, match=r"SLURM nodelist 'gpu\[a-b\]': cannot read the range 'a-b'"):
        launchers.expand_nodelist("gpu[a-b]")


SRUN_TASK_5 = {  # what srun sets in task 5 of `srun -N 2 --ntasks-per-node 4` (job 123456)
    "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]"}


@pytest.mark.parametrize("environ, want", [
    ({}, launchers.Layout("single", 0, 0, 1, 1, 0, "127.0.0.1", "4321")),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
      "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501"},
     launchers.Layout("deepspeed", 3, 1, 4, 2, 1, "10.0.0.1", "29501")),
    ({"RANK": "1", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "0",
      "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500", **SRUN_TASK_5},  # srun torchrun
     launchers.Layout("torchrun", 1, 1, 16, 8, 0, "gpu07", "29500")),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1", "MASTER_ADDR": "h1"},
     launchers.Layout("openmpi", 2, 0, 4, 2, 1, "h1", "29500")),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
     launchers.Layout("openmpi", 1, 1, 2, 2, 0, "127.0.0.1", "29500")),
    (SRUN_TASK_5, launchers.Layout("slurm", 5, 1, 8, 4, 1, "gpu07", str(20000 + 123456 % 20000))),
    ({**SRUN_TASK_5, "MASTER_PORT": "31000", "MASTER_ADDR": "10.1.1.7"},
     launchers.Layout("slurm", 5, 1, 8, 4, 1, "10.1.1.7", "31000")),
    ({k: v for k, v in SRUN_TASK_5.items() if k not in ("SLURM_STEP_ID",)}, launchers.Layout(  # the batch shell
        "single", 0, 0, 1, 1, 0, "127.0.0.1", "4321")),
], ids=["single", "deepspeed", "srun-torchrun", "openmpi", "openmpi-one-host", "srun", "srun-master-set",
        "sbatch-shell"])
def test_each_launchers_layout(environ, want):
    assert launchers.detect(environ, free_port=lambda: 4321) == want


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "1", "WORLD_SIZE": "2"}, r"env launch of 2 ranks without MASTER_ADDR/MASTER_PORT"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, r"RANK is 'x'"),
    ({**SRUN_TASK_5, "SLURM_STEP_NODELIST": "", "SLURM_JOB_NODELIST": ""}, r"SLURM launch of 8 tasks without "
                                                                           r"SLURM_STEP_NODELIST"),
    ({k: v for k, v in SRUN_TASK_5.items() if k != "SLURM_LOCALID"}, r"SLURM_LOCALID is unset.*run it as a job step"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, r"mpirun -x MASTER_ADDR"),
])
def test_a_multi_task_launch_that_cannot_be_read_is_refused(environ, message):
    with pytest.raises(ConfigError, match=message):
        launchers.detect(environ)


def test_the_layout_becomes_torchs_env_variables():
    environ = dict(SRUN_TASK_5)
    env = DistEnv.from_environ(environ)
    assert (env.rank, env.local_rank, env.world_size, env.local_size, env.node, env.launcher) == (5, 1, 8, 4, 1,
                                                                                                  "slurm")
    assert {k: environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
                                    "MASTER_ADDR")} == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
                                                        "LOCAL_WORLD_SIZE": "4", "LOCAL_SIZE": "4",
                                                        "MASTER_ADDR": "gpu07"}


SCRIPTS = sorted((REPO / "scripts" / "slurm").glob("*.sbatch"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_slurm_batch_scripts_parse_and_pass_flags_the_trainer_has(script):
    """bash reads each script; it requeues, forwards the preemption notice, resumes, and every flag of its
    train.py command exists, with a DeepSpeed JSON that exists (SLURM itself is not on this machine)."""
    import re
    import shlex
    import subprocess

    from bmc_fast.train import build_parser

    text = script.read_text()
    for path in (script, REPO / "scripts" / "slurm" / "requeue_on_preemption.sh"):
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, path
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text
    assert "source scripts/slurm/requeue_on_preemption.sh" in text
    command = re.search(r"^srun (.*?)&$", text, re.MULTILINE | re.DOTALL)[1].replace("\\\n", " ")
    words = shlex.split(command.replace('"$@"', ""))
    flags = words[words.index("bmc_fast/train.py") + 1:]
    args = build_parser().parse_args([w.replace("$TRAIN_DATA", "x.tar").replace("$OUT", "out") for w in flags])
    assert args.resume == "auto" and (REPO / args.ds_config).is_file(), args
    assert "scontrol requeue" in (REPO / "scripts" / "slurm" / "requeue_on_preemption.sh").read_text()
