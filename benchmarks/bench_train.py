"""Whole training steps of the real trainer, where their time goes, and the paper's stack side by side.

    python benchmarks/bench_train.py --preset tiny --context 512 --lengths real --batch 32 --steps 3 \\
        [--baseline open_clip] [--with-loaders] [--trace DIR] [--ds_config J] [--loss-backend B] ...
    python benchmarks/bench_train.py --suite quick|full      # every case, each in a fresh process
    python benchmarks/bench_train.py --suite malloc --out benchmarks/results/train_malloc_cpu   # glibc's malloc

One case: ``bmc_fast.trainer.prepare`` and ``loop.start`` build the real run (DeepSpeed engine, loss, loaders)
over WebDataset shards written for the case (synthetic images; captions with the chosen lengths), then
``loop.train_step`` runs ``--warmup`` + ``--steps`` steps, each timed twice: around the call (the step) and
inside it by ``bmc_fast.trainer.step_profile`` (data, image forward, text forward, forward, loss, backward,
optimizer, communication: CUDA events on GPU, perf_counter on CPU). With ``--baseline open_clip`` each step of
bmc-fast is followed by one of open_clip's (``open_clip_baseline.py``: its CustomTextCLIP built from an
export of the same initial weights, captions padded to the context, ClipLoss, AdamW) on the same batch,
held in memory, in the same process and threads; the first step's two losses must agree. With
``--with-loaders`` batches come from the loaders instead: bmc-fast's (DALI by default) and open_clip's
webdataset + PIL path, on the same shards.

Caption lengths: ``real`` samples the ModernBERT-tokenized texts of ../shared/data (biomedical captions and
COVID-19 notes; the case is skipped with a reason when absent); ``biomedica`` draws lengths from a log-normal
of mean 127 tokens (σ 0.6), as BIOMEDICA's captions average, and cuts real (or synthetic) text to them.

Reported per stack: step seconds (median of the timed steps), the parts, their coverage of the step, samples/s,
real tokens/s, TFLOP/s of the model's useful work (``bmc_fast.model.flops`` on the real lengths; open_clip's executed
padded FLOPs too), MFU against a peak whose source is printed (a GPU's data-sheet dense bf16 peak, or on CPU a
matmul in the run's dtype measured here), and peak memory (CUDA: max allocated; CPU: resident-set high-water above the
step's start, sampled every 5 ms). Suites write benchmarks/results/train_<device>.{json,md,png}.

``--cpu-malloc heap`` makes glibc keep freed memory for reuse (``mallopt``: no ``mmap`` for large blocks, no
trimming of the heap), as CUDA's caching allocator does on a GPU. By default glibc gives every block above
32 MB back to the OS when it is freed, so a step's fresh gradients, flat buffers and activations are page faults
again every step: on a 2-core AMD EPYC VM that cost seconds of a ViT-L/14 step, in both stacks. The ``malloc``
suite measures both settings side by side.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from report import machine, write_report

from bmc_fast.cli import ArgumentParser, positive_int, read_json_object, run_main
from bmc_fast.ds_json import load_ds_config
from bmc_fast.errors import ConfigError
from bmc_fast.model.config import load_model_config
from bmc_fast.trainer.grad_norm import GRAD_NORM_DTYPES

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
LENGTHS = ("real", "biomedica")
BIOMEDICA_MEAN, BIOMEDICA_SIGMA = 127, 0.6
STACKS = ("bmc_fast", "open_clip")
# PyTorch's CPU allocator puts tensors of >= 2 MB on transparent huge pages when this is set (read at the first
# allocation). Suite cases set it (for both stacks: they share the process); a single case keeps the caller's.
THP = "THP_MEM_ALLOC_ENABLE"
CPU_MALLOC = ("default", "heap")
# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_MAX
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
TRIM_NOTE = (" (its free heap given back to the OS before a step, outside its timing, once the resident set exceeds "
             "half the memory: trim_heap_if_large)")
HEAP_PEAK_NOTE = (" (with heap malloc the resident set keeps the last step's memory, so the peak above a step's "
                  "start reads near 0)")
_logger = logging.getLogger("bench_train")

# (preset, context, lengths, batch, steps, extra options): each case runs in its own process, bmc-fast's steps
# alternated with open_clip's. The ViT-L/14 cases train bf16 (the paper's precision) on ZeRO-1, zero1_bf16.json, on
# CPU and GPU alike. On one rank the trainer skips DeepSpeed's gradient buckets (bmc_fast/trainer/one_rank.py), so
# the step flattens the bf16 gradients into a new fp32 partition and runs torch's fused AdamW on it: 1.2 s a step on
# a 2-core Xeon, as long as open_clip's AdamW. (ZeRO-Offload, zero1_bf16_cpu_offload.json, which this case used
# before, keeps the buckets: they carry the gradients to the host buffer, 2.8 s a step.) contiguous_gradients is off:
# on several ranks it copies every gradient twice (bucket, then partition buffer). Batch 8 is the most that fits
# both stacks in 24 GiB (12 ran out of memory).
L14_OPTIONS = ("--ds_config", "ds_configs/zero1_bf16.json")
# Ten timed steps a case (the median is reported): the machines are noisy, and a speedup read against 1.0 needs them.
SUITES = {
    "quick": [("tiny", c, lengths, 32, 10, ()) for lengths in LENGTHS for c in (77, 154, 512)]
    + [("bmc-longclip-l14-512", 512, "biomedica", 8, 10, L14_OPTIONS)],
    "full": [("tiny", c, lengths, 64, 10, ()) for lengths in LENGTHS for c in (77, 154, 512)]
    + [("bmc-longclip-l14-512", c, lengths, 8, 10, L14_OPTIONS) for lengths in LENGTHS for c in (77, 154, 512)],
}
# glibc's default malloc against one that keeps freed memory (--cpu-malloc heap), on cases of the quick suite; the
# ViT-L/14 one on plain ZeRO-1 (no offload), whose step allocates its fp32 gradients anew
HEAP, ZERO1_BF16 = ("--cpu-malloc", "heap"), ("--ds_config", "ds_configs/zero1_bf16.json")
SUITES["malloc"] = [("bmc-longclip-l14-512", 512, "biomedica", 8, 2, options) for options in (ZERO1_BF16,
                                                                                                ZERO1_BF16 + HEAP)]
SUITES["malloc"] += [("tiny", 512, lengths, 32, 3, options) for lengths in LENGTHS for options in ((), HEAP)]
LOADER_CASES = {"quick": [("tiny", 512, "real", 32, 10, ())], "full": [("tiny", 512, "real", 64, 10, ())]}
# Where the operators' time goes (--profile-ops) in the case where the fixed per-step cost weighs most (a small
# model, short captions), on one rank and on two: (case, ranks)
PROFILE_CASES = [(("tiny", 77, "biomedica", 32, 10, ("--profile-ops", "25")), ranks) for ranks in (1, 2)]
SUITES["profile"] = [case for case, _ in PROFILE_CASES]  # run by write_profile's path, at their ranks


# ---------------------------------------------------------------- case data
def tokenizer_dir() -> tuple[str, bool]:
    """(a tokenizer directory, whether it is the real ModernBERT one from ../shared/data)."""
    real = SHARED / "tokenizers" / "modernbert"
    if (real / "tokenizer.json").is_file():
        return str(real), True
    from bmc_fast.data.default_data import ensure_default_data

    return ensure_default_data().tokenizer, False


def real_texts() -> list[str] | None:
    from bmc_fast.data.token_stats import read_texts

    captions = SHARED / "captions" / "biomed_captions.jsonl"
    if not captions.is_file():
        return None
    texts = read_texts(str(captions)) + read_texts(str(SHARED / "covid_cxr" / "*.tar"))
    return [t for t in texts if t]


def case_captions(lengths: str, n: int, tokenizer, seed: int) -> list[str]:
    """``n`` captions: real texts, or real (else synthetic) text cut to BIOMEDICA-like token counts."""
    rng = random.Random(seed)
    texts = real_texts()
    if lengths == "real":
        if texts is None:
            raise FileNotFoundError(f"--lengths real needs {SHARED}/captions and covid_cxr")
        return [rng.choice(texts) for _ in range(n)]
    if texts is None:
        from bmc_fast.data.synthetic import make_sample

        texts = [make_sample(rng)[1] for _ in range(200)]
    pieces = tokenizer(rng.sample(texts, min(len(texts), 2000)), add_special_tokens=False)["input_ids"]
    stream = [token for piece in pieces for token in piece]
    mu = math.log(BIOMEDICA_MEAN) - BIOMEDICA_SIGMA ** 2 / 2  # E[exp(N(mu, sigma²))] = mean
    captions = []
    for _ in range(n):
        length = min(max(round(math.exp(rng.gauss(mu, BIOMEDICA_SIGMA))), 3), 1024) - 2  # [CLS], [SEP]
        start = rng.randrange(max(1, len(stream) - length))
        captions.append(tokenizer.decode(stream[start:start + length], clean_up_tokenization_spaces=False))
    return captions


def write_shards(out: Path, captions: list[str], seed: int, per_shard: int = 64) -> str:
    """WebDataset shards of synthetic images (bmc_fast.data.synthetic) with ``captions``; returns a pattern."""
    import webdataset as wds

    from bmc_fast.data.synthetic import make_sample

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    n_shards = math.ceil(len(captions) / per_shard)
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"shard-{s:06d}.tar")) as sink:
            for i in range(s * per_shard, min((s + 1) * per_shard, len(captions))):
                image = make_sample(rng)[0]
                jpg = io.BytesIO()
                image.save(jpg, format="JPEG", quality=90)
                sink.write({"__key__": f"{i:08d}", "jpg": jpg.getvalue(), "txt": captions[i]})
    return str(out / f"shard-{{000000..{n_shards - 1:06d}}}.tar")


def ds_config_path(path: str) -> Path:
    """``--ds_config`` as given, or relative to the repository root (where its default lives)."""
    return Path(path) if Path(path).is_file() else ROOT / path


def case_ds_config(path: str, batch: int, steps: int, world_size: int) -> dict:
    """The DeepSpeed JSON with this case's micro batch (its accumulation kept) and enough scheduler steps."""
    config = load_ds_config(ds_config_path(path))
    accumulation = config.get("gradient_accumulation_steps", 1)
    config["train_micro_batch_size_per_gpu"] = batch
    config["train_batch_size"] = batch * accumulation * world_size
    params = (config.get("scheduler") or {}).get("params")
    if params and "total_num_steps" in params:
        params["total_num_steps"] = max(params["total_num_steps"], steps)
        params["warmup_num_steps"] = min(params.get("warmup_num_steps", 0), 1)  # a non-zero lr from step 2
    return config


