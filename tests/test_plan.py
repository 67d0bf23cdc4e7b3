"""The memory planner: its probe's byte count against a hand count, its model states against DeepSpeed's own
estimators, the largest micro batch at the budget's edge, what it reads from a DeepSpeed JSON, the CLI, and the
committed CPU validation (the preflight built on it: tests/test_preflight.py)."""
import json

import pytest
import torch

from bmc_fast import ds_json, plan
from bmc_fast.errors import ConfigError
from helpers import REPO


def test_saved_bytes_count_what_autograd_keeps_without_the_weights():
    linear = torch.nn.Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    # Linear keeps its input (4·8 floats; the weight is a model state), GELU its input (4·16 floats)
    assert plan._saved_bytes(lambda: torch.nn.functional.gelu(linear(x)), linear) == 4 * (4 * 8 + 4 * 16)


def test_model_states_are_deepspeeds_estimates():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    p, largest = 450_000_000, 40_000_000
    two, _ = plan.model_states_bytes(p, largest, 2, 16, 8, half=True, offload=False)
    assert two == estimate_zero2_model_states_mem_needs(p, 8, 2, cpu_offload=False)[1] == 2 * p + 18 * p // 16
    three, _ = plan.model_states_bytes(p, largest, 3, 16, 8, half=True, offload=False)
    assert three == estimate_zero3_model_states_mem_needs(p, largest, 8, 2, cpu_offload=False)[1]
    one, _ = plan.model_states_bytes(p, largest, 1, 16, 8, half=True, offload=False)
    assert one == pytest.approx(two + 2 * p * 15 / 16)  # every rank keeps all 16-bit gradients
    assert plan.model_states_bytes(p, largest, 2, 1, 1, half=False, offload=False)[0] == 20 * p  # fp32, one rank


def test_largest_micro_batch_sits_at_the_budget_edge():
    from bmc_fast.model.config import load_model_config

    cfg = load_model_config("tiny", text=plan.MODERNBERT_TOKENS)
    probe = plan.probe(cfg, torch.float32, 127.0)
    common = dict(gpus=8, gpus_per_node=8, stage=2, dtype=torch.bfloat16, offload=False, tokens=127.0, preset="tiny")
    budget = 2 * 2**30
    fits = plan.largest_micro_batch(cfg, probe, budget, **common)
    assert fits > 0
    assert plan.plan(cfg, probe, fits, **common).total_bytes <= budget < plan.plan(cfg, probe, fits + 1,
                                                                                    **common).total_bytes


def test_cli_prints_the_plan_and_the_accumulation_for_a_global_batch(tmp_path, capsys):
    out = plan.main(["--preset", "tiny", "--ds_config", str(REPO / "ds_configs" / "zero2.json"), "--gpus", "8",
                     "--gpu-memory", "1GB", "--reserve", "0GB", "--global-batch", "16384", "--json",
                     str(tmp_path / "plan.json")])
    text = capsys.readouterr().out
    assert "tiny, ZeRO-2, float32, 8 GPU(s) of 1GB" in text and "model states" in text
    assert out["plan"]["micro_batch"] == 8  # 64 pairs over 8 GPUs
    k = out["accumulation"]
    assert k["global_batch"] >= 16384 and k["micro_batch"] <= out["largest_micro_batch"]
    assert json.loads((tmp_path / "plan.json").read_text())["largest_micro_batch"] == out["largest_micro_batch"]
    plan.main(["--preset", "tiny", "--ds_config", str(REPO / "ds_configs" / "zero2.json"), "--gpus", "1",
               "--te-precision", "fp8"])
    assert "--te-precision fp8: activations are the torch layers'" in capsys.readouterr().out  # says it is a bound
    with pytest.raises(ConfigError, match="--gpu-memory '80 gigs': write a size such as 80GB"):
        plan.main(["--preset", "tiny", "--ds_config", str(REPO / "ds_configs" / "zero2.json"), "--gpus", "1",
                   "--gpu-memory", "80 gigs"])


def test_a_checkpointed_probe_reuses_an_unchecked_one_exactly():
    from bmc_fast.model.config import load_model_config

    cfg = load_model_config("tiny", text=plan.MODERNBERT_TOKENS)
    checked = plan.with_checkpointing(cfg, True)
    unchecked = plan.probe(cfg, torch.float32, 127.0)
    assert plan.probe(checked, torch.float32, 127.0, unchecked=unchecked) == plan.probe(checked, torch.float32, 127.0)


def test_deepspeed_settings_read_stage_offload_dtype_and_batch_sizes():
    def read(name, gpus):
        return ds_json.deepspeed_settings(json.loads((REPO / "ds_configs" / name).read_text()), gpus)

    assert read("zero2.json", 2) == ds_json.DeepSpeedSettings(2, False, torch.float32, 32, 1, 64)  # 64 pairs / 2 GPUs
    assert read("zero1_bf16_cpu_offload.json", 4) == ds_json.DeepSpeedSettings(1, True, torch.bfloat16, 16, 1, 64)
    assert read("paper_16k_8gpu_accum2.json", 8) == ds_json.DeepSpeedSettings(2, False, torch.bfloat16, 1024, 2, 16384)
    assert ds_json.deepspeed_settings({"fp16": {"enabled": True}}, 8) == ds_json.DeepSpeedSettings(
        0, False, torch.float16, None, 1, None)


def test_committed_cpu_validation_is_within_the_planners_error():
    """The CPU validation behind ``plan.PLANNER_ERROR``, the margin the trainer's memory preflight warns within."""
    rows = json.loads((REPO / "benchmarks" / "results" / "plan_cpu.json").read_text())["rows"]
    assert {r["shape"] for r in rows} == {"tiny", "mid"} and len(rows) >= 4
    assert plan.PLANNER_ERROR == 0.20
    for r in rows:
        assert 1 - plan.PLANNER_ERROR <= r["predicted_bytes"] / r["measured_bytes"] <= 1 + plan.PLANNER_ERROR, r
