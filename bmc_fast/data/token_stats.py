"""Token waste: how much caption text a context-length cutoff throws away (the paper's Figure 1).

For each text, ``len`` is its token count *with* the tokenizer's special tokens ([CLS], [SEP]), never
truncated. For a cutoff ``c``:

    waste_pct     = 100 · Σ max(0, len − c) / Σ len     (share of all tokens that a c-token tower never sees)
    truncated_pct = 100 · #{len > c} / #texts           (share of texts that lose something)

Texts are stripped as the training loader strips them; empty ones are skipped and reported as
``n_empty``. Input is a ``.jsonl`` file (the ``text`` field of each line) or a WebDataset shard pattern
(every ``.txt`` member).

    python -m bmc_fast.data.token_stats --tokenizer DIR --data SHARDS_OR_JSONL \\
        --cutoffs 77 154 512 --json OUT.json --plot OUT.png
"""
from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from bmc_fast.cli import ArgumentParser, check_output_file, run_main
from bmc_fast.data.samples import CAPTION_EXTENSION
from bmc_fast.data.shards import REMOTE_PREFIXES, expand_shards
from bmc_fast.data.tar_samples import read_tar_samples
from bmc_fast.errors import ConfigError

_logger = logging.getLogger(__name__)

BATCH_SIZE = 1000  # texts per encode_batch call
DEFAULT_CUTOFFS = (77, 154, 512)  # CLIP's context, twice that, BMC-CLIP's


def read_texts(data: str, flag: str = "--data") -> list[str]:
    """Every text in ``data`` (a ``.jsonl`` file or a shard pattern), stripped; empty ones included."""
    if data.endswith(".jsonl"):
        return list(_jsonl_texts(Path(data), flag))
    return list(_shard_texts(expand_shards(data, flag), flag))


def _jsonl_texts(path: Path, flag: str) -> Iterator[str]:
    if not path.is_file():
        raise ConfigError(f"{flag} {str(path)!r} is not a file: pass a .jsonl file with one "
                          '{"text": ...} object a line, or a WebDataset shard pattern')
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError) as error:
                raise ConfigError(f"{flag} {str(path)!r} line {number}: not a JSON object ({error}); write one "
                                  '{"text": ...} object a line') from error
            if not isinstance(text, str):
                raise ConfigError(f"{flag} {str(path)!r} line {number}: no string 'text' field (got "
                                  f"{type(text).__name__}); every line needs {{\"text\": \"...\"}}")
            yield text.strip()


def _shard_texts(urls: Sequence[str], flag: str) -> Iterator[str]:
    """The caption (``.txt`` member) of each sample of each local tar, as UTF-8 (bad bytes replaced), stripped."""
    for url in urls:
        if url.startswith(REMOTE_PREFIXES):
            raise ConfigError(f"{flag}: {url!r} is remote; token statistics read local shards only, copy "
                              "them to disk first")
        for sample in read_tar_samples(url, flag=flag):  # grouped as the loaders group them
            if CAPTION_EXTENSION in sample:
                yield sample[CAPTION_EXTENSION].decode("utf-8", errors="replace").strip()