# ---------------------------------------------------------------- measuring
class ResidentPeak:
    """Resident-set high-water mark above the level at ``start()``, sampled every 5 ms on a thread (CPU)."""

    def __init__(self):
        self._peak, self._base, self._run = 0, 0, False

    @staticmethod
    def _rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def start(self) -> None:
        self._base = self._peak = self._rss()
        self._run = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while self._run:
            self._peak = max(self._peak, self._rss())
            time.sleep(0.005)

    def stop(self) -> int:
        self._run = False
        self._thread.join()
        return max(self._peak, self._rss()) - self._base


def cpu_matmul_peak(threads: int, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, source): the best of 5 4096² matmuls in the engine's ``dtype`` on this CPU (bf16 runs on AMX
    where the CPU has it, so an fp32 peak would understate a bf16 run's)."""
    a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    flops = 2 * 4096 ** 3 / best
    name = str(dtype).removeprefix("torch.")
    return flops, f"measured here: {name} 4096x4096 matmul, {threads} thread(s), {flops / 1e9:.0f} GFLOP/s"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_and_source(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    if device.type == "cuda":
        from bmc_fast.model.flops import PEAK_BF16_FLOPS, peak_flops

        name = torch.cuda.get_device_name(device)
        peak = peak_flops(name)
        if peak is None:
            return None, f"{name}: not in bmc_fast.model.flops.PEAK_BF16_FLOPS ({', '.join(PEAK_BF16_FLOPS)}), no MFU"
        return peak, f"data sheet: {name} dense bf16 {peak / 1e12:.0f} TFLOP/s"
    return cpu_matmul_peak(torch.get_num_threads(), dtype)


class Meter:
    """A stack's timed steps: the step around the call, its parts, memory, loss."""

    def __init__(self, device: torch.device, profile=None):
        from bmc_fast.trainer.step_profile import StepProfile

        self.device, self.profile = device, profile or StepProfile(device)
        self.steps: list[dict] = []

    @contextlib.contextmanager
    def step(self, record: dict):
        cuda = self.device.type == "cuda"
        memory = None if cuda else ResidentPeak()
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            memory.start()
        start = time.perf_counter()
        self.profile.begin_step()
        yield
        parts = self.profile.end_step()
        if cuda:
            torch.cuda.synchronize(self.device)
        record.update(seconds=time.perf_counter() - start, parts=parts,
                      peak_memory_bytes=torch.cuda.max_memory_allocated(self.device) if cuda else memory.stop())
        self.steps.append(record)


class LossRecorder(torch.nn.Module):
    """The trainer's loss module, keeping its last value (read after the step)."""

    def __init__(self, loss_fn: torch.nn.Module):
        super().__init__()
        self.loss_fn, self.last = loss_fn, None

    def forward(self, *args):
        loss = self.loss_fn(*args)
        self.last = loss.detach()
        return loss


class OpProfile:
    """``--profile-ops N``: self time per operator of each stack's timed steps (torch.profiler: host time on CPU,
    device time on CUDA), averaged per step, the N largest kept. A profiled step also pays the profiler's own
    overhead: read the split, not the step times, of a profiled run."""

    def __init__(self, top: int, device: torch.device):
        self.top, self.cuda = top, device.type == "cuda"
        self.ms: dict[str, dict[str, float]] = {}
        self.steps: dict[str, int] = {}

    @contextlib.contextmanager
    def step(self, stack: str, timed: bool):
        if not self.top or not timed:
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=activities) as prof:
            yield
        table = self.ms.setdefault(stack, {})
        for event in prof.key_averages():
            us = event.self_device_time_total if self.cuda else event.self_cpu_time_total
            table[event.key] = table.get(event.key, 0.0) + us / 1e3
        self.steps[stack] = self.steps.get(stack, 0) + 1

    def summary(self) -> dict[str, dict]:
        """Per stack: ``ops`` [[name, ms/step], ...] largest first, ``total_ms`` over every operator."""
        out = {}
        for stack, table in self.ms.items():
            n = self.steps[stack]
            ranked = sorted(table.items(), key=lambda kv: -kv[1])
            out[stack] = {"ops": [[name, ms / n] for name, ms in ranked[:self.top]],
                          "total_ms": sum(table.values()) / n, "steps": n}
        return out


