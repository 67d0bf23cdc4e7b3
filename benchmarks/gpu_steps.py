"""The measuring steps of ``make gpu-check`` (``benchmarks/gpu_check.py`` runs each in its own process).

    python benchmarks/gpu_steps.py data --cache DIR --out STEP.json
    python benchmarks/gpu_steps.py loss|text|te --out STEP.json          (a, b, d)
    python benchmarks/gpu_steps.py dali --data DATA.json --out STEP.json   (c)
    python benchmarks/gpu_steps.py compare-runs RUN_A RUN_B --out STEP.json   (e, after two runs)
    python benchmarks/gpu_steps.py paper-shape --work DIR --out STEP.json    (f and g)

Each writes one JSON object: ``{"status": "pass" | "fail" | "skipped", "figure": "<one line>", "lines": [...]}``,
where every line is itself pass / fail / skipped with its figure. Parity uses flash-attention's rule: our error
against float64 is at most twice plain torch's own error in the same precision, plus 1e-5 of the magnitude.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

RTOL = 1e-5  # of the magnitude, on top of 2x torch's own error
OUTPUTS = ("loss", "d image", "d text", "d scale")


def line(name: str, ok: bool | None, figure: str, **values) -> dict:
    status = "skipped" if ok is None else ("pass" if ok else "fail")
    return {"name": name, "status": status, "figure": figure, **values}


def summary(lines: list[dict], figure: str) -> dict:
    statuses = {entry["status"] for entry in lines}
    status = "fail" if "fail" in statuses else ("skipped" if statuses == {"skipped"} else "pass")
    return {"status": status, "figure": figure, "lines": lines}


def timed(fn, device: torch.device, repeats: int = 10) -> tuple[float, int]:
    """Median seconds of ``fn()`` over ``repeats`` calls after two warm-ups (CUDA events on a GPU), and on a GPU
    the peak memory one call allocates above what was allocated before it (bytes; 0 elsewhere)."""
    import time

    cuda = device.type == "cuda"
    for _ in range(2):
        fn()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) if cuda else 0


def max_error(value, reference) -> float:
    return (value.double() - reference).abs().max().item()


# ------------------------------------------------------------------------------------------------ the data
def step_data(args) -> dict:
    """The embedded synthetic dataset, small (512 pairs), where the trainer looks for it (``--cache``, which the
    runs get as $BMC_FAST_CACHE), its tokenizer, and DALI index files for its training shards."""
    from bmc_fast.data.default_data import ensure_default_data
    from bmc_fast.data.index import build_indexes
    from bmc_fast.data.shards import expand_shards

    data = ensure_default_data(seed=0, root=args.cache, n_train=512, n_eval=64)
    shards = expand_shards(data.train, "train")
    report = build_indexes(shards)
    return summary([line("data: synthetic shards, tokenizer, indexes", True, f"{len(shards)} shards, "
                         f"{report['good']} good samples", train=data.train, tokenizer=data.tokenizer)],
                   "data")


# ----------------------------------------------------------------------------------------- a: the fused loss
def set_tf32(on: bool) -> None:
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if on else "ieee"
    else:
        matmul.allow_tf32 = on


def step_loss(args) -> dict:
    """Triton kernels and their torch twin vs float64 at N x D, fp32 / tf32 / bf16; time and peak memory vs a
    plain-torch ClipLoss (open_clip's when installed)."""
    from bmc_fast.kernels import SINGLE_PROCESS, clip_loss, clip_loss_ref

    try:
        from open_clip.loss import ClipLoss

        reference_name, plain = "open_clip ClipLoss", ClipLoss()
    except ImportError:
        reference_name, plain = "plain torch (clip_loss_ref)", None
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    lines = []
    for mode in ("fp32", "tf32", "bf16"):
        set_tf32(mode == "tf32")
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        features = [torch.nn.functional.normalize(torch.randn(args.n, args.d, device=device, generator=generator),
                                                  dim=-1).to(dtype) for _ in range(2)]
        scale = torch.tensor(100.0, device=device)
        leaves = [t.clone().requires_grad_() for t in (*features, scale)]
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        want = clip_loss_ref(*leaves64)
        grads_want = torch.autograd.grad(want, leaves64)
        magnitude = (scale.double() * features[0].double() @ features[1].double().T).abs().max().item()
        outputs = {}
        for name, fn in (("torch", lambda *x: clip_loss_ref(*x)),
                         ("triton", lambda *x: clip_loss(*x, backend="triton", process_group=SINGLE_PROCESS)),
                         ("twin", lambda *x: clip_loss(*x, backend="torch", process_group=SINGLE_PROCESS))):
            loss = fn(*leaves)
            outputs[name] = (loss, torch.autograd.grad(loss, leaves))
        # (loss, dI, dT, ds): each against float64, allowed 2x torch's own error + RTOL of its magnitude (the loss:
        # the logits it is summed from; a gradient: its largest entry, at least 1), as tests/test_kernels_loss.py
        references = [want, *grads_want]
        magnitudes = [magnitude] + [max(g.abs().max().item(), 1.0) for g in grads_want]
        torch_errors = [max_error(o, r) for o, r in zip((outputs["torch"][0], *outputs["torch"][1]), references)]
        for name in ("triton", "twin"):
            loss, grads = outputs[name]
            errors = [max_error(o, r) for o, r in zip((loss, *grads), references)]
            allowances = [2 * e + RTOL * m for e, m in zip(torch_errors, magnitudes)]
            worst = max(range(4), key=lambda i: errors[i] / allowances[i])
            lines.append(line(f"a. {name} loss, {mode}, N={args.n} D={args.d}",
                              all(e <= a for e, a in zip(errors, allowances)),
                              f"worst of loss and gradients vs float64: {errors[worst]:.2e} ({OUTPUTS[worst]}), "
                              f"allowed {allowances[worst]:.2e} (2 x torch {mode}'s {torch_errors[worst]:.2e} + "
                              f"{RTOL:g} x {magnitudes[worst]:.3g})", errors=errors, allowances=allowances))

        def run(fn, leaves=leaves):
            return lambda: torch.autograd.grad(fn(*leaves), leaves)

        plain_fn = (lambda *x: plain(x[0], x[1], x[2])) if plain is not None else clip_loss_ref
        timings = {"triton": timed(run(lambda *x: clip_loss(*x, backend="triton", process_group=SINGLE_PROCESS)),
                                   device, args.repeats),
                   "reference": timed(run(plain_fn), device, args.repeats)}
        (t_fused, m_fused), (t_ref, m_ref) = timings["triton"], timings["reference"]
        lines.append(line(f"a. time and memory, {mode}", True,
                          f"triton {t_fused * 1e3:.2f} ms, {m_fused / 2**20:.0f} MiB; {reference_name} "
                          f"{t_ref * 1e3:.2f} ms, {m_ref / 2**20:.0f} MiB: {t_ref / t_fused:.2f}x faster, "
                          f"{m_ref / max(m_fused, 1):.1f}x less memory", seconds=t_fused, reference_seconds=t_ref,
                          peak_bytes=m_fused, reference_peak_bytes=m_ref))
    set_tf32(False)
    return summary(lines, f"fused loss N={args.n} D={args.d}: " + "; ".join(
        entry["status"] for entry in lines if entry["name"].startswith("a. triton")))


# ------------------------------------------------------------------------------------------ b: the text tower
def biomedica_lengths(n: int, context: int, seed: int = 0) -> list[int]:
    """Token counts ([CLS] and [SEP] included) log-normal of mean 127, cut to the context."""
    from bench_train import BIOMEDICA_MEAN, BIOMEDICA_SIGMA

    generator = torch.Generator().manual_seed(seed)
    mu = math.log(BIOMEDICA_MEAN) - BIOMEDICA_SIGMA ** 2 / 2
    draws = torch.exp(mu + BIOMEDICA_SIGMA * torch.randn(n, generator=generator))
    return [int(min(max(round(x), 3), context)) for x in draws.tolist()]


def step_text(args) -> dict:
    """The BMC-LongCLIP text tower (ModernBERT 150M, random init) at context 512, bf16: the packed path on
    torch's varlen_attn (and FA4 where installed) vs the padded SDPA path, outputs and gradients against an
    fp32 padded reference, and time."""
    from bmc_fast.model import attn_backend
    from bmc_fast.model.config import load_model_config
    from bmc_fast.model.text_tower import TextTower
    from bmc_fast.plan import MODERNBERT_TOKENS

    device = torch.device(args.device)
    cfg = load_model_config(args.preset, text=MODERNBERT_TOKENS)
    lengths = biomedica_lengths(args.batch, cfg.context_length)
    torch.manual_seed(0)
    ids = torch.randint(5, 50000, (args.batch, max(lengths)), device=device)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    reference = TextTower(cfg.text, cfg.embed_dim, unpad=False, attn_backend="sdpa").to(device)
    state = reference.state_dict()
    want = reference(ids, mask)
    grads_want = torch.autograd.grad(want.float().pow(2).sum(), list(reference.parameters()))

    backends = ["sdpa"]  # the padded path
    support = attn_backend.attention_support(device)
    if attn_backend.why_not("torch_flash", torch.bfloat16, support) is None:
        backends.append("torch_flash")
    if attn_backend.why_not("fa4", torch.bfloat16, support) is None:
        backends.append("fa4")  # last: activating FA4 switches torch's flash kernels for the process
    lines, results = [], {}
    for backend in backends:
        tower = TextTower(cfg.text, cfg.embed_dim, unpad=backend != "sdpa", attn_backend=backend).to(device)
        tower.load_state_dict(state)
        tower.to(torch.bfloat16)
        params = list(tower.parameters())
        out = tower(ids, mask)
        grads = torch.autograd.grad(out.float().pow(2).sum(), params)
        err_out = _relative(out, want)
        err_grad = max(_relative(g, w) for g, w in zip(grads, grads_want))
        seconds, peak = timed(lambda t=tower, p=params: torch.autograd.grad(t(ids, mask).float().sum(), p), device,
                              args.repeats)
        results[backend] = (err_out, err_grad, seconds, peak)
        name = "padded SDPA" if backend == "sdpa" else f"packed {backend} (varlen_attn)"
        lines.append({"name": f"b. {name}", "figure": f"relative error vs fp32: output {err_out:.2e}, worst gradient "
                      f"{err_grad:.2e}; fwd+bwd {seconds * 1e3:.1f} ms, {peak / 2**30:.2f} GiB",
                      "output_error": err_out, "gradient_error": err_grad, "seconds": seconds, "peak_bytes": peak})
    padded = results["sdpa"]
    for entry, backend in zip(lines, backends):
        if backend == "sdpa":
            entry["status"] = "pass"
            continue
        err_out, err_grad, seconds, _ = results[backend]
        ok = err_out <= 2 * padded[0] + 1e-3 and err_grad <= 2 * padded[1] + 1e-3
        entry["status"] = "pass" if ok else "fail"
        entry["figure"] += f"; {padded[2] / seconds:.2f}x the padded path's speed"
    for backend in ("torch_flash", "fa4"):
        if backend not in backends:
            lines.append(line(f"b. packed {backend}", None, "skipped: " + attn_backend.why_not(
                backend, torch.bfloat16, support)))
    mean = sum(lengths) / len(lengths)
    return summary(lines, f"text tower ctx {cfg.context_length}, {args.batch} captions of mean {mean:.0f} tokens")


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm().clamp(min=1e-30)).item()


