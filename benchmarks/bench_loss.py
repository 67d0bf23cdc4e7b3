"""Fused contrastive loss vs open_clip's ClipLoss vs a naive torch loss: forward+backward time and memory.

    python benchmarks/bench_loss.py                          # the default grid on this device
    python benchmarks/bench_loss.py --n 262144 --d 256 --impls fused --tag huge

One process, global batch N = b (so every implementation sees the same N×N problem). Every case runs in
a fresh subprocess: on CUDA, peak memory is ``max_memory_allocated`` above what the inputs hold; on the
CPU it is the peak resident set (VmHWM, reset through /proc/self/clear_refs once the inputs exist)
above the resident set at that moment (default allocator), after a tiny warm-up pass: library thread
pools and BLAS buffers are not the loss's. Time is the best of ``--repeats`` forward+backward passes.
Implementations: ``fused`` (bmc_fast.kernels, backend auto: Triton on CUDA, the tiled torch twin on
CPU), ``fused_torch`` (the twin on CUDA), ``open_clip`` (open_clip.loss.ClipLoss), ``naive``
(clip_loss_ref: one N×N logit matrix) and, on CUDA with the package installed, ``inf_cl``. Cases that
would not fit in memory are recorded as skipped with the estimate, not run.

Writes ``benchmarks/results/loss_<device>[_tag].json``, ``.md`` and a log-log ``.png`` of memory vs N.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import report

from bmc_fast.cli import ArgumentParser, positive_int, read_json_object, run_main
from bmc_fast.errors import ConfigError
from bmc_fast.optional import installed

RESULTS = Path(__file__).parent / "results"
CPU_NS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
GPU_NS = [1024, 4096, 16384, 65536, 262144, 1048576]
DS = [256, 768]
SCALE = 1 / 0.07


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


IMPLS = ("fused", "fused_torch", "open_clip", "naive", "inf_cl")  # what make_loss builds


def make_loss(impl: str):
    """A callable (image, text, scale) -> scalar loss for ``impl``."""
    if impl in ("fused", "fused_torch"):
        from bmc_fast.kernels import clip_loss

        backend = "torch" if impl == "fused_torch" else "auto"
        return lambda i, t, s: clip_loss(i, t, s, backend=backend)
    if impl == "open_clip":
        from open_clip.loss import ClipLoss

        return ClipLoss()
    if impl == "naive":
        from bmc_fast.kernels import clip_loss_ref

        return clip_loss_ref
    if impl == "inf_cl":
        from inf_cl import cal_inf_loss

        def inf_cl_loss(i, t, s):
            head_dim = min(256, i.shape[1])
            return (cal_inf_loss(i, t, scale=s, head_dim=head_dim) + cal_inf_loss(t, i, scale=s, head_dim=head_dim)) / 2

        return inf_cl_loss
    raise ValueError(f"unknown implementation {impl!r}")


def run_case(impl: str, n: int, d: int, device: str, repeats: int) -> dict:
    """One case in this process (call it in a fresh one): returns time and peak extra memory."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    loss_fn = make_loss(impl)
    # Warm up on a tiny problem first: thread pools and BLAS buffers are the library's, not the loss's.
    tiny = [torch.randn(64, d, device=device, requires_grad=True) for _ in range(2)]
    loss_fn(tiny[0], tiny[1], torch.tensor(SCALE, device=device)).backward()
    del tiny
    image = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=-1).requires_grad_()
    scale = torch.tensor(SCALE, device=device, requires_grad=True)
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times, peak = [], None
    for attempt in range(repeats):
        image.grad = text.grad = scale.grad = None
        sync()
        if attempt == 0:  # memory of the first pass, from a clean baseline
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                Path("/proc/self/clear_refs").write_text("5")
                base = _status()["VmRSS"]
        start = time.perf_counter()
        loss = loss_fn(image, text, scale)
        loss.backward()
        sync()
        times.append(time.perf_counter() - start)
        if attempt == 0:
            peak = (torch.cuda.max_memory_allocated() if cuda else _status()["VmHWM"]) - base
            value = float(loss)
    return {"impl": impl, "n": n, "d": d, "device": device, "seconds": min(times), "times": times,
            "peak_extra_bytes": peak, "loss": value, "status": "ok"}


def estimated_bytes(impl: str, n: int, d: int) -> int:
    """Rough peak for the skip rule: N×N fp32 matrices for the unfused losses (4, as measured at N=16K),
    O(N·D) for the others."""
    matrices = {"open_clip": 4, "naive": 4}.get(impl, 0)
    return matrices * 4 * n * n + 8 * 4 * n * d


machine = report.machine  # bench_accumulation and bench_plan import it from here

