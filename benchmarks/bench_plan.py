"""The memory planner (``python -m bmc_fast.plan``) against measured peaks on this CPU.

    python benchmarks/bench_plan.py [--cases tiny:32 tiny:64 mid:16 mid:32]

Each case is one real DeepSpeed training step in a fresh process (1 rank over gloo, ZeRO-2, fp32, AdamW, the
fused loss, unpadded text): model, engine and a warm-up step (the optimizer allocates its moments there),
then one measured step. Measured: the resident set's high-water mark during that step above the resident
set before the model existed (so model states count), with glibc returning blocks over 64 KiB at once
(``MALLOC_MMAP_THRESHOLD_=65536``) as in ``bench_accumulation.py``. Predicted: ``bmc_fast.plan.plan`` for
the same preset, micro batch, one GPU, ZeRO-2, fp32 and mean caption length, its probe run in the same
process before the model is built. Shapes: ``tiny`` and a mid-size one (``bench_accumulation.SHAPE``:
ViT 96 px / patch 8, width 256, 6 layers; ModernBERT hidden 256, 6 layers, context 128).

Writes ``benchmarks/results/plan_cpu.{json,md}``; with ``--paper`` also ``plan_paper.{json,md}``: each
``ds_configs/paper_*gpu*.json`` recipe on 80 GB GPUs, with and without activation checkpointing (computed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench_accumulation import SHAPE
from bench_loss import _status, machine
from report import write_report

from bmc_fast.cli import ArgumentParser, run_main

RESULTS = Path(__file__).parent / "results"
SHAPES = {"tiny": {}, "mid": SHAPE}
LENGTHS = {"tiny": (64, 192), "mid": (32, 128)}  # caption lengths drawn uniformly in [lo, hi]


def run_case(shape: str, micro: int) -> dict:
    """One case in this process: the plan, then the measured step."""
    import deepspeed
    import torch

    from bmc_fast.kernels import FusedClipLoss
    from bmc_fast.model.clip import BMCLongCLIP
    from bmc_fast.model.config import load_model_config
    from bmc_fast.plan import MODERNBERT_TOKENS, plan, probe

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(29500 + os.getpid() % 1000)).items():
        os.environ[key] = value
    torch.manual_seed(0)
    overrides = SHAPES[shape]
    cfg = load_model_config("tiny", **{**overrides, "text": {**overrides.get("text", {}), **MODERNBERT_TOKENS}})
    lo, hi = LENGTHS[shape]
    lengths = torch.randint(lo, hi + 1, (micro,))
    predicted = plan(cfg, probe(cfg, torch.float32, float(lengths.float().mean())), micro, gpus=1, gpus_per_node=1,
                     stage=2, dtype=torch.float32, offload=False, tokens=float(lengths.float().mean()), preset=shape)
    context = cfg.context_length
    mask = (torch.arange(context) < lengths[:, None]).long()
    ids = torch.randint(3, 50280, (micro, context)) * mask + MODERNBERT_TOKENS["pad_token_id"] * (1 - mask)
    pixels = torch.randn(micro, 3, cfg.vision.image_size, cfg.vision.image_size)
    deepspeed.init_distributed(dist_backend="gloo")
    base = _status()["VmRSS"]
    model = BMCLongCLIP(cfg)
    config = {"train_batch_size": micro, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "torch_adam": True}},
              "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    loss_fn = FusedClipLoss()

    def step():
        loss = loss_fn(*engine(pixels, ids, mask))
        engine.backward(loss)
        engine.step()
        return float(loss)

    step()  # the optimizer's moments come to life here
    Path("/proc/self/clear_refs").write_text("5")
    step()
    measured = _status()["VmHWM"] - base
    return {"shape": shape, "micro": micro, "mean_tokens": float(lengths.float().mean()),
            "params": sum(p.numel() for p in model.parameters()),
            "predicted_bytes": predicted.total_bytes, "measured_bytes": measured,
            "ratio": predicted.total_bytes / measured, "predicted": {
                "model_states": predicted.model_states_bytes, "activations": predicted.activation_bytes,
                "loss": predicted.loss_bytes}}


RECIPES = {"paper_16k_16gpu.json": 16, "paper_16k_8gpu.json": 8, "paper_16k_8gpu_accum2.json": 8,
           "paper_8k_8gpu.json": 8, "paper_16k_4gpu_accum4.json": 4}


def paper_recipes(gpu_memory: str = "80GB", reserve: str = "4GB") -> dict:
    """Each ds_configs/paper_*.json recipe on 80 GB GPUs, with and without activation checkpointing: its micro
    batch's plan and the largest micro batch that fits (bf16, BIOMEDICA's 127 tokens a caption). Computed."""
    import torch

    from bmc_fast.model.config import load_model_config
    from bmc_fast.plan import MODERNBERT_TOKENS, largest_micro_batch, parse_bytes, plan, probe

    budget = parse_bytes(gpu_memory, "--gpu-memory") - parse_bytes(reserve, "--reserve")
    rows = []
    for checkpointing in (False, True):
        flag = {"grad_checkpointing": True} if checkpointing else {}
        cfg = load_model_config("bmc-longclip-l14-512", vision=flag, text={**MODERNBERT_TOKENS, **flag})
        measured = probe(cfg, torch.bfloat16, 127.0)
        for recipe, gpus in RECIPES.items():
            ds = json.loads((Path(__file__).parent.parent / "ds_configs" / recipe).read_text())
            common = dict(gpus=gpus, gpus_per_node=min(gpus, 8), stage=ds["zero_optimization"]["stage"],
                          dtype=torch.bfloat16, offload=False, tokens=127.0, preset="bmc-longclip-l14-512")
            chosen = plan(cfg, measured, ds["train_micro_batch_size_per_gpu"], **common)
            rows.append({"recipe": recipe, "gpus": gpus, "grad_checkpointing": checkpointing,
                         "micro_batch": chosen.micro_batch, "total_bytes": chosen.total_bytes,
                         "model_states_bytes": chosen.model_states_bytes, "activation_bytes": chosen.activation_bytes,
                         "fits": chosen.total_bytes <= budget,
                         "largest_micro_batch": largest_micro_batch(cfg, measured, budget, **common)})
    return {"gpu_memory": gpu_memory, "reserve": reserve, "rows": rows}


def _spawn(shape: str, micro: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps([shape, micro])], capture_output=True,
                          text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"case {shape}:{micro} failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="benchmarks/bench_plan.py", description="The memory planner against CPU peaks.")
    parser.add_argument("--cases", nargs="+", default=["tiny:32", "tiny:64", "mid:16", "mid:32"],
                        help="SHAPE:MICRO_BATCH, SHAPE one of " + ", ".join(SHAPES))
    parser.add_argument("--paper", action="store_true", help="also the paper recipes on 80 GB GPUs (computed)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in a child process
    args = parser.parse_args(argv)
    if args.case:
        shape, micro = json.loads(args.case)
        sys.stdout.write(json.dumps(run_case(shape, micro)) + "\n")
        return {}
    rows = []
    for case in args.cases:
        shape, _, micro = case.partition(":")
        if shape not in SHAPES or not micro.isdigit() or int(micro) < 1:
            parser.error(f"--cases {case!r}: write SHAPE:MICRO_BATCH with SHAPE one of {', '.join(SHAPES)}")
        rows.append(_spawn(shape, int(micro)))
        r = rows[-1]
        sys.stderr.write(f"{case}: predicted {r['predicted_bytes'] / 2**20:.0f} MiB, measured "
                         f"{r['measured_bytes'] / 2**20:.0f} MiB ({r['ratio']:.2f})\n")
    columns = ["shape", "micro batch", "mean tokens", "predicted (MiB)", "measured peak (MiB)", "predicted / measured"]
    table = [[r["shape"], str(r["micro"]), f"{r['mean_tokens']:.0f}", f"{r['predicted_bytes'] / 2**20:.0f}",
              f"{r['measured_bytes'] / 2**20:.0f}", f"{r['ratio']:.2f}"] for r in rows]
    payload = {"machine": machine("cpu"), "rows": rows}
    header = ("The memory planner against one measured DeepSpeed step (1 rank, ZeRO-2, fp32, unpadded text) on "
              f"this CPU ({payload['machine']['cores']} cores); peak resident set above the pre-model baseline.")
    write_report(RESULTS / "plan_cpu", payload, header, columns, table)
    if args.paper:
        paper = paper_recipes()
        columns = ["recipe", "GPUs", "activation checkpointing", "micro batch", "planned GiB / GPU",
                   "fits 80 GB", "largest micro batch that fits"]
        table = [[r["recipe"], str(r["gpus"]), "on" if r["grad_checkpointing"] else "off", str(r["micro_batch"]),
                  f"{r['total_bytes'] / 2**30:.1f}", "yes" if r["fits"] else "no", str(r["largest_micro_batch"])]
                 for r in paper["rows"]]
        header = ("Computed, not measured: `bmc_fast.plan` for BMC-LongCLIP (ViT-L/14 + ModernBERT-base, bf16, "
                  "ZeRO-2, 127 tokens a caption, unpadded) on 80 GB GPUs with 4 GB reserved; activations from a "
                  "probe on this CPU (torch SDPA, not flash-attn or Transformer Engine).")
        write_report(RESULTS / "plan_paper", {"machine": machine("cpu"), **paper}, header, columns, table)
    return payload


if __name__ == "__main__":
    run_main(main)
