"""The step profile (exclusive parts that add up to the step) and ``benchmarks/bench_train.py``: the real
trainer beside open_clip 3.3 on the same batches, run as a user runs it (a separate process)."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bmc_fast.trainer.step_profile import OTHER, PARTS, StepProfile
from helpers import REPO, SHARED_DATA, free_port, launch_deepspeed


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_parts_are_exclusive_and_add_up_to_the_step():
    profile = StepProfile(torch.device("cpu"))
    profile.begin_step()
    started = time.perf_counter()
    _busy(0.01)  # outside every part: other
    with profile.part("forward"):
        _busy(0.02)
        with profile.part("image_forward"):  # nested: not also counted as forward
            _busy(0.03)
        _busy(0.01)
    with profile.part("backward"):
        _busy(0.02)
    seconds = profile.end_step()
    wall = time.perf_counter() - started
    assert set(seconds) == {*PARTS, OTHER, "step"}
    assert seconds["step"] == pytest.approx(sum(seconds[k] for k in (*PARTS, OTHER)))
    assert seconds["step"] == pytest.approx(wall, abs=2e-3)
    # Each part holds its busy time; any excess (the scheduler, on a loaded machine) is part of the step's own
    # overrun of the 0.09 s busy in all, so the check holds however loaded the machine is.
    overrun = wall - 0.09
    for part, busy in (("image_forward", 0.03), ("forward", 0.03), ("backward", 0.02), (OTHER, 0.01)):
        assert busy - 1e-4 <= seconds[part] <= busy + overrun + 1e-3, (part, seconds[part], overrun)
    assert seconds["loss"] == 0.0


def test_part_errors_name_the_part():
    profile = StepProfile(torch.device("cpu"))
    with pytest.raises(ValueError, match="'fwd' is not one of"):
        profile.enter("fwd")
    profile.enter("loss")
    with pytest.raises(RuntimeError, match="leaving 'backward' but the open parts are \\['loss'\\]"):
        profile.leave("backward")


def test_watch_reduction_charges_and_then_restores_an_instance_method():
    """``close`` gives back what each object had: its class's method, or one set on the instance (the trainer
    sets DeepSpeed's bucketing call on the optimizer instance on one rank: ``one_rank``)."""
    class Optimizer:
        def reduce_ready_partitions_and_remove_grads(self, param, i):
            return "class"

    class Engine:
        def allreduce_gradients(self):
            _busy(0.002)

    engine, own = Engine(), lambda param, i: "instance"
    engine.optimizer = Optimizer()
    engine.optimizer.reduce_independent_p_g_buckets_and_remove_grads = own
    profile = StepProfile(torch.device("cpu"))
    profile.watch_reduction(engine)
    profile.begin_step()
    engine.allreduce_gradients()
    assert engine.optimizer.reduce_independent_p_g_buckets_and_remove_grads(None, 0) == "instance"
    assert engine.optimizer.reduce_ready_partitions_and_remove_grads(None, 0) == "class"
    assert profile.end_step()["communication"] >= 0.002
    profile.close()
    assert vars(engine.optimizer)["reduce_independent_p_g_buckets_and_remove_grads"] is own
    assert "reduce_ready_partitions_and_remove_grads" not in vars(engine.optimizer)
    assert "allreduce_gradients" not in vars(engine)


def test_tower_hooks_and_collectives_are_charged_and_removed(tmp_path):
    """Forward hooks time the towers; a blocking collective inside a part is charged to communication,
    and the patched torch.distributed functions are restored on exit."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.Module()
        model.visual, model.text = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        profile = StepProfile(torch.device("cpu"))
        profile.watch_towers(model)
        original = torch.distributed.all_reduce
        with profile.watch_collectives():
            assert torch.distributed.all_reduce is not original
            profile.begin_step()
            with profile.part("backward"):
                model.visual(torch.ones(2, 4))
                model.text(torch.ones(2, 4))
                torch.distributed.all_reduce(torch.ones(3))
            seconds = profile.end_step()
        assert torch.distributed.all_reduce is original
        assert seconds["image_forward"] > 0 and seconds["text_forward"] > 0 and seconds["communication"] > 0
        profile.close()
        profile.begin_step()
        model.visual(torch.ones(2, 4))
        assert profile.end_step()["image_forward"] == 0.0  # hooks removed
    finally:
        torch.distributed.destroy_process_group()


def _bench(tmp_path, *args: str) -> dict:
    env = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin", "MASTER_PORT": str(free_port()),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

    env.update({k: v for k, v in os.environ.items() if k in ("HOME", "TORCH_EXTENSIONS_DIR", "TMPDIR")})
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--json",
                           "--work-dir", str(tmp_path / "work"), *args], capture_output=True, text=True,
                          timeout=900, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bench_train_with_loaders_and_trace(tmp_path):
    """--with-loaders: bmc-fast's PIL loader and open_clip's webdataset + PIL path on the same shards;
    --trace writes a torch.profiler trace; ZeRO-1 and the torch loss backend pass through."""
    if not (SHARED_DATA / "captions" / "biomed_captions.jsonl").is_file():
        lengths = "biomedica"
    else:
        lengths = "real"
    r = _bench(tmp_path, "--preset", "tiny", "--context", "154", "--lengths", lengths, "--batch", "8",
               "--steps", "1", "--baseline", "open_clip", "--with-loaders", "--loader", "pil",
               "--ds_config", "ds_configs/zero1.json", "--loss-backend", "torch", "--trace", str(tmp_path / "trace"),
               "--cpu-malloc", "heap")
    assert r["with_loaders"] and "first_losses_agree" not in r
    assert r["switches"]["cpu_malloc"] == "heap" and r["case"].endswith("+loaders heap malloc")
    assert r["switches"]["loader"] == "pil" and r["switches"]["zero_stage"] == 1
    assert r["stacks"]["open_clip"]["parts"]["data"] > 0
    assert list((tmp_path / "trace").glob("*.pt.trace.json"))


_MMAPPED_BLOCKS = """
import ctypes, sys, torch
sys.path.insert(0, "benchmarks")
from bench_train import use_cpu_malloc
class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
use_cpu_malloc(sys.argv[1])
before = libc.mallinfo2().hblks  # blocks mapped by the imports
x = torch.ones(64 * 2**20)  # 256 MiB
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_malloc_heap_keeps_large_blocks_off_mmap():
    """By default glibc maps a new 256 MiB block with mmap (given back to the OS when freed); --cpu-malloc heap
    serves it from the heap."""
    counts = {mode: int(subprocess.run([sys.executable, "-c", _MMAPPED_BLOCKS, mode], cwd=REPO, check=True,
                                       capture_output=True, text=True).stdout.split()[-1])
              for mode in ("default", "heap")}
    assert counts["default"] >= 1 and counts["heap"] == 0, counts