# ---------------------------------------------------------------- one case
def run_case(args: argparse.Namespace) -> dict:
    """One case in this process; its shards, run directory and export go to --work-dir (kept) or to a
    temporary directory (deleted afterwards: the ViT-L/14 export alone is 1.7 GB)."""
    if args.work_dir is not None:
        return _run_case(args, Path(args.work_dir))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError("bench_train.py on several ranks needs --work-dir DIR, a directory every rank sees")
    with tempfile.TemporaryDirectory(prefix="bench_train-") as work:
        return _run_case(args, Path(work))


def _run_case(args: argparse.Namespace, work: Path) -> dict:
    from transformers import AutoTokenizer

    from bmc_fast.trainer import loop
    from bmc_fast.trainer.config import TrainConfig
    from bmc_fast.trainer.distributed import DistEnv
    from bmc_fast.trainer.prepare import prepare

    env = DistEnv.from_environ()
    steps = args.warmup + args.steps
    tokenizer_path, real_tokenizer = tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    n_samples = steps * args.batch * env.world_size * (1 if not args.with_loaders else 2)
    captions = case_captions(args.lengths, n_samples, tokenizer, seed=args.seed)
    if env.rank == 0:
        write_shards(work / "shards", captions, seed=args.seed)
        config = case_ds_config(args.ds_config, args.batch, steps, env.world_size)
        (work / "ds_config.json").write_text(json.dumps(config))  # last: ranks > 0 wait for it
    if env.world_size > 1:
        _barrier_before_init(work)
    shards = str(work / "shards" / f"shard-{{000000..{math.ceil(n_samples / 64) - 1:06d}}}.tar")  # write_shards' names
    cfg = TrainConfig(ds_config=str(work / "ds_config.json"), preset=args.preset, train_data=shards,
                      tokenizer=tokenizer_path, context_length=args.context, max_steps=steps, eval_every=0,
                      save_every=0, log_every=10 ** 9, output_dir=str(work / "run"), overwrite=True,
                      seed=args.seed, workers=args.workers, loader=args.loader, loss_backend=args.loss_backend,
                      te_precision=args.te_precision, text_unpad=args.text_unpad,
                      grad_checkpointing=args.grad_checkpointing, grad_norm_dtype=args.grad_norm_dtype,
                      drop_path=0.0)  # off in both stacks: their random masks differ, and the first losses must agree
    p = prepare(cfg, env)
    held: list[dict] = []  # without --with-loaders: the steps' batches, in memory, for both stacks
    seen: list[int] = []  # real caption lengths of the batches bmc-fast takes this step

    def batches(stream):
        if not args.with_loaders:
            held.extend(next(stream) for _ in range(steps))
            stream = iter(held)
        return _recording_lengths(stream, seen)

    from bmc_fast.trainer.step_profile import StepProfile

    s = loop.start(p, loop.StepHooks(profile=StepProfile, loss=LossRecorder, batches=batches))
    peak, peak_source = peak_and_source(s.device, s.dtype)
    meters = {"bmc_fast": Meter(s.device, s.profile)}
    s.profile.watch_towers(s.engine.module)
    s.profile.watch_reduction(s.engine)
    baseline = None
    if args.baseline == "open_clip":
        from open_clip_baseline import OpenClipStack

        baseline = OpenClipStack(_full_module(s), p.tokenizer, p.model_cfg, p.ds_config, work / "open_clip_export",
                                 s.device, env.rank, env.world_size)
        meters["open_clip"] = Meter(s.device)
        meters["open_clip"].profile.watch_towers(baseline.module)
    if args.with_loaders:
        open_clip_batches = baseline.loader(p.train_urls, args.batch, max(args.workers, 1)) if baseline else None
    trace = _trace(args.trace, s.device) if args.trace else contextlib.nullcontext()
    ops = OpProfile(args.profile_ops, s.device)
    with trace as profiler, s.profile.watch_collectives():
        for step in range(1, steps + 1):
            record = {"step": step, "warmup": step <= args.warmup}
            lr = s.engine.get_lr()[0]
            if s.device.type == "cpu" and args.cpu_malloc == "default":
                trim_heap_if_large()
            with _region("bmc_fast step"), ops.step("bmc_fast", step > args.warmup), meters["bmc_fast"].step(record):
                loop.train_step(s, step)
            record["loss"] = float(s.loss_fn.last)
            record["lengths"], seen[:] = list(seen), []
            if baseline is not None:
                other = {"step": step, "warmup": step <= args.warmup}
                prof = meters["open_clip"].profile
                if s.device.type == "cpu" and args.cpu_malloc == "default":
                    trim_heap_if_large()
                with (_region("open_clip step"), ops.step("open_clip", step > args.warmup),
                      meters["open_clip"].step(other)):
                    with prof.part("data"):
                        if args.with_loaders:
                            pixels, ids = (t.to(s.device) for t in next(open_clip_batches))
                        else:
                            pixels, ids = baseline.padded_inputs(held[step - 1])
                    loss = baseline.step(pixels, ids, lr, prof)
                other["loss"] = float(loss)
                other["lengths"] = (ids != baseline.pad_id).sum(dim=1).tolist()
            if profiler is not None:
                profiler.step()
            _logger.info("step %d: %s", step, "  ".join(f"{name} {m.steps[-1]['seconds']:.2f} s (loss "
                                                       f"{m.steps[-1]['loss']:.4f})" for name, m in meters.items()))
    result = summarize(args, p, s.dtype, meters, peak, peak_source, real_tokenizer)
    if args.profile_ops:
        result["op_profile"] = ops.summary()
    loop.finish(s)
    return result


