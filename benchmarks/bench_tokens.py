"""Token waste of the real captions in ../shared/data at CLIP's, twice CLIP's and BMC-CLIP's context.

    python benchmarks/bench_tokens.py

Runs ``bmc_fast.data.token_stats`` (the real ModernBERT tokenizer, every caption counted with [CLS] and
[SEP], never truncated) over each text set in ``../shared/data``: the ROCO / ARCH / IU X-ray captions
and the COVID-19 notes of ``covid_cxr``. Writes ``benchmarks/results/token_waste.{json,md}`` (one row
per set and cutoff, with the machine and package versions) and the paper's Figure 1 per set,
``token_waste_<set>.png``. A set whose files are absent is recorded as skipped.
"""
from __future__ import annotations

import time
from pathlib import Path

from report import machine, write_report

from bmc_fast.cli import ArgumentParser, check_output_file, run_main
from bmc_fast.data import token_stats
from bmc_fast.errors import ConfigError

RESULTS = Path(__file__).parent / "results"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TEXT_SETS = {  # name -> (data argument of token_stats, what it is)
    "biomed_captions": (SHARED / "captions" / "biomed_captions.jsonl", "ROCO, ARCH, IU X-ray captions"),
    "covid_cxr": (SHARED / "covid_cxr" / "*.tar", "COVID-19 chest X-ray notes"),
}


def _present(data: Path) -> bool:
    return any(data.parent.glob(data.name))


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default=None,
                        help="Hugging Face tokenizer directory (default: ../shared/data's ModernBERT; every set is "
                             "skipped where it is absent)")
    parser.add_argument("--cutoffs", type=int, nargs="+", default=list(token_stats.DEFAULT_CUTOFFS))
    parser.add_argument("--out", default=str(RESULTS / "token_waste"), help="output path without suffix")
    args = parser.parse_args(argv)
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise ConfigError(f"--tokenizer {args.tokenizer!r} is not a directory: pass a Hugging Face tokenizer "
                          "directory, or leave --tokenizer out for ../shared/data's ModernBERT")
    tokenizer = args.tokenizer or str(SHARED / "tokenizers" / "modernbert")
    out = check_output_file(args.out, "--out")
    sets, started = {}, time.perf_counter()
    for name, (data, what) in TEXT_SETS.items():
        if not _present(data) or not Path(tokenizer).is_dir():
            sets[name] = {"what": what, "status": f"skipped: {data} or {tokenizer} absent"}
            continue
        plot = out.with_name(f"{out.name}_{name}.png")
        stats = token_stats.main(["--tokenizer", tokenizer, "--data", str(data),
                                  "--cutoffs", *map(str, args.cutoffs), "--plot", str(plot)])
        sets[name] = {"what": what, **stats}
    result = {"what": "token waste per context length (tokens beyond the cutoff, never seen by the text tower)",
              "machine": machine("cpu"), "seconds": time.perf_counter() - started, "sets": sets}
    rows = []
    for name, stats in sets.items():
        if "cutoffs" not in stats:
            rows.append([name, stats["status"], "", "", "", "", ""])
            continue
        rows += [[name, f"{stats['n_texts']:,}", f"{stats['mean']:.1f}", f"{stats['median']:g}", str(row["cutoff"]),
                  f"{token_stats.format_pct(row['waste_pct'])}%", f"{token_stats.format_pct(row['truncated_pct'])}%"]
                 for row in stats["cutoffs"]]
    write_report(out, result, f"Token waste, ModernBERT tokenizer with [CLS]/[SEP], captions never truncated "
                 f"({result['machine']['cores']} cores, CPU).",
                 ["texts", "captions", "mean tokens", "median", "context", "tokens wasted", "captions truncated"],
                 rows)
    return result


if __name__ == "__main__":
    run_main(main)