# -------------------------------------------------------------------------------------- c: DALI, d: TE
def dali_pass(shards: list[str], indexes: list[str], device_id: int | None, image_size: int = 224,
              batch: int = 32) -> tuple[list, float]:
    """One pass of the evaluation graph (decode, resize, centre crop, normalise: deterministic) over the shards
    on ``device_id`` (None: the CPU graph, an int: ``mixed`` decode on that GPU): (pixel arrays, images/s)."""
    import time

    import numpy as np

    from bmc_fast.dali_pipelines.pipeline import build_pipeline

    pipe = build_pipeline(shards, indexes, image_size=image_size, train=False, batch_size=batch, num_threads=4,
                          device_id=device_id, pad_last_batch=True)
    total = pipe.reader_meta("Reader")["epoch_size_padded"]
    images, start = [], time.perf_counter()
    while len(images) < total:
        pixels = pipe.run()[0]
        pixels = pixels.as_cpu() if hasattr(pixels, "as_cpu") else pixels
        images += [np.array(pixels[i]) for i in range(len(pixels))]
    return images[:total], total / (time.perf_counter() - start)


def step_dali(args) -> dict:
    """DALI's mixed (GPU) decode and augmentation against the same graph on the CPU."""
    from bmc_fast.optional import dali_installed

    if not dali_installed():
        return summary([line("c. DALI mixed vs CPU", None, "skipped: DALI not installed")], "skipped")
    from bmc_fast.data.index import index_path
    from bmc_fast.data.shards import expand_shards

    data = json.loads(Path(args.data).read_text())["lines"][0]
    shards = expand_shards(data["train"], "train")
    indexes = [str(index_path(shard)) for shard in shards]
    cpu, cpu_rate = dali_pass(shards, indexes, None)
    gpu, gpu_rate = dali_pass(shards, indexes, 0 if torch.cuda.is_available() else None)
    difference = max(float(abs(a.astype("float64") - b.astype("float64")).mean()) for a, b in zip(cpu, gpu))
    tolerance = 0.05  # normalised pixels: nvJPEG and libjpeg-turbo round the IDCT differently
    return summary([line("c. DALI mixed vs CPU", difference <= tolerance,
                         f"{len(cpu)} images: worst mean |difference| {difference:.3g} (normalised; tolerance "
                         f"{tolerance}); {gpu_rate:.0f} vs {cpu_rate:.0f} img/s", difference=difference,
                         images_per_second=gpu_rate, cpu_images_per_second=cpu_rate)], "DALI")


