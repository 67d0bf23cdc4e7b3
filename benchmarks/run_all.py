"""Every benchmark, one after another, then the README's tables from their results.

    python benchmarks/run_all.py --quick     # this CPU machine's sizes
    python benchmarks/run_all.py             # the full sizes (a GPU node: device cuda where a benchmark has one)
    python benchmarks/run_all.py --only bench_train bench_text   # a subset, same sizes

Each benchmark runs as its own process (``python benchmarks/NAME.py ARGS``) and writes its
``benchmarks/results/*.{json,md,png}``, each recording the machine and package versions
(``report.machine``). Then ``readme_tables.py`` copies the marked README tables from the new files, and
``benchmarks/results/run_all.json`` records what ran, with which arguments, for how long, on what.
A failing benchmark stops the run (its error shown); the files it did not reach keep their last contents.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from report import machine

from bmc_fast.cli import ArgumentParser, run_main

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> (quick arguments, full arguments). Quick is what this 2-core CPU machine runs in about 15 minutes:
# smaller sizes than the full runs in four places. Two write their own files, so that the README keeps the full
# runs' tables: the context ablation (1 seed of 60 steps, not 3 demo runs of ~12 min each: context_ablation_quick.*)
# and the loss (N = 1,024, 4,096 and 16,384 against open_clip, not the whole grid nor the naive loss:
# loss_cpu_quick.*). The text tower (one repeat) and the loaders (one repeat) write the README's files.
RESULTS = "benchmarks/results"
BENCHMARKS = {
    "bench_plan": (["--paper"], ["--paper"]),
    "paper_gpus": ([], []),  # from bench_plan's plan_paper.json
    "bench_tokens": ([], []),
    "bench_text": (["--batch", "8", "--repeats", "1"], ["--batch", "64", "--repeats", "5", "--device", "cuda"]),
    "bench_loss": (["--n", "1024", "4096", "16384", "--impls", "fused", "open_clip", "--repeats", "1",
                    "--tag", "quick"], ["--device", "cuda"]),
    "bench_accumulation": ([], []),
    "bench_recipe": ([], []),
    "bench_data": (["--repeats", "1"], ["--repeats", "3", "--device", "cuda"]),
    "bench_train": (["--suite", "quick"], ["--suite", "full"]),
    "bench_context": (["--seeds", "0", "--max-steps", "60", "--out", f"{RESULTS}/context_ablation_quick"],
                      ["--seeds", "0", "1", "2"]),
}


def run(name: str, args: list[str]) -> dict:
    command = [sys.executable, str(HERE / f"{name}.py"), *args]
    sys.stderr.write(f"== {name} {' '.join(args)}\n")
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}) after {seconds:.0f} s: "
                           f"{' '.join(command)}")
    sys.stderr.write(f"== {name}: {seconds:.0f} s\n")
    return {"benchmark": name, "args": args, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="benchmarks/run_all.py", description="Every benchmark, then the README tables.")
    parser.add_argument("--quick", action="store_true", help="this CPU machine's sizes (see BENCHMARKS)")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None, help="a subset")
    args = parser.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    started = time.perf_counter()
    runs = [run(name, BENCHMARKS[name][0 if args.quick else 1]) for name in names]
    from readme_tables import main as readme_tables

    readme_tables([])
    summary = {"machine": machine("cpu" if args.quick else "cuda"), "quick": args.quick, "runs": runs,
               "seconds": time.perf_counter() - started}
    (HERE / "results" / "run_all.json").write_text(json.dumps(summary, indent=2))
    sys.stderr.write(f"all done in {summary['seconds'] / 60:.1f} min\n")
    return summary


if __name__ == "__main__":
    run_main(main)