def _recording_lengths(batches, seen: list[int]):
    for batch in batches:
        seen.extend(batch["attention_mask"].sum(dim=1).tolist())
        yield batch


def _barrier_before_init(work: Path) -> None:
    """Ranks > 0 wait for rank 0's shards (before torch.distributed exists): a marker file."""
    marker = work / "ds_config.json"
    for _ in range(6000):
        if marker.is_file():
            return
        time.sleep(0.05)
    raise TimeoutError(f"rank 0 wrote no {marker}")


def _full_module(s):
    """The engine's model with every parameter whole (ZeRO-3 gathers them for the export)."""
    if s.engine.zero_optimization_stage() == 3:
        raise NotImplementedError("--baseline open_clip with ZeRO-3: pass a stage 1 or 2 --ds_config")
    return s.engine.module


def _region(name: str):
    return torch.profiler.record_function(name)


@contextlib.contextmanager
def _trace(out: str, device: torch.device):
    """A torch.profiler trace of every step (TensorBoard's profiler plugin, or Perfetto: the .pt.trace.json)."""
    from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, on_trace_ready=tensorboard_trace_handler(out), record_shapes=False) as prof:
        yield prof


def summarize(args, p, dtype: torch.dtype, meters: dict, peak: float | None, peak_source: str,
              real_tokenizer: bool) -> dict:
    """The case's results: per stack the median step, mean parts, throughput, FLOP/s, MFU, memory, losses."""
    from bmc_fast.model.flops import train_step_flops
    from bmc_fast.trainer.step_profile import OTHER, PARTS

    world, context = p.env.world_size, p.model_cfg.context_length
    pairs = args.batch * p.plan.accumulation * world
    stacks = {}
    for name, meter in meters.items():
        timed = [r for r in meter.steps if not r["warmup"]]
        seconds = statistics.median(r["seconds"] for r in timed)
        parts = {k: statistics.mean(r["parts"][k] for r in timed) for k in (*PARTS, OTHER)}
        # this rank's real tokens and FLOPs a step, times the ranks (they draw alike)
        tokens = statistics.mean(sum(r["lengths"]) for r in timed) * world
        flops = statistics.mean(train_step_flops(p.model_cfg, len(r["lengths"]), r["lengths"]) for r in timed) * world
        executed = flops if name == "bmc_fast" and p.model_cfg.text_unpad else statistics.mean(
            train_step_flops(p.model_cfg, len(r["lengths"]), r["lengths"], padded_to=context) for r in timed) * world
        stacks[name] = {
            "seconds": seconds, "parts": parts,
            "coverage": sum(parts[k] for k in PARTS) / statistics.mean(r["seconds"] for r in timed),
            "samples_per_s": pairs / seconds, "tokens_per_s": tokens / seconds, "mean_tokens": tokens / pairs,
            "tflops": flops / seconds / 1e12,  # the model's useful work: real tokens
            "executed_tflops": executed / seconds / 1e12,  # what ran: padded captions count whole
            "mfu": flops / seconds / (peak * world) if peak else None,
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in timed),
            "first_loss": meter.steps[0]["loss"], "steps": [{k: v for k, v in r.items() if k != "lengths"}
                                                            for r in meter.steps]}
    result = {"case": case_name(args), "preset": args.preset, "context": context, "lengths": args.lengths,
              "batch": args.batch, "pairs_per_step": pairs, "world_size": world, "steps": args.steps,
              "warmup": args.warmup, "with_loaders": args.with_loaders, "threads": torch.get_num_threads(),
              "dtype": str(dtype).removeprefix("torch."),
              "switches": {"ds_config": args.ds_config, "zero_stage": p.ds_config.get("zero_optimization", {})
                           .get("stage", 0), "loss_backend": p.cfg.loss_backend, "text_unpad": p.model_cfg.text_unpad,
                           "attn_backend": p.model_cfg.attn_backend, "loader": p.cfg.loader,
                           "te_precision": p.model_cfg.te_precision, "grad_checkpointing": args.grad_checkpointing,
                           "accumulation": p.plan.accumulation, "grad_norm_dtype": p.cfg.grad_norm_dtype,
                           THP: os.environ.get(THP, ""), "cpu_malloc": args.cpu_malloc},
              "real_tokenizer": real_tokenizer, "peak_flops": peak, "peak_source": peak_source, "stacks": stacks}
    if "open_clip" in stacks:
        a, b = stacks["bmc_fast"], stacks["open_clip"]
        result["speedup"] = b["seconds"] / a["seconds"]
        result["speedup_per_step"] = [y["seconds"] / x["seconds"] for x, y in zip(a["steps"], b["steps"])
                                      if not x["warmup"]]
        if not args.with_loaders:  # the same first batch through the same weights
            tolerance = (1e-4 if dtype == torch.float32 else 2e-2) * max(1.0, abs(b["first_loss"]))
            result["first_loss_diff"] = abs(a["first_loss"] - b["first_loss"])
            result["first_loss_tolerance"] = tolerance
            result["first_losses_agree"] = result["first_loss_diff"] <= tolerance
    return result