def token_lengths(texts: Sequence[str], tokenizer, batch_size: int = BATCH_SIZE) -> list[int]:
    """Token count of each text, special tokens included, never truncated.

    ``tokenizer`` is a transformers fast tokenizer or a ``tokenizers.Tokenizer``; its Rust backend is
    copied without truncation or padding, so neither the wrapper's state nor ``model_max_length`` (and
    its "longer than" warning) can change a count.
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(getattr(tokenizer, "backend_tokenizer", tokenizer).to_str())
    backend.no_truncation()
    backend.no_padding()
    starts = range(0, len(texts), batch_size)
    bar = tqdm(starts, desc="tokenising", unit="batch", disable=True if len(starts) < 10 else None)
    lengths: list[int] = []
    for start in bar:
        encodings = backend.encode_batch(list(texts[start:start + batch_size]), add_special_tokens=True)
        lengths.extend(len(encoding.ids) for encoding in encodings)
    return lengths


def waste_stats(lengths: Sequence[int], cutoffs: Sequence[int]) -> dict:
    """Count, total, mean and median of ``lengths``, and waste/truncation percentages per cutoff."""
    _check_cutoffs(cutoffs, "cutoffs")
    if not lengths:
        raise ValueError("waste_stats: lengths is empty; there are no texts to measure")
    total = sum(lengths)
    rows = [{"cutoff": cutoff,
             "waste_pct": 100.0 * sum(max(0, n - cutoff) for n in lengths) / total,
             "truncated_pct": 100.0 * sum(n > cutoff for n in lengths) / len(lengths)}
            for cutoff in cutoffs]
    return {"n_texts": len(lengths), "n_tokens": total, "mean": total / len(lengths),
            "median": float(statistics.median(lengths)), "cutoffs": rows}


def _check_cutoffs(cutoffs: Sequence[int], flag: str) -> None:
    if not cutoffs:
        raise ConfigError(f"{flag}: give at least one cutoff, e.g. {flag} 77 154 512")
    bad = [c for c in cutoffs if not isinstance(c, int) or isinstance(c, bool) or c <= 0]
    if bad:
        raise ConfigError(f"{flag} {list(cutoffs)}: every cutoff must be an integer > 0 (a context length in "
                          f"tokens), got {bad}; e.g. {flag} 77 154 512")


def shard_waste(urls: Sequence[str], tokenizer, cutoffs: Sequence[int], max_texts: int = 5000) -> dict:
    """``waste_stats`` over the first ``max_texts`` non-empty captions of ``urls`` (a trainer start-up check).

    Remote shards (``pipe:``, ``s3://``, ``http(s)://``) are left out with a log line: a start-up
    statistic must not stop a run that streams its data.
    """
    remote = [url for url in urls if url.startswith(REMOTE_PREFIXES)]
    if remote:
        _logger.info("token waste: leaving out %d remote shard(s) (e.g. %s); local shards only", len(remote),
                     remote[0])
        urls = [url for url in urls if not url.startswith(REMOTE_PREFIXES)]
    if not urls:
        raise ConfigError("token waste: every shard is remote; it reads local shards only (copy one to disk)")
    texts: list[str] = []
    for text in _shard_texts(urls, "shards"):
        if text:
            texts.append(text)
            if len(texts) >= max_texts:
                break
    return waste_stats(token_lengths(texts, tokenizer), cutoffs)


def plot_waste(lengths: Sequence[int], stats: dict, path: str | Path) -> None:
    """Figure 1: the token-length histogram with the cutoffs, and visible vs wasted tokens per cutoff."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plot_waste needs matplotlib: pip install matplotlib (or the [bench] extra)") from error
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: draws with Agg, leaves the global backend alone

    cutoffs = [row["cutoff"] for row in stats["cutoffs"]]
    waste = np.array([row["waste_pct"] for row in stats["cutoffs"]])
    fig = Figure(figsize=(12, 4.5), layout="tight")
    hist, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    hist.hist(lengths, bins=min(100, max(10, max(lengths) // 8)), color="tab:blue", alpha=0.8)
    for cutoff, color in zip(cutoffs, matplotlib.colormaps["plasma"](np.linspace(0.1, 0.75, len(cutoffs)))):
        hist.axvline(cutoff, color=color, linestyle="--", label=f"{cutoff} tokens")
    hist.set(xlabel="tokens per text (with [CLS], [SEP])", ylabel="texts", yscale="log",
             title=f"{stats['n_texts']:,} texts, mean {stats['mean']:.1f}, median {stats['median']:g}")
    hist.legend()
    x = np.arange(len(cutoffs))
    bars.bar(x, 100 - waste, color="tab:green", label="visible")
    bars.bar(x, waste, bottom=100 - waste, color="tab:red", label="wasted (beyond the cutoff)")
    for i, row in enumerate(stats["cutoffs"]):
        bars.text(i, (100 - row["waste_pct"]) / 2, f"{format_pct(100 - row['waste_pct'])}%", ha="center", va="center",
                  fontsize=9, color="white")
        bars.text(i, 101, f"{format_pct(row['waste_pct'])}% wasted\n{format_pct(row['truncated_pct'])}% of texts cut",
                  ha="center", va="bottom", fontsize=8)
    bars.set(xticks=x, xticklabels=[str(c) for c in cutoffs], xlabel="context length (tokens)",
             ylabel="% of all tokens", ylim=(0, 120), title="token waste")
    bars.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=120)


def format_pct(value: float) -> str:
    """One decimal, or two significant digits below 0.1 so that a small waste does not read as 0.0."""
    return f"{value:.1f}" if value >= 0.1 or value == 0 else f"{value:.2g}"


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory")
    parser.add_argument("--data", required=True, help="a .jsonl file (field 'text') or WebDataset shards")
    parser.add_argument("--cutoffs", type=int, nargs="+", default=list(DEFAULT_CUTOFFS),
                        help="context lengths in tokens (default 77 154 512)")
    parser.add_argument("--json", default=None, help="write the statistics here")
    parser.add_argument("--plot", default=None, help="write Figure 1 (PNG) here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _check_cutoffs(args.cutoffs, "--cutoffs")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):  # before the texts are read
        if path is not None:
            check_output_file(path, flag)
    from bmc_fast.data.text_tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer, flag="--tokenizer")
    texts = read_texts(args.data, "--data")
    kept = [text for text in texts if text]
    if not kept:
        raise ConfigError(f"--data {args.data!r}: all {len(texts)} texts are empty; nothing to measure")
    lengths = token_lengths(kept, tokenizer)
    stats = {**waste_stats(lengths, args.cutoffs), "n_empty": len(texts) - len(kept),
             "tokenizer": str(args.tokenizer), "data": args.data}
    _log_summary(stats)
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=2))
        _logger.info("wrote %s", args.json)
    if args.plot:
        plot_waste(lengths, stats, args.plot)
        _logger.info("wrote %s", args.plot)
    return stats


def _log_summary(stats: dict) -> None:
    _logger.info("%d texts (%d empty skipped), %d tokens, mean %.1f, median %.1f", stats["n_texts"],
                 stats["n_empty"], stats["n_tokens"], stats["mean"], stats["median"])
    for row in stats["cutoffs"]:
        _logger.info("cutoff %4d: %5.2f%% of tokens wasted, %5.2f%% of texts truncated", row["cutoff"],
                     row["waste_pct"], row["truncated_pct"])


if __name__ == "__main__":
    run_main(main)