def _spawn(case: dict, timeout: float) -> dict:
    command = [sys.executable, __file__, "--case", json.dumps(case)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "status": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {**case, "status": f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratios(results: list[dict]) -> list[dict]:
    """fused / open_clip time and memory for every (N, D) where both ran."""
    ok = {(r["impl"], r["n"], r["d"]): r for r in results if r["status"] == "ok"}
    out = []
    for (impl, n, d), r in sorted(ok.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        theirs = ok.get(("open_clip", n, d))
        if impl == "fused" and theirs:
            out.append({"n": n, "d": d, "time_ratio": r["seconds"] / theirs["seconds"],
                        "memory_ratio": r["peak_extra_bytes"] / theirs["peak_extra_bytes"]})
    return out


def write_report(results: list[dict], info: dict, out: Path) -> None:
    summary = {"machine": info, "results": results, "fused_over_open_clip": ratios(results)}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    lines = [f"Forward+backward of the CLIP loss, one process, global batch N (machine: {info['device']}, "
             f"{info.get('gpu', str(info['cores']) + ' CPU cores')}, torch {info['torch']}).", "",
             "| impl | N | D | time (s) | peak extra memory (MiB) | status |", "|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["d"], r["n"], r["impl"])):
        ok = r["status"] == "ok"
        lines.append(f"| {r['impl']} | {r['n']} | {r['d']} | {r['seconds']:.3f} | "
                     f"{r['peak_extra_bytes'] / 2**20:.1f} | ok |" if ok else
                     f"| {r['impl']} | {r['n']} | {r['d']} | – | – | {r['status']} |")
    if summary["fused_over_open_clip"]:
        lines += ["", "fused / open_clip, measured side by side in this run:", "",
                  "| N | D | time ratio | memory ratio |", "|---|---|---|---|"]
        lines += [f"| {x['n']} | {x['d']} | {x['time_ratio']:.2f} | 1/{1 / x['memory_ratio']:.0f} |"
                  for x in summary["fused_over_open_clip"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(results, out.with_suffix(".png"), info)


def plot(results: list[dict], path: Path, info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["d"] for r in results})
    fig, axes = plt.subplots(1, len(dims), figsize=(5 * len(dims), 3.6), squeeze=False)
    for ax, d in zip(axes[0], dims):
        for impl in sorted({r["impl"] for r in results}):
            points = sorted((r["n"], r["peak_extra_bytes"] / 2**20) for r in results
                            if r["impl"] == impl and r["d"] == d and r["status"] == "ok")
            if points:
                ax.plot(*zip(*points), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch N")
        ax.set_ylabel("peak extra memory (MiB)")
        ax.set_title(f"D = {d} ({info['device']})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def rerender(json_path: Path) -> None:
    """Rewrite a result's .md/.png from its .json (skip estimates recomputed; measurements untouched)."""
    summary = read_json_object(json_path, f"--rerender {str(json_path)!r}",
                               "pass a result of this benchmark, e.g. benchmarks/results/loss_cpu.json")
    for r in summary["results"]:
        if r["status"].startswith("skipped"):
            r["status"] = f"skipped: needs ~{estimated_bytes(r['impl'], r['n'], r['d']) / 2**30:.0f} GiB"
    write_report(summary["results"], summary["machine"], json_path.with_suffix(""))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--n", type=positive_int, nargs="+", help="global batch sizes (default: a grid per device)")
    parser.add_argument("--d", type=positive_int, nargs="+", default=DS, help="feature widths")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, help="implementations (default: all available)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="passes per case; the best time is kept")
    parser.add_argument("--memory-fraction", type=float, default=0.6,
                        help="skip cases whose estimated peak exceeds this share of memory")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    parser.add_argument("--tag", default="", help="suffix for the result files")
    parser.add_argument("--rerender", type=Path, help="only rewrite the .md/.png of this result .json")
    args = parser.parse_args(argv)
    if not 0 < args.memory_fraction <= 1:
        raise ConfigError(f"--memory-fraction must be in (0, 1] (a share of the device's memory), got "
                          f"{args.memory_fraction}")
    if args.timeout <= 0:
        raise ConfigError(f"--timeout must be > 0 (seconds per case), got {args.timeout}")
    if args.rerender:
        rerender(args.rerender)
        return []
    if args.case:
        case = json.loads(args.case)
        sys.stdout.write(json.dumps(run_case(**case)) + "\n")
        return []

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA GPU here: pass --device cpu, or leave --device out")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    impls = args.impls or (["fused", "fused_torch", "open_clip", "naive"] + (["inf_cl"] if installed("inf_cl") else [])
                           if cuda else ["fused", "open_clip", "naive"])
    capacity = torch.cuda.get_device_properties(0).total_memory if cuda else os.sysconf("SC_PAGE_SIZE") * \
        os.sysconf("SC_PHYS_PAGES")
    results = []
    for d in args.d:
        for n in args.n or (GPU_NS if cuda else CPU_NS):
            for impl in impls:
                need = estimated_bytes(impl, n, d)
                if need > args.memory_fraction * capacity:
                    results.append({"impl": impl, "n": n, "d": d, "device": device,
                                    "status": f"skipped: needs ~{need / 2**30:.0f} GiB"})
                    continue
                repeats = args.repeats if n <= 16384 else 1
                result = _spawn({"impl": impl, "n": n, "d": d, "device": device, "repeats": repeats}, args.timeout)
                results.append(result)
                shown = f"{result['seconds']:.3f} s, {result['peak_extra_bytes'] / 2**20:.1f} MiB" \
                    if result["status"] == "ok" else result["status"]
                sys.stderr.write(f"{impl:>11} N={n:<8} D={d:<4} {shown}\n")
    info = machine(device)
    name = f"loss_{'cuda' if cuda else 'cpu'}" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_report(results, info, RESULTS / name)
    sys.stderr.write((RESULTS / name).with_suffix(".md").read_text())
    return results


if __name__ == "__main__":
    run_main(main)