def case_name(args) -> str:
    return (f"{args.preset} ctx{args.context} {args.lengths} b{args.batch}" + (" +loaders" if args.with_loaders else "")
            + (f" {args.cpu_malloc} malloc" if args.cpu_malloc != "default" else ""))


def trim_heap_if_large(fraction: float = 0.5) -> None:
    """Before a stack's step, outside its timing: when the resident set exceeds ``fraction`` of the machine's
    memory, give glibc's free heap memory back to the OS (``malloc_trim(0)``).

    Freed blocks under glibc's mmap threshold stay in the heap, in holes between live ones: with both ViT-L/14
    stacks in one process the resident set grew ~0.5 GB a step (2-core Xeon) until a 10-step case was killed
    for memory; trimming held it flat. Each stack's step then starts alike, faulting its memory in again.
    Small cases never reach the threshold: trimming after every step made bmc-fast, which stepped first after
    each trim, pay the faults that open_clip then did not (0.92x where untrimmed runs measured 1.14x)."""
    import ctypes

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if ResidentPeak._rss() <= fraction * total:
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError) as e:  # not glibc: nothing to trim this way
        _logger.warning("resident set above %.0f%% of memory, but glibc's malloc_trim is unavailable (%s): the "
                        "heap is not trimmed", 100 * fraction, e)