def step_te(args) -> dict:
    """Transformer Engine layers (bf16, and FP8 where the GPU has it) against the torch layers, ``tiny``."""
    import dataclasses

    from bmc_fast.optional import transformer_engine_installed

    if not transformer_engine_installed():
        return summary([line("d. Transformer Engine", None, "skipped: transformer_engine not installed")],
                       "skipped")
    from bmc_fast import create_model
    from bmc_fast.model.clip import BMCLongCLIP
    from bmc_fast.model.weights import load_torch_state

    device = torch.device("cuda")
    ids = {"vocab_size": 1024, "pad_token_id": 0, "cls_token_id": 1, "sep_token_id": 2}
    torch.manual_seed(0)
    base = create_model("tiny", text=ids).to(device).eval()
    images = torch.randn(64, 3, 64, 64, device=device)
    tokens = torch.randint(3, 1024, (64, 64), device=device)
    mask = torch.ones_like(tokens)
    lines = []
    for precision in ["bf16"] + (["fp8"] if torch.cuda.get_device_capability() >= (8, 9) else []):
        on_te = BMCLongCLIP(dataclasses.replace(base.cfg, te_precision=precision))  # TE layers, on the GPU
        load_torch_state(on_te, base.state_dict())
        on_te.eval()
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            want = base.encode_image(images), base.encode_text(tokens, mask)
            with getattr(on_te, "autocast", torch.no_grad)():
                got = on_te.encode_image(images), on_te.encode_text(tokens, mask)
        error = max(_relative(g, w) for g, w in zip(got, want))
        tolerance = 2e-2 if precision == "bf16" else 1.5e-1
        lines.append(line(f"d. TE {precision} vs torch layers (tiny)", error <= tolerance,
                          f"relative error {error:.2e} (tolerance {tolerance})", relative_error=error))
    return summary(lines, "Transformer Engine")


