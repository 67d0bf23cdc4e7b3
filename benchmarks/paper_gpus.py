"""On paper, for GPUs: the paper's 16K step on 16×A100-80GB, 8×H100-80GB and 8×H200, computed, not measured.

    python benchmarks/paper_gpus.py

FLOPs per step from ``bmc_fast.model.flops`` (16,384 images, 16,384 captions of BIOMEDICA-like lengths: log-normal,
mean 127 tokens, σ 0.6, clipped to [8, 512], seed 0), unpadded against padded to 512; with activation
checkpointing one more forward of both towers (4 instead of 3 forward-equivalents). Memory per GPU: the
planner's (``benchmarks/results/plan_paper.json``, activation checkpointing on) for the recipe each
cluster runs. Step time at 40% and 60% MFU of the dense bf16 peak (``bmc_fast.model.flops.PEAK_BF16_FLOPS``).

Writes ``benchmarks/results/paper_gpus.{json,md}``; the README's table is that markdown (a test checks it).
"""
from __future__ import annotations

import json
from pathlib import Path

from report import machine, write_report

from bmc_fast.cli import ArgumentParser, run_main

RESULTS = Path(__file__).parent / "results"
PAIRS = 16384
CLUSTERS = (  # name, GPUs, peak key, memory, the recipe it runs
    ("16×A100-80GB", 16, "A100", "80 GB", "paper_16k_16gpu.json"),
    ("8×H100-80GB", 8, "H100", "80 GB", "paper_16k_8gpu_accum2.json"),
    ("8×H200", 8, "H200", "141 GB", "paper_16k_8gpu.json"),
)


def caption_lengths(n: int = PAIRS, mean: float = 127.0, sigma: float = 0.6, seed: int = 0) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, n)
    return np.clip(np.rint(lengths), 8, 512).astype(int).tolist()


def main(argv: list[str] | None = None) -> dict:
    from bmc_fast.model.config import load_model_config
    from bmc_fast.model.flops import PEAK_BF16_FLOPS, train_step_flops
    from bmc_fast.plan import MODERNBERT_TOKENS

    ArgumentParser(prog="benchmarks/paper_gpus.py", description=__doc__.split("\n")[0]).parse_args(argv)
    cfg = load_model_config("bmc-longclip-l14-512", text=MODERNBERT_TOKENS)
    lengths = caption_lengths()
    unpadded = train_step_flops(cfg, PAIRS, lengths)
    padded = train_step_flops(cfg, PAIRS, lengths, padded_to=512)
    checkpointed = unpadded * 4 / 3  # one more forward
    memory = {r["recipe"]: r for r in json.loads((RESULTS / "plan_paper.json").read_text())["rows"]
              if r["grad_checkpointing"]}
    rows = []
    for name, gpus, peak_key, capacity, recipe in CLUSTERS:
        peak = PEAK_BF16_FLOPS[peak_key]
        row = {"cluster": name, "gpus": gpus, "peak_bf16_flops": peak, "recipe": recipe,
               "memory_per_gpu_bytes": memory[recipe]["total_bytes"], "capacity": capacity}
        for mfu in (0.4, 0.6):
            row[f"step_seconds_mfu{int(mfu * 100)}"] = checkpointed / (gpus * peak * mfu)
        row["padded_step_seconds_mfu40"] = padded * 4 / 3 / (gpus * peak * 0.4)
        rows.append(row)
    result = {"machine": machine("cpu"), "pairs": PAIRS, "mean_tokens": sum(lengths) / len(lengths),
              "flops_unpadded": unpadded, "flops_padded_512": padded, "flops_unpadded_checkpointed": checkpointed,
              "rows": rows}
    header = (f"Computed, not measured. One step of {PAIRS:,} pairs: {unpadded / 1e15:.0f} PFLOP unpadded "
              f"(mean {result['mean_tokens']:.0f} tokens a caption) against {padded / 1e15:.0f} PFLOP padded to "
              f"512 ({padded / unpadded:.2f}×); with activation checkpointing {checkpointed / 1e15:.0f} PFLOP. "
              "Memory: `bmc_fast.plan`, activation checkpointing on.")
    columns = ["cluster", "recipe", "memory / GPU (planned)", "step at 40% MFU", "step at 60% MFU",
               "padded to 512, 40% MFU"]
    table = [[r["cluster"], f"`{r['recipe']}`", f"{r['memory_per_gpu_bytes'] / 2**30:.0f} GiB of {r['capacity']}",
              f"{r['step_seconds_mfu40']:.1f} s", f"{r['step_seconds_mfu60']:.1f} s",
              f"{r['padded_step_seconds_mfu40']:.1f} s"] for r in rows]
    write_report(RESULTS / "paper_gpus", result, header, columns, table)
    return result


if __name__ == "__main__":
    run_main(main)