def use_cpu_malloc(mode: str) -> None:
    """``heap``: glibc serves every block from its heap and never trims it (``mallopt(M_MMAP_MAX, 0)``,
    ``mallopt(M_TRIM_THRESHOLD, INT_MAX)``), so freed memory is reused without new page faults."""
    if mode not in CPU_MALLOC:
        raise ValueError(f"--cpu-malloc {mode!r}: choose one of {', '.join(CPU_MALLOC)}")
    if mode == "default":
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError) as e:
        raise RuntimeError(f"--cpu-malloc {mode} needs glibc's mallopt (Linux): {e}") from e
    if not ok:
        raise RuntimeError(f"--cpu-malloc {mode}: glibc's mallopt refused M_MMAP_MAX=0 / M_TRIM_THRESHOLD")
    _logger.info("malloc: glibc keeps freed memory (M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB), for both stacks")


# ---------------------------------------------------------------- suites and the report
def _spawn(case: tuple, baseline: str, with_loaders: bool, extra: list[str], timeout: float, ranks: int = 1) -> dict:
    """One case in a fresh process, or under the deepspeed launcher on ``ranks`` local ranks (one thread each)."""
    preset, context, lengths, batch, steps, options = case
    command = [__file__, "--preset", preset, "--context", str(context), "--lengths", lengths, "--batch", str(batch),
               "--steps", str(steps), "--baseline", baseline, "--json", *options, *extra]
    if with_loaders:
        command.append("--with-loaders")
    name = f"{preset} ctx{context} {lengths} b{batch}" + (" +loaders" if with_loaders else "")
    if lengths == "real" and real_texts() is None:
        return {"case": name, "status": f"skipped: {SHARED} has no captions / covid_cxr (real caption lengths)"}
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.setdefault(THP, "1")  # both stacks' CPU tensors on 2 MB pages: page faults, not work, were seconds a step
    with tempfile.TemporaryDirectory(prefix="bench_train-") as work:
        if ranks == 1:
            command = [sys.executable, *command]
        else:
            launcher = str(Path(sys.executable).parent / "deepspeed")
            command = [launcher, "--num_gpus", str(ranks), "--master_port", str(_free_port()), "--no_local_rank",
                       *command, "--work-dir", work]
            env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"case {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"case"')][-1])
    sys.stderr.write(f"{name}: {describe(result)} ({time.perf_counter() - started:.0f} s)\n")
    return {**result, "status": "ok"}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def describe(r: dict) -> str:
    a = r["stacks"]["bmc_fast"]
    text = f"bmc-fast {a['seconds']:.3f} s/step, parts cover {100 * a['coverage']:.0f}%"
    if "speedup" in r:
        text += f"; open_clip {r['stacks']['open_clip']['seconds']:.3f} s: {r['speedup']:.2f}x"
    if "first_losses_agree" in r:
        text += f"; first losses differ by {r['first_loss_diff']:.1e} (tolerance {r['first_loss_tolerance']:.0e})"
    return text


PART_LABELS = {"data": "data", "image_forward": "image fwd", "text_forward": "text fwd", "forward": "fwd other",
               "loss": "loss", "backward": "backward", "optimizer": "optimizer", "communication": "grad reduction",
               "other": "other"}


def peaks_by_dtype(rows: list[dict]) -> list[str]:
    """Each dtype's measured peaks as one range ('float32 174-222 GFLOP/s (measured here, ...)'), or the sources
    as given."""
    by_dtype: dict[str, list[dict]] = {}
    for r in rows:
        by_dtype.setdefault(r["dtype"], []).append(r)
    out = []
    for dtype, group in by_dtype.items():
        if not all(r["peak_source"].startswith("measured here") for r in group):
            out += dict.fromkeys(r["peak_source"] for r in group)
            continue
        gflops = sorted(r["peak_flops"] / 1e9 for r in group)
        spread = f"{gflops[0]:.0f}" if round(gflops[0]) == round(gflops[-1]) else f"{gflops[0]:.0f}-{gflops[-1]:.0f}"
        out.append(f"{dtype} {spread} GFLOP/s (measured here, 4096² matmul, {group[0]['threads']} threads)")
    return out