@pytest.mark.slow
def test_bench_train_against_open_clip_on_two_ranks_under_the_launcher(tmp_path):
    """Both stacks take the same batches from the same weights, on 2 ranks under the deepspeed launcher: rank 0
    writes the shards and the JSON, rank 1 waits for them; open_clip runs under DDP with ClipLoss gathering both
    ranks' features, and the first step's losses agree with open_clip's own CustomTextCLIP + ClipLoss. The
    parts cover the measured step; the counts are the batches'. open_clip's gradient all-reduce runs inside
    DDP's reducer during backward, so it is charged to backward, not communication."""
    proc = launch_deepspeed(["--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank",
                             str(REPO / "benchmarks" / "bench_train.py"), "--preset", "tiny", "--context", "77",
                             "--lengths", "biomedica", "--batch", "8", "--steps", "1", "--baseline", "open_clip",
                             "--work-dir", str(tmp_path / "work"), "--json", "--profile-ops", "8"], tmp_path,
                            env={"OMP_NUM_THREADS": "1"})
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"case"')]
    assert len(results) == 1  # rank 0 alone prints it
    r = results[0]
    a, b = r["stacks"]["bmc_fast"], r["stacks"]["open_clip"]
    assert r["world_size"] == 2 and r["pairs_per_step"] == 16
    assert r["first_losses_agree"] and abs(a["first_loss"] - b["first_loss"]) <= 1e-4 * b["first_loss"]
    for stack in (a, b):
        assert 0.9 <= stack["coverage"] <= 1.0 + 1e-6
        assert stack["parts"]["image_forward"] > 0 and stack["parts"]["text_forward"] > 0
        assert stack["parts"]["backward"] > 0 and stack["parts"]["optimizer"] > 0
        assert len(stack["steps"]) == 2 and stack["steps"][0]["warmup"] and not stack["steps"][1]["warmup"]
        assert stack["mfu"] is not None and 0 < stack["mfu"] < 1
    assert a["parts"]["communication"] > 0 == b["parts"]["communication"]  # DeepSpeed's reduction; DDP's in backward
    assert a["mean_tokens"] == b["mean_tokens"] <= 77  # the same captions, cut to the context
    assert b["executed_tflops"] > b["tflops"]  # open_clip computes every padded position
    assert r["speedup"] == pytest.approx(b["seconds"] / a["seconds"])
    assert r["peak_source"].startswith("measured here: float32 4096x4096 matmul")
    assert r["switches"]["zero_stage"] == 2 and r["switches"]["loss_backend"] == "auto"
    # --profile-ops: each stack's 8 costliest operators of the timed step, and the report that shows them
    for stack in ("bmc_fast", "open_clip"):
        profile = r["op_profile"][stack]
        assert profile["steps"] == 1 and len(profile["ops"]) == 8
        times = [ms for _, ms in profile["ops"]]
        assert times == sorted(times, reverse=True) and 0 < sum(times) <= profile["total_ms"]
    assert any(name == "aten::mm" for name, _ in r["op_profile"]["bmc_fast"]["ops"])
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import write_profile
    from report import machine

    markdown = write_profile([r], machine("cpu"), [], tmp_path / "profile", before="a note")
    name, ms = r["op_profile"]["bmc_fast"]["ops"][0]
    assert f"| `{name}` | {ms:.2f} |" in markdown and "; a note." in markdown
    assert (tmp_path / "profile.json").is_file()
