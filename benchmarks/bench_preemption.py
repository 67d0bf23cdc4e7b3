"""Preemption: the time from SIGUSR1 to the exit of every rank, against one training step plus one checkpoint write.

    python benchmarks/bench_preemption.py [--repeats 3] [--preset tiny] [--batch 64]

The real DeepSpeed launcher trains the preset on the embedded data (2 ranks, ZeRO-2, PIL loader, a metric line a
step); once ``metrics.jsonl`` shows step 8, SIGUSR1 goes to rank 1 alone, from outside, as SLURM's ``--signal``
does. Measured in each run: the exit line's own time from the signal to the exit (``stopped by SIGUSR1 at step N
(X s after the signal)``), the time until the launcher returned (seen from here), the time of step N (its
``samples_per_s``) and the checkpoint's write (its log line). ``docs/cluster.md`` states the bound: from the signal
to the exit, at most one step plus one checkpoint write (the rest of the step the signal lands in, one all-reduce,
the save, a barrier).

Writes ``benchmarks/results/preemption_cpu.{json,md}``.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import machine, write_report

from bmc_fast.cli import ArgumentParser, check_output_file, positive_int, run_main

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
SIGNAL_AFTER_STEP = 8


def signal_one_run(preset: str, batch: int, work: Path) -> dict:
    """Train until step ``SIGNAL_AFTER_STEP`` is logged, SIGUSR1 rank 1, wait for the launcher; what was measured."""
    import psutil

    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config["train_batch_size"] = batch
    ds_config = work / "zero2.json"
    ds_config.write_text(json.dumps(config))
    run_dir = work / "run"
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
               "bmc_fast/train.py", "--ds_config", str(ds_config), "--preset", preset, "--loader", "pil",
               "--max-steps", "200", "--log-every", "1", "--eval-every", "0", "--save-every", "0",
               "--output-dir", str(run_dir)]
    log = work / "launcher.log"
    with open(log, "w") as sink:
        launcher = subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while _last_step(run_dir) < SIGNAL_AFTER_STEP:
            if launcher.poll() is not None:
                raise RuntimeError(f"the run ended before step {SIGNAL_AFTER_STEP}: see {log}")
            time.sleep(0.05)
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "--local_rank=" in
                 " ".join(p.cmdline())]
        rank_1 = next(p for p in ranks if "--local_rank=1" in p.cmdline())
        sent = time.monotonic()
        rank_1.send_signal(signal.SIGUSR1)
        while any(_running(p) for p in ranks):
            time.sleep(0.01)
        ranks_gone = time.monotonic() - sent
        status = launcher.wait(timeout=600)
        outside = time.monotonic() - sent
    text = log.read_text()
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+) \(([0-9.]+) s after the signal\)", text)
    if status != 75 or stopped is None:
        raise RuntimeError(f"the launcher exited {status}, not 75 with a stop line: see {log}")
    step = int(stopped.group(1))
    saved = float(re.search(rf"checkpoint step{step:07d} saved in ([0-9.]+) s", text).group(1))  # to 0.01 s
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_s = batch / next(r["train/samples_per_s"] for r in records if r["step"] == step)
    inside = float(stopped.group(2))
    return {"stopped_at": step, "signal_to_exit_s": inside, "signal_to_ranks_gone_s": ranks_gone,
            "signal_to_launcher_exit_s": outside, "step_s": step_s, "save_s": saved, "bound_s": step_s + saved,
            "ratio_to_bound": inside / (step_s + saved)}


def _running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=3, help="signalled runs")
    parser.add_argument("--preset", default="tiny", help="model preset")
    parser.add_argument("--batch", type=positive_int, default=64, help="train_batch_size (pairs a step, 2 ranks)")
    parser.add_argument("--out", default=str(RESULTS / "preemption_cpu"), help="results path without suffix")
    args = parser.parse_args(argv)
    out = check_output_file(args.out, "--out")
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench_preemption_") as work:
            runs.append(signal_one_run(args.preset, args.batch, Path(work)))
    result = {"machine": machine(), "preset": args.preset, "batch": args.batch, "ranks": 2, "zero_stage": 2,
              "signal_after_step": SIGNAL_AFTER_STEP, "runs": runs,
              "max_ratio_to_bound": max(r["ratio_to_bound"] for r in runs)}
    header = (f"Preemption on this CPU ({result['machine']['cpu_model']}, {result['machine']['cores']} cores): the "
              f"real DeepSpeed launcher, 2 gloo ranks, ZeRO-2, preset {args.preset}, batch {args.batch}; SIGUSR1 "
              f"to rank 1 alone after step {SIGNAL_AFTER_STEP} was logged. Bound: one step + one checkpoint write.")
    rows = [[str(i + 1), str(r["stopped_at"]), f"{r['step_s']:.2f}", f"{r['save_s']:.2f}",
             f"{r['signal_to_exit_s']:.2f}", f"{r['ratio_to_bound']:.2f}", f"{r['signal_to_ranks_gone_s']:.2f}",
             f"{r['signal_to_launcher_exit_s']:.2f}"] for i, r in enumerate(runs)]
    write_report(out, result, header, ["run", "stopped after step", "step (s)", "checkpoint write (s)",
                                       "signal → exit line (s, in the ranks)", "exit line / (step + write)",
                                       "signal → ranks gone (s)", "signal → launcher exit (s)"], rows)
    return result


if __name__ == "__main__":
    run_main(main)