def write_suite(rows: list[dict], suite: str, info: dict, extra: list[str], out: Path) -> str:
    """OUT.{json,md,png} of a suite run on the machine ``info`` (``report.machine``: the run's, not the
    rerendering one's)."""
    ok = [r for r in rows if r["status"] == "ok"]
    peak_sources = "; ".join(peaks_by_dtype(ok)) or "none"
    thp = sorted({r["switches"].get(THP) or "unset" for r in ok})
    mallocs = sorted({r["switches"].get("cpu_malloc", "default") for r in ok})
    columns = ["case", "engine", "mean tokens", "bmc-fast s/step", "open_clip s/step", "speedup", "bmc-fast parts (s)",
               "parts / step", "tokens/s", "TFLOP/s", "MFU", "peak MiB (bmc / oc)", "first losses"]
    table = []
    for r in rows:
        if r["status"] != "ok":
            table.append([r["case"], r["status"]] + [""] * (len(columns) - 2))
            continue
        a, b = r["stacks"]["bmc_fast"], r["stacks"].get("open_clip")
        parts = ", ".join(f"{PART_LABELS[k]} {v:.3f}" for k, v in a["parts"].items() if v >= 0.0005)
        agree = ("n/a (loaders)" if r["with_loaders"] else
                 f"{'agree' if r['first_losses_agree'] else 'DIFFER'} ({r['first_loss_diff']:.1e})") if b else ""
        dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(r["dtype"], r["dtype"])
        engine = f"ZeRO-{r['switches']['zero_stage']} {dtype}"
        table.append([r["case"], engine, f"{a['mean_tokens']:.0f}", f"{a['seconds']:.3f}",
                      f"{b['seconds']:.3f}" if b else "", f"{r['speedup']:.2f}x" if b else "", parts,
                      f"{a['coverage']:.2f}", f"{a['tokens_per_s']:.0f}", f"{a['tflops']:.3f}",
                      f"{100 * a['mfu']:.1f}%" if a["mfu"] is not None else "n/a",
                      f"{a['peak_memory_bytes'] / 2**20:.0f} / {b['peak_memory_bytes'] / 2**20:.0f}" if b else
                      f"{a['peak_memory_bytes'] / 2**20:.0f}", agree])
    where = info.get("gpu", info.get("cpu_model", info["cpu"]))
    header = (f"`bench_train.py --suite {suite}`{' ' + ' '.join(extra) if extra else ''}: whole training steps of "
              f"the real trainer (1 rank, DeepSpeed, random init) against open_clip 3.3's (HFTextEncoder over the "
              f"same ModernBertModel, padded to the context, ClipLoss) on the same batches, alternated in one "
              f"process. Machine: {info['cores']} cores {where}, torch {info['torch']}. "
              f"Speedup = open_clip s/step ÷ bmc-fast s/step (median). MFU peaks, by the run's dtype: {peak_sources}. "
              f"{THP}={'/'.join(thp)} for both stacks, glibc malloc: "
              f"{'/'.join(mallocs)}{HEAP_PEAK_NOTE if 'heap' in mallocs else ''}"
              f"{TRIM_NOTE if 'default' in mallocs else ''}; DeepSpeed's clipping norm: "
              f"{'/'.join(sorted({r['switches'].get('grad_norm_dtype', 'float64') for r in ok}))} "
              "(bmc_fast/trainer/grad_norm.py).")
    payload = {"machine": info, "suite": suite, "extra_args": extra, "rows": rows}
    return write_report(out, payload, header, columns, table,
                        plot=lambda path: plot(ok, path))


PROFILE_ROWS = 15  # operators shown per case: the costliest in either stack


def _profiled_step(r: dict) -> str:
    a, b = r["stacks"]["bmc_fast"]["seconds"], r["stacks"]["open_clip"]["seconds"]
    return f"{r['case']} on {r['world_size']} rank(s), bmc-fast {a:.3f} s, open_clip {b:.3f} s ({r['speedup']:.2f}x)"


def write_profile(rows: list[dict], info: dict, extra: list[str], out: Path, before: str | None = None) -> str:
    """OUT.{json,md} of the profile suite: per case, the operators that cost each stack most (ms per step)."""
    where = info.get("gpu", info.get("cpu_model", info["cpu"]))
    columns = ["case", "ranks", "operator", "bmc-fast ms/step", "open_clip ms/step"]
    table = []
    for r in rows:
        ops = {stack: dict(p["ops"]) for stack, p in r["op_profile"].items()}
        a, b = ops["bmc_fast"], ops.get("open_clip", {})
        names = sorted(set(a) | set(b), key=lambda k: -max(a.get(k, 0.0), b.get(k, 0.0)))[:PROFILE_ROWS]
        case = (r["case"], str(r["world_size"]))
        table += [[*case, f"`{name}`", f"{a[name]:.2f}" if name in a else "<", f"{b[name]:.2f}" if name in b else "<"]
                  for name in names]
        table.append([*case, "**all operators**", *(f"**{r['op_profile'][stack]['total_ms']:.1f}**"
                                                    for stack in ("bmc_fast", "open_clip"))])
    header = (f"`bench_train.py --suite profile`{' ' + ' '.join(extra) if extra else ''}: self time per operator "
              f"(torch.profiler, ms per timed step, mean of {rows[0]['steps']}) of bmc-fast's and open_clip 3.3's "
              f"steps on the same batches{'; ' + before if before else ''}. \"<\": below that stack's "
              f"{rows[0]['op_profile']['bmc_fast']['ops'][-1][1]:.2f} ms cut-off, or absent. A profiled step pays the "
              f"profiler too: step times come from unprofiled runs (train_{info.get('device', 'cpu')}.md). "
              f"Machine: {info['cores']} cores {where}, torch {info['torch']}. Profiled steps (median): "
              + "; ".join(_profiled_step(r) for r in rows) + ".")
    return write_report(out, {"machine": info, "suite": "profile", "extra_args": extra, "before": before,
                              "rows": rows}, header, columns, table)


