"""The NaN guard on the real launcher (2 CPU ranks): a non-finite loss on one rank makes every rank skip the
step, weights and optimizer state unchanged; ``--max-bad-steps`` skips in a row stop the run."""
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import deepspeed_config, free_port, launch_deepspeed

pytestmark = pytest.mark.slow


def _tensors(obj, prefix=""):
    """Every tensor in a nested checkpoint object, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    found = {}
    for key, value in items:
        found.update(_tensors(value, f"{prefix}/{key}"))
    return found


def _checkpoint_tensors(tag_dir: Path):
    """Weights (fp32, consolidated) and every optimizer-state tensor of every rank in one checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = dict(get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name))
    for path in sorted(tag_dir.glob("*optim_states.pt")):
        optim = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]  # our own file
        state.update(_tensors(optim, path.name))
    return state


# ZeRO-1 and -2 share DeepSpeed's stage_1_and_2 optimizer; ZeRO-1 runs in the contrastive accumulation test.
# ZeRO-Offload (bench_train's ViT-L/14 config on CPU) finds non-finite gradients its own way: as it copies them.
@pytest.mark.parametrize("stage,bf16,accumulation,offload", [(2, False, 2, False), (3, True, 1, False),
                                                             (1, True, 1, True)],
                         ids=["zero2-fp32-contrastive2", "zero3-bf16", "zero1-bf16-offload"])
def test_a_non_finite_loss_on_one_rank_is_skipped_by_all_and_a_run_of_them_stops(stage, bf16, accumulation, offload,
                                                                                   small_data, tmp_path):
    ds_config = deepspeed_config(tmp_path, stage, steps=10, batch=32, bf16=bf16, accumulation=accumulation,
                                 offload=offload)
    run_dir = tmp_path / "run"
    args = ["--num_gpus", "2", "--master_port", str(free_port()), "tests/faulty_train.py", "--ds_config",
            str(ds_config), "--train-data", small_data["train"], "--tokenizer", small_data["tokenizer_dir"],
            "--loader", "pil", "--max-steps", "10", "--log-every", "1", "--eval-every", "0", "--save-every", "1",
            "--max-bad-steps", "3", "--output-dir", str(run_dir), "--seed", "1"]
    # +inf added to rank 1's loss: at step 3 alone, then at 6, 7, 8 (three in a row)
    proc = launch_deepspeed(args, tmp_path, check=False, env={"BMC_FAST_TEST_NONFINITE": "1:3,6,7,8"})
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    message = [line for line in log.splitlines() if line.startswith("error: training diverged")]
    assert len(set(message)) == 1 and "at step 8: 3 steps in a row (--max-bad-steps 3) had a non-finite loss or " \
                                 "gradient norm: steps 6, 7, 8" in message[0], log[-3000:]
    assert "the last good checkpoint is checkpoints/step0000007" in message[0]
    assert log.count("step 3 skipped") == 1 and "step 4 skipped" not in log  # one line, from rank 0
    assert not (run_dir / "summary.json").exists()

    checkpoints = run_dir / "checkpoints"
    before, skipped, after = (_checkpoint_tensors(checkpoints / f"step{n:07d}") for n in (2, 3, 4))
    assert before.keys() == skipped.keys() and len(before) > 10
    assert not [key for key in before if not torch.equal(before[key], skipped[key])]  # step 3 changed nothing
    assert [key for key in before if not torch.equal(before[key], after[key])]  # step 4 trained again
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 2, 3]  # logged up to step 7
    assert all(math.isfinite(r["train/loss"]) for r in records)  # the mean of the finite losses (rank 0's at 3, 6, 7)


def test_fp16_loss_scale_overflows_are_not_bad_steps_but_a_non_finite_loss_is(small_data, tmp_path):
    """fp16 at DeepSpeed's default initial loss scale (2**16) overflows at steps 1-3 with finite losses: DeepSpeed
    skips them and lowers the scale, and they do not count toward --max-bad-steps 2. +inf in rank 1's loss
    at steps 6 and 7 still stops the run. Contrastive accumulation 2 with activation checkpointing, in fp16."""
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        pytest.skip("this CPU has no oneDNN float16 (AVX512-FP16 / AMX-FP16), so DeepSpeed's CPU accelerator "
                    "refuses fp16 (tests/test_train_cli.py checks the trainer says so up front)")
    ds_config = deepspeed_config(tmp_path, 2, steps=8, batch=32, accumulation=2, fp16_scale_power=16)
    run_dir = tmp_path / "run"
    args = ["--num_gpus", "2", "--master_port", str(free_port()), "tests/faulty_train.py", "--ds_config",
            str(ds_config), "--train-data", small_data["train"], "--tokenizer", small_data["tokenizer_dir"],
            "--loader", "pil", "--max-steps", "8", "--log-every", "1", "--eval-every", "0", "--save-every", "0",
            "--max-bad-steps", "2", "--grad-checkpointing", "--output-dir", str(run_dir), "--seed", "1"]
    proc = launch_deepspeed(args, tmp_path, check=False, env={"BMC_FAST_TEST_NONFINITE": "1:6,7"})
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert "ZeRO stage 2, torch.float16" in log and "contrastive accumulation 2" in log
    overflows = [int(line.split("step ")[1].split()[0]) for line in log.splitlines()
                 if "skipped: fp16 loss scale overflow (finite loss)" in line]
    assert overflows == [1, 2, 3], log[-3000:]
    message = [line for line in log.splitlines() if line.startswith("error: training diverged")]
    assert message and "2 steps in a row (--max-bad-steps 2) had a non-finite loss or gradient norm: steps 6, 7" in \
        message[0], log[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in records] == [1, 2, 3, 3, 3, 4]  # logged up to step 6
    assert all(math.isfinite(r["train/loss"]) for r in records)
