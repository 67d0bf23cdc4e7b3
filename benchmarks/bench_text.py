"""Text tower forward+backward, padded to 512 vs unpadded (packed), on real and modelled caption lengths.

    python benchmarks/bench_text.py [--batch 8] [--repeats 2]

BioClinical-ModernBERT-base shape (hidden 768, 22 layers, 128-token local window), random init, context
512, one process. Length distributions: the ModernBERT tokenizer over ../shared/data's biomedical
captions and COVID-19 notes (skipped with a reason when absent), a BIOMEDICA-like log-normal with
mean 127 tokens and a LongCAP-like one with mean 323, clipped to [3, 512]. Padded means every caption
padded to 512, as the paper's fork does. Both paths run the same weights on the same batch, side by
side; time is the best of ``--repeats``. Writes benchmarks/results/text_<device>.{json,md,png}.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import report
import torch

from bmc_fast.cli import ArgumentParser, positive_int, run_main
from bmc_fast.data.token_stats import read_texts
from bmc_fast.errors import ConfigError

RESULTS = Path(__file__).parent / "results"
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CONTEXT = 512


def real_lengths() -> tuple[list[int] | None, str]:
    """Token counts (special tokens included) of the shared captions and notes, or (None, why not)."""
    tokenizer_dir = SHARED / "tokenizers" / "modernbert"
    captions = SHARED / "captions" / "biomed_captions.jsonl"
    if not (tokenizer_dir / "tokenizer.json").is_file() or not captions.is_file():
        return None, f"skipped: {SHARED} has no ModernBERT tokenizer or captions"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts = read_texts(str(captions)) + read_texts(str(SHARED / "covid_cxr" / "*.tar"))  # stripped, as trained on
    return [len(e.ids) for e in tokenizer.encode_batch(texts)], f"{len(texts)} real texts"


def log_normal(mean: float, n: int, generator: torch.Generator, sigma: float = 0.6) -> list[int]:
    mu = math.log(mean) - sigma ** 2 / 2  # E[exp(N(mu, sigma²))] = mean
    return torch.exp(mu + sigma * torch.randn(n, generator=generator)).round().long().tolist()


def sample_batch(pool: list[int], batch: int, generator: torch.Generator) -> list[int]:
    picks = torch.randint(len(pool), (batch,), generator=generator).tolist()
    return [min(max(pool[i], 3), CONTEXT) for i in picks]


def time_fwd_bwd(tower, ids, mask, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        tower.zero_grad(set_to_none=True)
        start = time.perf_counter()
        tower(ids, mask).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=positive_int, default=8, help="captions per step")
    parser.add_argument("--repeats", type=positive_int, default=2, help="passes per path; the best is kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"),
                        help="default: cuda when available")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA GPU here: pass --device cpu, or leave --device out")
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    from bmc_fast.model.config import load_model_config
    from bmc_fast.model.text_tower import TextTower

    text_cfg = load_model_config("bmc-longclip-l14-512").text
    text_cfg.pad_token_id, text_cfg.cls_token_id, text_cfg.sep_token_id = 50283, 50281, 50282
    unpadded = TextTower(text_cfg, 768, unpad=True).to(args.device)
    padded = TextTower(text_cfg, 768, unpad=False).to(args.device)
    padded.load_state_dict(unpadded.state_dict())

    generator = torch.Generator().manual_seed(0)
    real, real_note = real_lengths()
    pools = {"biomedica_lognormal_127": log_normal(127, 100_000, generator),
             "longcap_lognormal_323": log_normal(323, 100_000, generator)}
    if real is not None:
        pools = {"real_captions_and_notes": real, **pools}
    cases = []
    for name, pool in pools.items():
        lengths = sample_batch(pool, args.batch, generator)
        ids = torch.full((args.batch, CONTEXT), 50283)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            ids[i, :n] = torch.randint(0, 50280, (n,), generator=generator)
            mask[i, :n] = 1
        ids, mask = ids.to(args.device), mask.to(args.device)
        t_padded = time_fwd_bwd(padded, ids, mask, args.repeats)
        padded_tokens = padded.last_token_counts[0]
        t_unpadded = time_fwd_bwd(unpadded, ids, mask, args.repeats)
        computed, real_tokens = unpadded.last_token_counts
        cases.append({"distribution": name, "pool_mean": sum(pool) / len(pool), "lengths": lengths,
                      "real_tokens": real_tokens, "padded": {"seconds": t_padded, "tokens_computed": padded_tokens},
                      "unpadded": {"seconds": t_unpadded, "tokens_computed": computed},
                      "time_ratio": t_unpadded / t_padded, "tokens_ratio": computed / real_tokens})
        sys.stderr.write(f"{name}: padded {t_padded:.2f} s, unpadded {t_unpadded:.2f} s "
                         f"(ratio {t_unpadded / t_padded:.2f}; {computed}/{padded_tokens} tokens)\n")
    info = {**report.machine(args.device), "batch": args.batch, "context": CONTEXT, "real_data": real_note}
    out = RESULTS / f"text_{'cuda' if args.device.startswith('cuda') else 'cpu'}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "cases": cases}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"Text tower (BioClinical-ModernBERT-base shape, random init) forward+backward, {args.batch} captions, "
             f"context {CONTEXT}; {info.get('gpu', str(info['cores']) + ' CPU cores')}, torch {info['torch']}. "
             f"Real lengths: {real_note}.", "",
             "| lengths | mean in batch | padded s | unpadded s | time ratio | tokens computed / real |",
             "|---|---|---|---|---|---|"]
    for c in cases:
        lines.append(f"| {c['distribution']} | {sum(c['lengths']) / len(c['lengths']):.0f} | "
                     f"{c['padded']['seconds']:.2f} | {c['unpadded']['seconds']:.2f} | {c['time_ratio']:.2f} | "
                     f"{c['tokens_ratio']:.2f} (padded: {c['padded']['tokens_computed'] / c['real_tokens']:.2f}) |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(cases, pools, out.with_suffix(".png"))
    sys.stderr.write("\n".join(lines) + "\n")
    return result


def plot(cases: list[dict], pools: dict[str, list[int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, pool in pools.items():
        left.hist([min(n, 1024) for n in pool], bins=80, range=(0, 1024), histtype="step", density=True, label=name)
    left.axvline(CONTEXT, color="k", linestyle="--", linewidth=1)
    left.set_xlabel("caption tokens (clipped at 1024)")
    left.set_ylabel("density")
    left.legend(fontsize=7)
    xs = range(len(cases))
    right.bar([x - 0.2 for x in xs], [c["padded"]["seconds"] for c in cases], 0.4, label="padded to 512")
    right.bar([x + 0.2 for x in xs], [c["unpadded"]["seconds"] for c in cases], 0.4, label="unpadded (packed)")
    right.set_xticks(list(xs), [c["distribution"].split("_")[0] for c in cases])
    right.set_ylabel("forward+backward (s)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    run_main(main)
