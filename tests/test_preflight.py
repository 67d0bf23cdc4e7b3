"""The memory preflight: the planner's total against one GPU's memory passes, warns (over, within the planner's
error) or refuses with a fix the planner says fits; the trainer runs it on CUDA only, before any model.

Budgets come from the plan itself (the tiny preset, ``ds_configs/zero2.json`` on 2 GPUs: micro batch 32, fp32),
so no outcome can hold by accident of a hard-coded size."""
import dataclasses
import json
import logging
import re

import pytest
import torch

import bmc_fast.trainer.loop
import bmc_fast.trainer.metrics
import bmc_fast.trainer.prepare
from bmc_fast import ds_json, plan, train
from bmc_fast.errors import ConfigError
from bmc_fast.model.config import load_model_config
from helpers import REPO

ZERO2 = REPO / "ds_configs" / "zero2.json"
GPUS = 2
RESERVE = plan.parse_bytes(plan.DEFAULT_RESERVE, "--reserve")
FIX = re.compile(r'(pass --grad-checkpointing and )?set "train_micro_batch_size_per_gpu": (\d+) and '
                 r'"gradient_accumulation_steps": (\d+)')


@pytest.fixture(scope="module")
def tiny():
    return load_model_config("tiny", text=plan.MODERNBERT_TOKENS)


@pytest.fixture(scope="module")
def ds_config():
    return json.loads(ZERO2.read_text())


def _preflight(model_cfg, ds_config, memory, **kwargs):
    return plan.preflight(model_cfg, ds_config, GPUS, memory, gpus_per_node=GPUS, preset="tiny",
                          source="--ds_config zero2.json", **kwargs)


@pytest.fixture(scope="module")
def planned(tiny, ds_config):
    """(bytes a GPU planned for the run, the same with activation checkpointing), on a GPU far larger than both."""
    run = _preflight(tiny, ds_config, 2 ** 50, announce=False)
    checked = _preflight(plan.with_checkpointing(tiny, True), ds_config, 2 ** 50, announce=False)
    assert run.outcome == checked.outcome == "pass" and run.plan.micro_batch == 32
    assert checked.plan.total_bytes < run.plan.total_bytes / (1 + plan.PLANNER_ERROR)  # the fixes below need it
    return run.plan.total_bytes, checked.plan.total_bytes


def _fits(model_cfg, ds_config, micro, budget, checkpointing) -> bool:
    """Whether the planner, run afresh, puts ``micro`` pairs a GPU within ``budget``."""
    model_cfg = plan.with_checkpointing(model_cfg, checkpointing)
    settings = ds_json.deepspeed_settings(ds_config, GPUS)
    common = plan.plan_arguments(settings, GPUS, GPUS, plan.planned_tokens(model_cfg, plan.MEAN_TOKENS), "tiny")
    measured = plan.probe(model_cfg, settings.dtype, common["tokens"])
    return plan.plan(model_cfg, measured, micro, **common).total_bytes <= budget


def test_a_plan_under_the_budget_passes(tiny, ds_config, planned, caplog):
    total, _ = planned
    with caplog.at_level(logging.INFO, logger="bmc_fast.plan"):
        verdict = _preflight(tiny, ds_config, RESERVE + total * 1.5)
    assert verdict.outcome == "pass" and verdict.plan.total_bytes == total
    assert verdict.budget_bytes == pytest.approx(total * 1.5) and verdict.largest_micro_batch > 32
    assert verdict.probe_seconds > 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "memory preflight (pass; probe" in caplog.text


def test_a_plan_over_within_the_planners_error_warns(tiny, ds_config, planned, caplog):
    total, _ = planned
    with caplog.at_level(logging.INFO, logger="bmc_fast.plan"):
        verdict = _preflight(tiny, ds_config, RESERVE + total / 1.1)
    assert verdict.outcome == "warn" and verdict.largest_micro_batch < 32
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "10% over but within the planner's 20% error: launching" in warning.getMessage()
    assert f"take a micro batch of at most {verdict.largest_micro_batch}" in warning.getMessage()
    caplog.clear()
    assert _preflight(tiny, ds_config, RESERVE + total / 1.1, announce=False).outcome == "warn"
    assert not [r for r in caplog.records if r.name == "bmc_fast.plan"]  # the trainer's ranks other than 0


def test_a_plan_that_fits_with_checkpointing_is_refused_naming_the_flag(tiny, ds_config, planned):
    total, checked = planned
    budget = (checked + total / (1 + plan.PLANNER_ERROR)) / 2  # over by more than 20%; checkpointing fits
    with pytest.raises(ConfigError, match=r"--ds_config zero2.json: the memory planner puts tiny at [\d.]+ GiB a GPU "
                                          r"\(micro batch 32, ZeRO-2, float32, activation checkpointing off\) against "
                                          r"[\d.]+ GiB: .* beyond the planner's 20% error\); pass --grad-checkpointing "
                                          r"\(planned [\d.]+ GiB\)"):
        _preflight(tiny, ds_config, RESERVE + budget)


