"""One prepared command that proves the GPU path on one CUDA GPU: ``make gpu-check`` (``ARGS=--dry-run`` lists it).

Built for the machine a GPU is lent on as it is (no package index, its own CUDA torch >= 2.11): what is missing
(DeepSpeed, open_clip, webdataset, torchdata, braceexpand, transformers >= 5.25 ...) is installed from the
wheelhouse made beside the repository (``make gpu-wheelhouse``) with ``pip install --no-index``, together with
bmc-fast itself, into a scratch folder put first on PYTHONPATH; every step then runs in its own process, from the
scratch folder, with a time limit. The steps, in order:

  data  the embedded synthetic dataset at 512 pairs, its tokenizer, DALI index files
  a     the fused loss: Triton kernels and torch twin vs float64 at N=16,384, D=768 (fp32, tf32, bf16); time and
        peak memory vs a plain-torch ClipLoss (open_clip's when installed)
  b     the text tower at context 512 on BIOMEDICA-like lengths: packed (torch varlen_attn, FA4 where
        installed) vs padded SDPA, outputs and gradients, time
  c     DALI mixed decode + augmentation vs the CPU graph, or skipped without DALI
  d     Transformer Engine bf16 (and FP8 where the GPU has it) vs torch layers, or skipped without TE
  e     a 30-step 1-GPU NCCL run of `tiny` through the DeepSpeed launcher, twice under --deterministic
  f, g  bench_train at the bmc-longclip-l14-512 shape (bf16, activation checkpointing) with the largest micro
        batch the planner fits on this GPU, vs open_clip when installed; the planner's peak vs the measured one

It writes ``benchmarks/results/gpu_<gpu name>.{json,md}``, a line per check: pass / fail / skipped with its
figure. Exit status: 0 when nothing failed, 1 when a check failed, 2 at once without a CUDA device.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
WHEELHOUSE = REPO / ".wheelhouse"
# What the steps import beyond torch and triton; a missing one comes from the wheelhouse.
NEEDED = ("deepspeed", "open_clip", "webdataset", "torchdata", "braceexpand", "transformers", "tokenizers",
          "safetensors", "filelock", "tqdm", "bmc_fast.kernels")
MIN_TRANSFORMERS = (5, 25)
BUDGET_S = 300  # what the whole check should take on one H100/H200 (never timed yet)
# Each step's limit below; together 540 s, so a run that hits every limit still ends inside one 10-minute call.


@dataclass
class Step:
    key: str
    title: str
    commands: list[list[str]]
    timeout_s: int
    inner: list[list[str]] = field(default_factory=list)  # what a command runs in turn (listed by --dry-run)


PAPER_PRESET, PAPER_DS_CONFIG = "bmc-longclip-l14-512", REPO / "ds_configs" / "zero1_bf16.json"


def paper_shape_commands(work: Path, gpu_memory: str, batch: str, baseline: str) -> list[list[str]]:
    """f and g: the planner's largest micro batch for this GPU (activation checkpointing on), bench_train at it,
    and the planner's peak for that batch. ``batch`` is the first plan's answer (a placeholder in --dry-run)."""
    python = sys.executable
    plan = [python, "-m", "bmc_fast.plan", "--preset", PAPER_PRESET, "--ds_config", str(PAPER_DS_CONFIG), "--gpus",
            "1", "--gpu-memory", gpu_memory, "--grad-checkpointing"]
    bench = [python, str(REPO / "benchmarks" / "bench_train.py"), "--preset", PAPER_PRESET, "--context", "512",
             "--lengths", "biomedica", "--batch", batch, "--steps", "2", "--grad-checkpointing", "--ds_config",
             str(PAPER_DS_CONFIG), "--work-dir", str(work / "bench"), "--json"]
    bench += ["--baseline", "open_clip"] if baseline == "open_clip" else []
    return [plan + ["--json", str(work / "plan_fit.json")], bench,
            plan + ["--micro-batch", batch, "--json", str(work / "plan.json")]]


def plan_steps(work: Path, python: str) -> list[Step]:
    steps_py = [python, str(REPO / "benchmarks" / "gpu_steps.py")]

    def train(name: str) -> list[str]:
        return [python, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", "29517",
                str(REPO / "bmc_fast" / "train.py"), "--ds_config", str(REPO / "ds_configs" / "zero2.json"),
                "--preset", "tiny", "--max-steps", "30", "--log-every", "1", "--save-every", "30", "--eval-every",
                "0", "--loader", "pil", "--deterministic", "--seed", "0", "--output-dir", str(work / name)]

    return [
        Step("data", "the embedded synthetic data (512 pairs), tokenizer, indexes",
             [[*steps_py, "data", "--cache", str(work / "cache"), "--out", str(work / "data.json")]], 45),
        Step("a", "fused loss: Triton and torch twin vs float64, N=16384 D=768, fp32/tf32/bf16; vs ClipLoss",
             [[*steps_py, "loss", "--out", str(work / "a.json")]], 75),
        Step("b", "text tower ctx 512, BIOMEDICA lengths: packed varlen_attn (FA4) vs padded SDPA",
             [[*steps_py, "text", "--out", str(work / "b.json")]], 60),
        Step("c", "DALI mixed decode + augment vs the CPU graph",
             [[*steps_py, "dali", "--data", str(work / "data.json"), "--out", str(work / "c.json")]], 45),
        Step("d", "Transformer Engine bf16 / FP8 vs torch layers",
             [[*steps_py, "te", "--out", str(work / "d.json")]], 45),
        Step("e", "tiny, 30 steps, 1 GPU, NCCL, DeepSpeed launcher; rerun under --deterministic",
             [train("e_run1"), train("e_run2"), [*steps_py, "compare-runs", str(work / "e_run1"),
                                                 str(work / "e_run2"), "--out", str(work / "e.json")]], 120),
        Step("f", "bench_train bmc-longclip-l14-512 bf16, planner's largest micro batch; g: planned vs measured peak",
             [[*steps_py, "paper-shape", "--work", str(work / "paper"), "--out", str(work / "f.json")]], 150,
             inner=paper_shape_commands(work / "paper", "<GPU memory>", "<largest micro batch>", "open_clip")),
    ]


def cuda_device() -> tuple[str, str] | None:
    """(GPU name, compute capability) of device 0, or None without CUDA (or without torch)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def missing_modules(python: str, env: dict[str, str]) -> list[str]:
    """The modules of NEEDED that ``python`` cannot import (transformers older than 5.25 counts as missing)."""
    script = ("import importlib, importlib.util, sys\nmissing = []\n"
              f"for name in {NEEDED!r}:\n"
              "    try:\n        importlib.import_module(name)\n    except Exception:\n        missing.append(name)\n"
              "import transformers\n"
              f"if tuple(int(x) for x in transformers.__version__.split('.')[:2]) < {MIN_TRANSFORMERS!r}:\n"
              "    missing.append('transformers')\n"
              "print(' '.join(sorted(set(missing))))\n")
    proc = subprocess.run([python, "-c", script], env=env, cwd="/", capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return list(NEEDED)
    return proc.stdout.split()


def wheelhouse_requirements(wheelhouse: Path) -> list[str]:
    """``name==version`` of every package in the wheelhouse (its manifest.json): pip picks each one's wheel for
    this Python from the several there (naming the files would hand it the other Python's too)."""
    manifest = wheelhouse / "manifest.json"
    if not manifest.is_file():
        return []
    return [f"{name}=={version}" for name, version in json.loads(manifest.read_text())["packages"].items()]


def install_from_wheelhouse(python: str, site: Path, wheelhouse: Path) -> list[list[str]]:
    """The pip commands that put the wheelhouse and bmc-fast itself into ``site`` (no index, no dependencies)."""
    common = [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
              "--no-cache-dir", "--upgrade", "--target", str(site)]
    return [[*common, "--find-links", str(wheelhouse), *(wheelhouse_requirements(wheelhouse) or ["<packages>"])],
            [*common, "--no-build-isolation", str(REPO)]]


def run_step(step: Step, env: dict[str, str], work: Path, log) -> dict:
    start = time.perf_counter()
    for command in step.commands:
        left = step.timeout_s - (time.perf_counter() - start)
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        try:
            proc = subprocess.run(command, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            return {"status": "fail", "figure": f"timed out after {step.timeout_s} s", "lines": []}
        if proc.returncode != 0:
            return {"status": "fail", "figure": f"exit {proc.returncode}: {shlex.join(command[:4])} ... (see the log)",
                    "lines": []}
    result = json.loads((work / f"{step.key}.json").read_text())
    result["seconds"] = time.perf_counter() - start
    return result


def write_results(device: tuple[str, str], results: dict, out_dir: Path) -> Path:
    """``out_dir/gpu_<gpu name>.{json,md}``: every step's result, and a table with a line per check."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from report import machine, write_report

    name = re.sub(r"[^a-z0-9]+", "_", device[0].lower()).strip("_")
    record = {"gpu": device[0], "compute_capability": device[1], "date": time.strftime("%Y-%m-%d"),
              "machine": machine("cuda" if device[1] != "?" else "cpu"), "steps": results}
    rows = [[key, entry["name"], entry["status"], entry["figure"]] for key, result in results.items()
            for entry in result.get("lines") or [{"name": key, "status": result["status"],
                                                   "figure": result["figure"]}]]
    where = record["machine"]
    header = (f"`make gpu-check` on {device[0]} (compute capability {device[1]}), {record['date']}: torch "
              f"{where['torch']}, {where['cores']} CPU cores ({where['cpu_model']}).")
    write_report(out_dir / f"gpu_{name}", record, header, ["step", "check", "result", "figure"], rows)
    return out_dir / f"gpu_{name}.json"


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list every step and command; run nothing")
    parser.add_argument("--work", default="/tmp/bmc_gpu_check", help="scratch folder (data, runs, logs)")
    parser.add_argument("--wheelhouse", default=str(WHEELHOUSE), help="wheels of what is missing (gpu-wheelhouse)")
    parser.add_argument("--only", nargs="+", default=None, help="run these steps (data always runs)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    work, python = Path(args.work), sys.executable
    steps = plan_steps(work, python)
    if args.dry_run:
        site = work / "site"
        limits = sum(step.timeout_s for step in steps)
        print(f"# make gpu-check: {len(steps)} steps in {work}, meant to take ~{BUDGET_S} s on one H100/H200 (never "
              f"timed yet); the steps' limits add up to {limits} s")
        print(f"# first, if this python lacks one of {', '.join(NEEDED)}: from {args.wheelhouse}")
        wheels, own = install_from_wheelhouse(python, site, Path(args.wheelhouse))
        packages = wheelhouse_requirements(Path(args.wheelhouse))
        print("  " + shlex.join(wheels[:wheels.index("--find-links") + 2])
              + (f" <the {len(packages)} packages of its manifest.json>" if packages else " <no wheelhouse yet: make "
                 "gpu-wheelhouse>"))
        print("  " + shlex.join(own))
        for step in steps:
            print(f"{step.key}: {step.title} (limit {step.timeout_s} s)")
            for command in step.commands:
                print("  " + shlex.join(command))
            for command in step.inner:
                print("    runs: " + shlex.join(command))
        return 0
    device = cuda_device()
    if device is None:
        print("gpu-check: no CUDA device (torch.cuda.is_available() is False, or torch is missing): run it on a "
              "GPU node", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BMC_FAST_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1",
           "TORCH_EXTENSIONS_DIR": str(work / "torch_extensions")}
    missing = missing_modules(python, env)
    if missing:
        wheelhouse = Path(args.wheelhouse)
        if not wheelhouse_requirements(wheelhouse):
            print(f"gpu-check: {', '.join(missing)} missing and no wheels in {wheelhouse}: run make gpu-wheelhouse "
                  "where pip works and carry .wheelhouse", file=sys.stderr)
            return 2
        for command in install_from_wheelhouse(python, work / "site", wheelhouse):
            subprocess.run(command, check=True)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(work / "site"), env.get("PYTHONPATH")]))
        still = missing_modules(python, env)
        print(f"gpu-check: installed from {wheelhouse}: {', '.join(missing)}; still missing: {still or 'none'}")
    results, started = {}, time.perf_counter()
    with open(work / "gpu_check.log", "w") as log:
        for step in steps:
            if args.only and step.key != "data" and step.key not in args.only:
                continue
            print(f"gpu-check {step.key}: {step.title} ...", flush=True)
            results[step.key] = run_step(step, env, work, log)
            for entry in results[step.key].get("lines") or [results[step.key]]:
                print(f"  {entry['status']:>7}  {entry.get('name', step.key)}: {entry['figure']}", flush=True)
    path = write_results(device, results, Path(args.out_dir))
    failed = [key for key, result in results.items() if result["status"] == "fail"]
    print(f"gpu-check: {time.perf_counter() - started:.0f} s; {path}; log {work / 'gpu_check.log'}; "
          f"{'failed: ' + ', '.join(failed) if failed else 'no check failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