# ------------------------------------------------------------------------------ e: two runs, f/g: bench + plan
def step_compare_runs(args) -> dict:
    """Two runs of one seed under torch's deterministic settings: the loss falls, the weights agree."""
    runs = [_losses(Path(run)) for run in args.inputs]
    first, last = runs[0][0], runs[0][-1]
    weights = [_weights(Path(run)) for run in args.inputs]
    worst = max((a.double() - b.double()).abs().max().item() for a, b in zip(weights[0].values(), weights[1].values()))
    same = worst == 0.0 and runs[0] == runs[1]
    lines = [line("e. tiny, 1 GPU, NCCL, DeepSpeed launcher: the loss falls", last < first,
                  f"loss {first:.4f} -> {last:.4f} over {len(runs[0])} logged steps", losses=runs[0]),
             line("e. the rerun under torch's deterministic settings", same, "bit-identical weights and losses" if same
                  else f"largest weight difference {worst:.3g}; losses {'equal' if runs[0] == runs[1] else 'differ'}",
                  max_weight_difference=worst)]
    return summary(lines, "tiny through the DeepSpeed launcher")


def _losses(run: Path) -> list[float]:
    rows = [json.loads(text) for text in (run / "metrics.jsonl").read_text().splitlines() if text.strip()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def _weights(run: Path) -> dict:
    from bmc_fast.checkpoint.run_dir import RunDir
    from bmc_fast.checkpoint.zero_weights import fp32_state_dict

    run_dir = RunDir(run)
    return fp32_state_dict(run_dir.checkpoints, run_dir.latest_tag())


def step_compare_plan(args) -> dict:
    """bench_train's case at the paper's shape (f) and the planner's peak for its micro batch (g)."""
    from bmc_fast.plan import PLANNER_ERROR

    bench_path, plan_path = (Path(p) for p in args.inputs)
    bench = json.loads(bench_path.read_text().strip().splitlines()[-1])
    planned = json.loads(plan_path.read_text())
    ours = bench["stacks"]["bmc_fast"]
    figure = f"micro batch {bench['batch']}: {ours['samples_per_s']:.0f} pairs/s, {ours['tflops']:.0f} TFLOP/s"
    figure += f", MFU {100 * ours['mfu']:.0f}% ({bench['peak_source']})" if ours.get("mfu") else \
        f" (no MFU: {bench['peak_source']})"
    if "speedup" in bench:
        figure += f"; {bench['speedup']:.2f}x open_clip's step"
    agree = bench.get("first_losses_agree", True)
    predicted, measured = planned["plan"]["total_bytes"], ours["peak_memory_bytes"]
    ratio = predicted / measured
    lines = [line("f. bench_train, bmc-longclip-l14-512, bf16, activation checkpointing", agree,
                  figure + ("" if agree else "; first losses disagree"), seconds=ours["seconds"],
                  samples_per_s=ours["samples_per_s"], mfu=ours.get("mfu"), speedup=bench.get("speedup")),
             line("g. the planner's peak vs the measured one", abs(ratio - 1) <= PLANNER_ERROR,
                  f"predicted {predicted / 2**30:.1f} GiB, measured {measured / 2**30:.1f} GiB: {ratio:.2f}x "
                  f"(the planner's stated error: ±{PLANNER_ERROR:.0%})", predicted_bytes=predicted,
                  measured_bytes=measured)]
    return summary(lines, "the paper's shape")


def step_paper_shape(args) -> dict:
    """f and g, each command in its own process (run from ``--work``, so the installed bmc_fast is imported)."""
    import subprocess

    from gpu_check import paper_shape_commands

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    memory = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f}GiB"
    baseline = "open_clip" if _importable("open_clip") else "none"
    fit, bench, at_batch = paper_shape_commands(work, memory, "0", baseline)
    subprocess.run(fit, cwd=work, check=True)
    batch = json.loads((work / "plan_fit.json").read_text())["largest_micro_batch"]
    if batch < 1:
        return summary([line("f. bench_train at the paper's shape", False, f"the planner fits no pair in {memory}")],
                       "f")
    _, bench, at_batch = paper_shape_commands(work, memory, str(batch), baseline)
    out = subprocess.run(bench, cwd=work, check=True, capture_output=True, text=True).stdout
    (work / "bench.json").write_text(out.strip().splitlines()[-1])
    subprocess.run(at_batch, cwd=work, check=True)
    args.inputs = [str(work / "bench.json"), str(work / "plan.json")]
    return step_compare_plan(args)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


STEPS = {"data": step_data, "loss": step_loss, "text": step_text, "dali": step_dali, "te": step_te,
         "paper-shape": step_paper_shape, "compare-runs": step_compare_runs, "compare-plan": step_compare_plan}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("inputs", nargs="*", help="compare-runs: two run directories; compare-plan: two JSONs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=16384, help="loss: pairs")
    parser.add_argument("--d", type=int, default=768, help="loss: feature width")
    parser.add_argument("--batch", type=int, default=64, help="text: captions")
    parser.add_argument("--preset", default="bmc-longclip-l14-512", help="text: the model preset")
    parser.add_argument("--device", default="cuda", help="loss, text: where they run (cpu: for tests)")
    parser.add_argument("--repeats", type=int, default=10, help="loss, text: timed calls")
    parser.add_argument("--data", help="dali: the data step's JSON (its indexed training shards)")
    parser.add_argument("--cache", help="data: where the embedded dataset goes ($BMC_FAST_CACHE of the runs)")
    parser.add_argument("--work", default="/tmp/bmc_gpu_check/paper", help="paper-shape: scratch directory")
    args = parser.parse_args()
    result = STEPS[args.step](args)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