def test_the_refusals_micro_batch_and_accumulation_fit_and_keep_the_step(tiny, ds_config, planned):
    total, _ = planned
    budget = total / 2
    with pytest.raises(ConfigError, match=r"\(100% over, beyond the planner's 20% error\); pass --grad-checkpointing "
                                          r"and set") as error:
        _preflight(tiny, ds_config, RESERVE + budget)
    fixes = FIX.findall(str(error.value))
    assert len(fixes) == 2  # with checkpointing, and without it
    for checkpointing, micro, k in fixes:
        micro, k = int(micro), int(k)
        assert micro * k * GPUS == ds_config["train_batch_size"] and k > 1
        assert _fits(tiny, ds_config, micro, budget, bool(checkpointing))
        # the largest that divides the step: the next larger divisor of 32 pairs a GPU does not fit
        assert micro == 32 or not _fits(tiny, ds_config, next(m for m in range(micro + 1, 33) if 32 % m == 0),
                                        budget, bool(checkpointing))


def test_not_one_pair_fits_after_the_reserve(tiny, ds_config):
    with pytest.raises(ConfigError, match=r"nothing left, beyond the planner's 20% error\); not even 1 pair a GPU "
                                          r"fits, even with --grad-checkpointing: shard the model states further"):
        _preflight(tiny, ds_config, RESERVE)


def test_a_fix_names_the_shipped_recipe_that_runs_it():
    paper = ds_json.deepspeed_settings(json.loads((REPO / "ds_configs" / "paper_16k_8gpu.json").read_text()), 8)
    assert (paper.micro_batch, paper.accumulation, paper.global_batch) == (2048, 1, 16384)
    halved = ds_json.DeepSpeedSettings(paper.stage, paper.offload, paper.dtype, 1024, 2, 16384)
    assert plan._recipe(halved, 8) == "paper_16k_8gpu_accum2.json"
    assert plan._recipe(halved, 4) is None  # 1024 x 2 x 4 is not 16384 pairs
    assert plan._recipe(ds_json.DeepSpeedSettings(3, False, torch.bfloat16, 1024, 2, 16384), 8) is None  # ZeRO-3


# --- the trainer: prepare() runs it on CUDA only, before any model is built ------------------------------------


@pytest.fixture
def launch(small_data, tmp_path, monkeypatch):
    """``train.main`` for one rank on the small dataset; the training loop (where the model is built) fails the
    test if it is reached, so a ConfigError from it came from prepare."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29598").items():
        monkeypatch.setenv(key, value)
    reached = []
    monkeypatch.setattr(bmc_fast.trainer.loop, "run", lambda prepared: reached.append(prepared) or prepared)
    monkeypatch.setattr(bmc_fast.trainer.metrics, "setup_logging", lambda rank: None)  # keeps caplog's handler

    def main(*extra):
        return train.main(["--ds_config", str(ZERO2), "--train-data", small_data["train"], "--eval-data",
                           small_data["eval"], "--tokenizer", small_data["tokenizer_dir"], "--output-dir",
                           str(tmp_path / "run"), "--max-steps", "50", *extra]), reached

    return main


def _on_cuda(monkeypatch, memory):
    monkeypatch.setattr(bmc_fast.trainer.prepare, "_accelerator_dtypes",
                        lambda: ("cuda", ["float32", "float16", "bfloat16"]))
    monkeypatch.setattr(bmc_fast.trainer.prepare, "_device_memory", lambda local_rank: memory)


def _no_preflight(monkeypatch):
    def called(*args, **kwargs):
        raise AssertionError("the memory preflight ran")

    monkeypatch.setattr(plan, "preflight", called)


def test_prepare_skips_the_preflight_off_cuda(launch, monkeypatch, caplog):
    _no_preflight(monkeypatch)
    with caplog.at_level(logging.DEBUG, logger="bmc_fast.trainer.prepare"):
        _, reached = launch()
    assert reached and caplog.text.count("memory preflight: skipped on cpu") == 1


def test_prepare_refuses_on_cuda_before_a_model_is_built(launch, monkeypatch):
    _on_cuda(monkeypatch, RESERVE + 2 ** 20)  # a GPU with 1 MiB past the reserve
    with pytest.raises(ConfigError, match=r"--ds_config .*zero2.json: the memory planner puts tiny at [\d.]+ GiB a "
                                          r"GPU \(micro batch 64, .*\); not even 1 pair a GPU fits.*; or pass "
                                          r"--skip-memory-check to launch anyway$"):
        launch()


def test_prepare_on_cuda_passes_a_gpu_that_fits_or_skips_when_asked(launch, monkeypatch, caplog):
    _on_cuda(monkeypatch, 2 ** 40)
    with caplog.at_level(logging.INFO, logger="bmc_fast.plan"):
        _, reached = launch()
    assert reached and "memory preflight (pass; probe" in caplog.text
    _on_cuda(monkeypatch, RESERVE)
    _no_preflight(monkeypatch)
    _, reached = launch("--skip-memory-check", "--overwrite")
    assert len(reached) == 2


def test_the_probe_runs_the_torch_layers_whatever_the_run_asks_for(tiny, ds_config):
    """A run with Transformer Engine FP8 and flash attention (CUDA only) is planned on the torch layers (an
    upper bound for FP8), as python -m bmc_fast.plan plans it, instead of failing to build on the CPU."""
    cuda_only = dataclasses.replace(tiny, te_precision="fp8", attn_backend="flash")
    verdict = _preflight(cuda_only, ds_config, 1e12, announce=False)
    assert verdict.outcome == "pass"
    assert verdict.plan.total_bytes == _preflight(tiny, ds_config, 1e12, announce=False).plan.total_bytes
