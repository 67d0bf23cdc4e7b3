"""Context-length ablation over several seeds: is the 512-token gain the context, or luck?

    python benchmarks/bench_context.py --seeds 0 1 2

Runs ``python -m bmc_fast.trainer.demo`` once per seed (each seed draws its own synthetic dataset, model
init and data order), then writes ``benchmarks/results/context_ablation.json`` and ``.md`` with the
per-seed Recall@k of context 77 and 512, the T2I R@1 ratio, and the machine, and a bar chart ``.png``.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import report
from report import write_report

from bmc_fast.cli import ArgumentParser, positive_int, read_json_object, run_main
from bmc_fast.trainer import demo

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    import torch

    info = report.machine("cuda" if torch.cuda.is_available() else "cpu")
    return {**info, "accelerator": info.get("gpu", "none (CPU only)")}


def plot(result: dict, path: Path) -> None:
    """Grouped bars: T2I and I2T R@1 at context 77 and 512, one group per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(result["seeds"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.2
    for k, (ctx, metric, colour) in enumerate([("ctx77", "t2i_r1", "#bbbbbb"), ("ctx77", "i2t_r1", "#888888"),
                                               ("ctx512", "t2i_r1", "#4c8bd6"), ("ctx512", "i2t_r1", "#1f4e8c")]):
        values = [result["seeds"][s][ctx][metric] for s in seeds]
        ax.bar([i + (k - 1.5) * width for i in range(len(seeds))], values, width,
               label=f"{ctx[3:]} tokens, {metric[:3].upper()}", color=colour)
    ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    ax.set_ylabel("Recall@1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Context length: findings after a ~110-token preamble", fontsize=10)
    ax.legend(fontsize=8, ncols=2, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(result: dict, out: Path) -> None:
    """OUT.json, OUT.png and OUT.md: retrieval per seed, then zero-shot accuracy per seed (in percent)."""
    seeds = result["seeds"]
    ratios = result["t2i_r1_ratio_512_over_77"]["per_seed"]
    table = [[seed, f"{r['ctx77']['t2i_r1']:.1f}", f"{r['ctx512']['t2i_r1']:.1f}", f"{r['ctx77']['i2t_r1']:.1f}",
              f"{r['ctx512']['i2t_r1']:.1f}", f"{ratio:.1f}x"] for (seed, r), ratio in zip(seeds.items(), ratios)]
    markdown = write_report(out, result, f"Context-length ablation ({result['what']}). Machine: "
                            f"{result['machine']['cores']} cores, {result['machine']['accelerator']}, torch "
                            f"{result['machine']['torch']}.",
                            ["seed", "ctx77 T2I R@1", "ctx512 T2I R@1", "ctx77 I2T R@1", "ctx512 I2T R@1", "T2I ratio"],
                            table, plot=lambda path: plot(result, path))
    if all("zeroshot_colour" in r["ctx77"] for r in seeds.values()):
        tasks = [("zeroshot_modality", "modality (4)"), ("zeroshot_colour", "first lesion's colour (8)")]
        cells = [("multiple_choice", "ctx77"), ("multiple_choice", "ctx512"), ("top1", "ctx77"), ("top1", "ctx512")]
        rows = ["| " + " | ".join([seed, label, *(f"{r[ctx][task][metric]:.1f}" for metric, ctx in cells)]) + " |"
                for seed, r in seeds.items() for task, label in tasks]
        columns = ["seed", "task (classes)", "ctx77 multiple choice", "ctx512 multiple choice",
                   "ctx77 all-classes top-1", "ctx512 all-classes top-1"]
        zeroshot = ("\nZero-shot classification, labels from each eval sample's attributes: 3 choices (multiple "
                    "choice; chance 33.3%) and all classes (top-1).\n\n| " + " | ".join(columns) + " |\n"
                    + "|---" * len(columns) + "|\n" + "\n".join(rows) + "\n")
        out.with_suffix(".md").write_text(markdown + zeroshot)
        sys.stdout.write(zeroshot)


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default="runs/bench_context", help="where the demo runs go")
    parser.add_argument("--out", default=str(RESULTS / "context_ablation"), help="output path without suffix")
    parser.add_argument("--from-json", action="store_true",
                        help="rewrite OUT.md and OUT.png from an existing OUT.json (no training)")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="steps per demo run (default: the demo's)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        result = read_json_object(out.with_suffix(".json"), f"--from-json: {str(out.with_suffix('.json'))!r} (--out "
                                  f"{args.out!r} + .json)", "run without --from-json first, or fix --out")
        write(result, out)
        return result

    per_seed, started = {}, time.perf_counter()
    for seed in args.seeds:
        steps = ["--max-steps", str(args.max_steps)] if args.max_steps else []
        per_seed[seed] = demo.main(["--out", f"{args.runs}/seed{seed}", "--seed", str(seed), *steps])
    ratios = [r["ctx512"]["t2i_r1"] / max(r["ctx77"]["t2i_r1"], 0.5) for r in per_seed.values()]
    result = {
        "what": "tiny BMC-LongCLIP, embedded synthetic data, 2 CPU ranks (deepspeed launcher, ZeRO-2), "
                "context 77 vs 512, all else equal; Recall@k in percent on 200 held-out pairs",
        "machine": machine(),
        "seconds": time.perf_counter() - started,
        "max_steps": args.max_steps,
        "seeds": {str(s): r for s, r in per_seed.items()},
        "t2i_r1_ratio_512_over_77": {"per_seed": ratios, "min": min(ratios)},
        "ctx512_t2i_r1_mean": statistics.mean(r["ctx512"]["t2i_r1"] for r in per_seed.values()),
        "ctx77_t2i_r1_mean": statistics.mean(r["ctx77"]["t2i_r1"] for r in per_seed.values()),
    }
    write(result, out)
    return result


if __name__ == "__main__":
    run_main(main)