def plot(rows: list[dict], path: Path) -> None:
    """Stacked step breakdown, bmc-fast beside open_clip, per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bmc_fast.trainer.step_profile import OTHER, PARTS

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.2))
    ticks, labels, x = [], [], 0.0
    for r in rows:
        first = x
        for name in STACKS:
            if name not in r["stacks"]:
                continue
            bottom, seconds = 0.0, r["stacks"][name]["parts"]
            scale = 1 / r["stacks"]["bmc_fast"]["seconds"]  # every case relative to bmc-fast's step
            for i, part in enumerate((*PARTS, OTHER)):
                ax.bar(x, seconds[part] * scale, 0.8, bottom=bottom, color=plt.cm.tab10(i),
                       label=PART_LABELS[part] if not ticks else None)
                bottom += seconds[part] * scale
            ticks.append(x)
            labels.append("bmc" if name == "bmc_fast" else "oc")
            x += 1
        case = r["case"].replace("bmc-longclip-l14-512", "l14").replace(" b", "\nb", 1)
        ax.text((first + x - 1) / 2, -0.16, case, transform=ax.get_xaxis_transform(), ha="center", va="top",
                fontsize=6)
        x += 0.6
    ax.set_xticks(ticks, labels, fontsize=6)
    ax.set_ylabel("step time / bmc-fast step")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="benchmarks/bench_train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rerender", action="store_true", help="--suite: rewrite the .md/.png from the .json")
    parser.add_argument("--suite", choices=sorted(SUITES), default=None,
                        help="every case of a suite, each in a fresh process; writes benchmarks/results/train_*")
    parser.add_argument("--preset", default="tiny", help="model preset (bmc_fast/model/presets) or JSON")
    parser.add_argument("--context", type=positive_int, default=512, help="text context length")
    parser.add_argument("--lengths", choices=LENGTHS, default="biomedica", help="caption lengths (see above)")
    parser.add_argument("--batch", type=positive_int, default=32, help="micro batch per rank")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=positive_int, default=1, help="steps before timing (the first one)")
    parser.add_argument("--baseline", choices=("none", "open_clip"), default="none",
                        help="open_clip: the paper's stack, its steps alternated with bmc-fast's")
    parser.add_argument("--with-loaders", action="store_true",
                        help="batches from the loaders (bmc-fast's --loader vs open_clip's webdataset + PIL)")
    parser.add_argument("--trace", default=None, help="write a torch.profiler trace of the steps to this directory")
    parser.add_argument("--profile-ops", type=int, default=0, metavar="N",
                        help="record each stack's N costliest operators (self time per step, torch.profiler)")
    parser.add_argument("--ds_config", "--ds-config", default="ds_configs/zero2.json",
                        help="DeepSpeed JSON (its micro batch is replaced by --batch)")
    parser.add_argument("--loss-backend", default="auto", help="fused loss kernels: auto, triton, torch")
    parser.add_argument("--loader", default="auto", help="bmc-fast's loader: auto, dali, pil")
    parser.add_argument("--workers", type=int, default=1, help="loader workers / DALI threads")
    parser.add_argument("--te-precision", default=None, help="Transformer Engine layers (CUDA)")
    parser.add_argument("--no-text-unpad", dest="text_unpad", action="store_false", default=None,
                        help="pad captions in bmc-fast too")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--grad-norm-dtype", default="auto", choices=GRAD_NORM_DTYPES,
                        help="DeepSpeed's clipping norm (bmc_fast/trainer/grad_norm.py)")
    parser.add_argument("--cpu-malloc", choices=CPU_MALLOC, default="default",
                        help="heap: glibc keeps freed memory for reuse, as CUDA's caching allocator does (see above)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="shards and run directory (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print the case's result as one JSON line last")
    parser.add_argument("--timeout", type=float, default=3600, help="--suite: seconds per case")
    parser.add_argument("--note", default=None, help="--suite profile: a line for the report (which code ran)")
    parser.add_argument("--out", default=None,
                        help="--suite: output path without suffix (default benchmarks/results/train_<device>)")
    return parser


SUITE_OPTIONS = ("--ds_config", "--loss-backend", "--loader", "--workers", "--te-precision", "--grad-norm-dtype",
                 "--seed")


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        raise ConfigError(f"--timeout must be > 0 (seconds per case), got {args.timeout}")
    if args.profile_ops < 0 or (args.profile_ops and args.trace):
        raise ConfigError(f"--profile-ops {args.profile_ops}: give a count >= 0, and not with --trace (one "
                          "torch.profiler at a time)")
    if not args.rerender:
        load_ds_config(ds_config_path(args.ds_config))  # a missing or malformed JSON stops here, not in each case
    if not args.rerender and not args.suite:  # a suite's cases name their presets
        load_model_config(args.preset)  # a missing or malformed preset too, before the case writes its data
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.suite:
        extra = [x for name in SUITE_OPTIONS for x in (name, str(getattr(args, name.lstrip("-").replace("-", "_"))))
                 if getattr(args, name.lstrip("-").replace("-", "_")) != parser.get_default(
                     name.lstrip("-").replace("-", "_"))]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        out = Path(args.out) if args.out else RESULTS / f"train_{device}"
        if args.suite == "profile" and not args.out:
            out = RESULTS / f"train_profile_{device}"
        if args.rerender:
            saved = read_json_object(out.with_suffix(".json"), f"--rerender: {str(out.with_suffix('.json'))!r}",
                                     "run the suite without --rerender first, or fix --out")
            if saved["suite"] == "profile":
                write_profile(saved["rows"], saved["machine"], saved["extra_args"], out, saved.get("before"))
            else:
                write_suite(saved["rows"], saved["suite"], saved["machine"], saved["extra_args"], out)
            return saved
        if args.suite == "profile":
            rows = [_spawn(case, "open_clip", False, extra, args.timeout, ranks) for case, ranks in PROFILE_CASES]
            write_profile(rows, machine(device), extra, out, args.note)
            return {"rows": rows}
        rows = [_spawn(case, "open_clip", False, extra, args.timeout) for case in SUITES[args.suite]]
        rows += [_spawn(case, "open_clip", True, extra, args.timeout) for case in LOADER_CASES.get(args.suite, [])]
        write_suite(rows, args.suite, machine(device), extra, out)
        return {"rows": rows}
    from bmc_fast.trainer.metrics import setup_logging

    setup_logging(int(os.environ.get("RANK", 0)))
    use_cpu_malloc(args.cpu_malloc)
    result = run_case(args)
    sys.stderr.write(describe(result) + "\n")
    if args.json and int(os.environ.get("RANK", 0)) == 0:
        sys.stdout.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    run_main(main)
