"""Contrastive accumulation: peak memory at a fixed micro batch for K = 1, 2, 4, 8 against one big batch.

    python benchmarks/bench_accumulation.py [--micro 16] [--ks 1 2 4 8]

The same contrastive loss over K × micro pairs, taken two ways on the same model and data: K micro
batches with ``bmc_fast.trainer.contrastive_accumulation`` (activations of one micro batch live at a time), and
one batch of K × micro pairs (all activations live at once). Model: the ``tiny`` preset widened to a
mid-size shape (ViT 96 px / patch 8, width 256, 6 layers; ModernBERT hidden 256, 6 layers), fp32 on the
CPU, captions of 32–128 tokens (the same lengths in every micro batch), unpadded text path. Every case
runs in a fresh subprocess; its peak is the resident set's high-water mark (VmHWM, reset once model and
inputs exist) above the resident set at that moment, as in ``bench_loss.py``, with glibc returning every
block over 64 KiB at once (``MALLOC_MMAP_THRESHOLD_=65536``) so that the resident set follows the live
tensors. Also reported: time per step and the loss (equal for both ways).

Writes ``benchmarks/results/accumulation_cpu.{json,md,png}``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_loss import _status, machine
from report import write_report

from bmc_fast.cli import ArgumentParser, positive_int, run_main

RESULTS = Path(__file__).parent / "results"
SHAPE = {"vision": {"image_size": 96, "patch_size": 8, "width": 256, "layers": 6, "heads": 4},
         "text": {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 384},
         "context_length": 128, "embed_dim": 256}


def run_case(mode: str, micro: int, k: int) -> dict:
    """One case in this process: ``mode`` 'accumulated' (K micro batches) or 'big' (one batch of K·micro)."""
    import torch

    from bmc_fast.data.text_tokenizer import train_tokenizer
    from bmc_fast.kernels import FusedClipLoss
    from bmc_fast.model.clip import BMCLongCLIP
    from bmc_fast.model.config import load_model_config
    from bmc_fast.trainer.contrastive_accumulation import contrastive_accumulation_step

    torch.manual_seed(0)
    tokenizer = train_tokenizer(["an axial ct image of the chest with a nodule"] * 20, Path("/tmp") / "bench_tok",
                                vocab_size=300)
    cfg = load_model_config("tiny", **SHAPE).with_tokenizer(tokenizer)
    model = BMCLongCLIP(cfg)
    n = micro * k
    lengths = torch.randint(32, 129, (micro,)).repeat(k)  # every micro batch as long: its peak is the same
    mask = (torch.arange(128) < lengths[:, None]).long()
    ids = torch.randint(5, len(tokenizer), (n, 128)) * mask + tokenizer.pad_token_id * (1 - mask)
    pixels = torch.randn(n, 3, 96, 96)
    loss_fn = FusedClipLoss()
    model(pixels[:2], ids[:2], mask[:2])[0].sum().backward()  # warm-up: thread pools are not activations
    model.zero_grad(set_to_none=True)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status()["VmRSS"]
    start = time.perf_counter()
    if mode == "big":
        loss = loss_fn(*model(pixels, ids, mask))
        loss.backward()
    else:
        batches = [(pixels[i:i + micro], ids[i:i + micro], mask[i:i + micro]) for i in range(0, n, micro)]
        loss, _ = contrastive_accumulation_step(lambda b: model(*b), batches, loss_fn, lambda s: s.backward(),
                                                torch.device("cpu"))
    seconds = time.perf_counter() - start
    return {"mode": mode, "micro": micro, "k": k, "pairs": n, "peak_extra_bytes": _status()["VmHWM"] - base,
            "seconds": seconds, "loss": float(loss)}


def _spawn(case: dict) -> dict:
    # Blocks over 64 KiB come from mmap and go back at free(): the resident set follows the live tensors
    # instead of glibc's arenas, which keep (and fragment) freed activations.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True,
                          timeout=1800, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.4), layout="tight")
    ax = fig.subplots()
    for mode, label, colour in (("accumulated", "contrastive accumulation, micro batch fixed", "#1f4e8c"),
                                ("big", "one batch of K × micro", "#bbbbbb")):
        points = [(r["pairs"], r["peak_extra_bytes"] / 2 ** 20) for r in rows if r["mode"] == mode]
        ax.plot(*zip(*points), marker="o", label=label, color=colour)
    ax.set(xlabel="pairs per contrastive loss", ylabel="peak extra memory (MiB)", ylim=(0, None))
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", help="internal: run one case, print its JSON")
    parser.add_argument("--micro", type=positive_int, default=16, help="pairs per micro batch")
    parser.add_argument("--ks", type=positive_int, nargs="+", default=[1, 2, 4, 8], help="micro batches per step")
    args = parser.parse_args(argv)
    if args.case:
        sys.stdout.write(json.dumps(run_case(**json.loads(args.case))) + "\n")
        return {}
    rows = []
    for k in args.ks:  # side by side: the two ways of each K back to back
        for mode in ("accumulated", "big"):
            rows.append(_spawn({"mode": mode, "micro": args.micro, "k": k}))
            sys.stderr.write(f"{mode:>11} K={k}: {rows[-1]['peak_extra_bytes'] / 2 ** 20:.0f} MiB, "
                             f"{rows[-1]['seconds']:.1f} s, loss {rows[-1]['loss']:.4f}\n")
    first = next(r for r in rows if r["mode"] == "accumulated")
    result = {"what": __doc__.split("\n\n")[2].replace("\n", " "), "machine": machine("cpu"), "rows": rows,
              "accumulated_peak_over_k1": [r["peak_extra_bytes"] / first["peak_extra_bytes"] for r in rows
                                           if r["mode"] == "accumulated"]}
    table = []
    for k in args.ks:
        acc, big = (next(r for r in rows if r["k"] == k and r["mode"] == m) for m in ("accumulated", "big"))
        mib = [r["peak_extra_bytes"] / 2 ** 20 for r in (acc, big)]
        table.append([str(k), str(acc["pairs"]), f"{mib[0]:.0f} / {mib[1]:.0f}", f"{mib[0] / mib[1]:.2f}",
                      f"{acc['seconds']:.1f} / {big['seconds']:.1f}", f"{acc['loss']:.4f} / {big['loss']:.4f}"])
    write_report(RESULTS / "accumulation_cpu", result,
                 f"Contrastive accumulation vs one big batch, micro batch {args.micro}, fp32 on "
                 f"{result['machine']['cores']} CPU cores (torch {result['machine']['torch']}).",
                 ["K", "pairs per loss", "peak extra MiB, accumulated / big", "ratio", "seconds, accumulated / big",
                  "loss, accumulated / big"], table, plot=lambda path: plot(rows, path))
    return result


if __name__ == "__main__":
    run_main(main)
