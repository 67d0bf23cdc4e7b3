"""Memory planner: will a contrastive batch fit, per GPU, before anything is launched?

    python -m bmc_fast.plan --preset bmc-longclip-l14-512 --ds_config ds_configs/paper_16k_8gpu.json \\
        --gpus 8 --gpu-memory 80GB [--grad-checkpointing] [--te-precision bf16] [--global-batch 16384]

Per GPU, in the DeepSpeed JSON's precision:

- **model states** from DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` for ZeRO-2,
  ``estimate_zero3_model_states_mem_needs`` with the largest layer for ZeRO-3; ZeRO-1 from the ZeRO-2 terms
  with unpartitioned 16-bit gradients). The estimators assume 16-bit training; fp32 runs hold
  4 (params) + 16/N (the optimizer's fp32 partition copy, Adam's two moments and the gradient partition)
  bytes per parameter, as DeepSpeed's ZeRO optimizer keeps them (full gradients only pass through).
- **activations per pair**, measured on this machine by a probe: one image and captions of two lengths
  through the real towers (padded or unpadded as the preset runs, activation checkpointing as asked),
  counting the bytes autograd saves for the backward (``torch.autograd.graph.saved_tensors_hooks``), in the
  run's dtype; per pair = the image's bytes + a caption of ``--mean-tokens`` tokens (``--context`` when
  padded). Plus the backward's working set: twice the largest single block's saved bytes per pair.
- **the fused loss**: the gathered features of every rank's pairs and their gradients (fp32), and the
  Triton forward's row statistics and partial columns (``kernels/contrastive_triton.py``).

Then the largest micro batch that fits under ``--gpu-memory`` less ``--reserve`` (CUDA context, allocator
slack), and the contrastive accumulation K that reaches ``--global-batch``. Every number is computed, not
measured on a GPU; ``benchmarks/bench_plan.py`` compares the planner with measured peaks on CPU.

``preflight`` is the same plan as a check for the trainer (``bmc_fast/trainer/prepare.py``, on CUDA): pass when
the plan fits the device less the reserve, warn when it is over by no more than the planner's error
(``PLANNER_ERROR``), else ``ConfigError`` naming the numbers and a fix the planner says fits.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bmc_fast.ds_json import DeepSpeedSettings, deepspeed_settings, load_ds_config
from bmc_fast.errors import ConfigError
from bmc_fast.model.config import ModelConfig, load_model_config

_logger = logging.getLogger(__name__)
GiB = 1024 ** 3
# ModernBERT's tokenizer (BioClinical ModernBERT shares it): the probe's vocabulary unless a preset sets one.
MODERNBERT_TOKENS = {"vocab_size": 50368, "pad_token_id": 50283, "cls_token_id": 50281, "sep_token_id": 50282}
DEFAULT_RESERVE = "4GB"  # --reserve: left aside from a GPU's memory for the CUDA context and allocator slack
MEAN_TOKENS = 127.0  # --mean-tokens: real tokens a caption in BIOMEDICA (unpadded presets)
# The planner's error, as a fraction of the plan: on CPU it predicts 1.05-1.13x the measured peaks
# (benchmarks/results/plan_cpu.md) and tests/test_plan.py holds that committed validation to +-20%. The
# preflight warns about a plan over the budget by no more than this, and refuses one over by more.
PLANNER_ERROR = 0.20
RECIPES = Path(__file__).resolve().parent.parent / "ds_configs"  # paper_*.json (a checkout has them, a wheel not)


@dataclass
class Probe:
    """Bytes autograd saves for the backward, per image and per caption of ``a + b·tokens``."""
    image_bytes: float
    text_bytes_per_caption: float  # a
    text_bytes_per_token: float  # b
    largest_block_bytes_per_pair: float  # one block's saved bytes (ViT + text, at the planned tokens)
    params: int
    largest_layer_params: int


@dataclass
class Plan:
    preset: str
    zero_stage: int
    dtype: str
    gpus: int
    micro_batch: int
    tokens_per_caption: float
    model_states_bytes: float
    activation_bytes: float
    loss_bytes: float
    total_bytes: float
    states_source: str

    def table(self) -> str:
        rows = [("model states", self.model_states_bytes, self.states_source),
                ("activations", self.activation_bytes, f"micro batch {self.micro_batch}, "
                                                       f"{self.tokens_per_caption:.0f} tokens a caption"),
                ("fused loss", self.loss_bytes, f"{self.micro_batch * self.gpus} gathered pairs"),
                ("total", self.total_bytes, "")]
        return "\n".join(f"  {name:<14} {value / GiB:8.2f} GiB  {note}" for name, value, note in rows)


def probe(model_cfg, dtype: torch.dtype, tokens: float, device: str = "cpu",
          unchecked: Probe | None = None) -> Probe:
    """Run one image and two captions through the real towers (uninitialised weights) and count saved bytes.

    With activation checkpointing on, one block's saved bytes come from the same probe without it: ``unchecked``
    when the caller has it (same dtype and tokens), else probed here (the model is built twice)."""
    from bmc_fast.model.clip import BMCLongCLIP

    with torch.device("meta"):  # only the sizes of what autograd saves matter, never the values: no init
        model = BMCLongCLIP(model_cfg)
    model = model.to_empty(device=device).to(dtype=dtype).train()  # ViT-L/14: ~2 s instead of ~50 s of init
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    size = model_cfg.vision.image_size
    image = _saved_bytes(lambda: model.encode_image(torch.randn(1, 3, size, size, device=device, dtype=dtype)), model)
    short, long_ = 32, min(model_cfg.context_length, 256)
    text = [_saved_bytes(lambda n=n: model.encode_text(*_caption(n, model_cfg, device)), model) for n in (short, long_)]
    per_token = (text[1] - text[0]) / (long_ - short)
    per_caption = text[0] - per_token * short
    blocks = model_cfg.vision.layers + model_cfg.text.num_hidden_layers
    plain = image + per_caption + per_token * tokens
    if model_cfg.vision.grad_checkpointing:  # a checkpointed block is recomputed, whole, during the backward
        if unchecked is None:
            unchecked = probe(with_checkpointing(model_cfg, False), dtype, tokens, device)
        block = unchecked.largest_block_bytes_per_pair  # the same sum over blocks, probed without checkpointing
        # torch's non-reentrant checkpoint keeps each block's input by reference, not as a saved tensor
        esize = torch.empty((), dtype=dtype).element_size()
        image += model_cfg.vision.layers * (model_cfg.vision.grid_size ** 2 + 1) * model_cfg.vision.width * esize
        per_token += model_cfg.text.num_hidden_layers * model_cfg.text.hidden_size * esize
    else:
        block = plain / blocks
    return Probe(image, per_caption, per_token, block, params, largest)


def with_checkpointing(model_cfg: ModelConfig, on: bool) -> ModelConfig:
    """``model_cfg`` with activation checkpointing on or off in both towers (``--grad-checkpointing``)."""
    vision = dataclasses.replace(model_cfg.vision, grad_checkpointing=on)
    text = dataclasses.replace(model_cfg.text, grad_checkpointing=on)
    return dataclasses.replace(model_cfg, vision=vision, text=text)


def _saved_bytes(forward, model) -> float:
    """Bytes of the distinct tensors autograd keeps from ``forward()`` for the backward, the model's own
    parameters left out (a linear layer saves its weight: model states, counted apart)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return float(sum(seen.values()))


def _caption(n: int, model_cfg, device):
    """One caption of ``n`` real tokens, padded to the context (the unpadded path packs the real ones)."""
    context = model_cfg.context_length
    ids = torch.full((1, context), model_cfg.text.pad_token_id, device=device)
    ids[0, :n] = torch.randint(3, model_cfg.text.vocab_size, (n,), device=device)
    mask = torch.zeros(1, context, dtype=torch.long, device=device)
    mask[0, :n] = 1
    return ids, mask


def model_states_bytes(params: int, largest_layer: int, stage: int, gpus: int, gpus_per_node: int,
                       half: bool, offload: bool) -> tuple[float, str]:
    """(bytes per GPU, where the number comes from)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    nodes = max(1, gpus // gpus_per_node)
    if not half:
        return 4 * params + 16 * params / gpus, "fp32: 4 + 16/N bytes a parameter (DeepSpeed's are 16-bit)"
    if stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, gpus_per_node, nodes,
                                                          cpu_offload=offload, cpu_offload_params=offload)
        return float(gpu), "DeepSpeed estimate_zero3_model_states_mem_needs"
    _, gpu = estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=offload)
    if stage == 1:  # ZeRO-1 keeps every 16-bit gradient: the ZeRO-2 terms with 2 bytes unpartitioned
        return float(gpu) + 2 * params * (1 - 1 / gpus), "DeepSpeed's ZeRO-2 estimate + 16-bit gradients"
    return float(gpu), "DeepSpeed estimate_zero2_model_states_mem_needs"


def loss_bytes(micro: int, gpus: int, embed_dim: int, feature_bytes: int) -> float:
    """The fused loss on one rank: both sides' gathered features (and their fp32 gradients), the Triton
    softmax forward's 12·n_a + 20·G·N bytes of row statistics and partial columns."""
    n_a, n = micro, micro * gpus
    groups = min(math.ceil(n_a / 64), 256)
    return 2 * n * embed_dim * (feature_bytes + 4) + 12 * n_a + 20 * groups * n


def plan(model_cfg, probe_result: Probe, micro: int, gpus: int, gpus_per_node: int, stage: int, dtype: torch.dtype,
         offload: bool, tokens: float, preset: str) -> Plan:
    half = dtype in (torch.bfloat16, torch.float16)
    states, source = model_states_bytes(probe_result.params, probe_result.largest_layer_params, stage, gpus,
                                        gpus_per_node, half, offload)
    p = probe_result
    per_pair = p.image_bytes + p.text_bytes_per_caption + p.text_bytes_per_token * tokens
    activations = micro * (per_pair + 2 * p.largest_block_bytes_per_pair)
    loss = loss_bytes(micro, gpus, model_cfg.embed_dim, 2 if half else 4)
    return Plan(preset, stage, str(dtype).removeprefix("torch."), gpus, micro, tokens, states, activations, loss,
                states + activations + loss, source)


def largest_micro_batch(model_cfg, probe_result: Probe, budget: float, **kwargs) -> int:
    """The largest micro batch whose plan fits in ``budget`` bytes (0 when not even one pair does)."""
    fits = 0
    step = 1
    while plan(model_cfg, probe_result, fits + step, **kwargs).total_bytes <= budget:  # gallop, then bisect
        fits += step
        step *= 2
    while step > 1:
        step //= 2
        if plan(model_cfg, probe_result, fits + step, **kwargs).total_bytes <= budget:
            fits += step
    return fits


def parse_bytes(text: str, flag: str) -> float:
    match = re.fullmatch(r"\s*([0-9.]+)\s*(GB|GiB|MB|MiB)\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"{flag} {text!r}: write a size such as 80GB or 141GiB")
    scale = {"gb": 1e9, "gib": GiB, "mb": 1e6, "mib": 1024 ** 2}[match.group(2).lower()]
    return float(match.group(1)) * scale


def planned_tokens(model_cfg: ModelConfig, mean_tokens: float) -> float:
    """Tokens a caption costs: ``mean_tokens`` when the text tower packs real tokens, else the whole context."""
    return mean_tokens if model_cfg.text_unpad else float(model_cfg.context_length)


def plan_arguments(settings: DeepSpeedSettings, gpus: int, gpus_per_node: int, tokens: float,
                   preset: str) -> dict[str, Any]:
    """The keyword arguments of ``plan`` and ``largest_micro_batch`` (all but the micro batch) for a run."""
    return dict(gpus=gpus, gpus_per_node=min(gpus_per_node, gpus), stage=settings.stage, dtype=settings.dtype,
                offload=settings.offload, tokens=tokens, preset=preset)


@dataclass
class Verdict:
    """The preflight's outcome for a run that may launch (a refusal raises ``ConfigError`` instead)."""
    outcome: str  # "pass": the plan fits the budget; "warn": over it by no more than PLANNER_ERROR
    plan: Plan  # the run's micro batch, planned
    device_bytes: float  # one GPU's memory
    budget_bytes: float  # device_bytes less the reserve
    largest_micro_batch: int  # the largest that fits the budget with the run's settings (0: not one pair)
    probe_seconds: float  # building the towers on CPU and counting their saved bytes
    message: str


def preflight(model_cfg: ModelConfig, ds_config: dict[str, Any], gpus: int, device_memory_bytes: float, *,
              gpus_per_node: int = 8, reserve_bytes: float | None = None, mean_tokens: float = MEAN_TOKENS,
              preset: str = "the model", source: str = "--ds_config", announce: bool = True) -> Verdict:
    """Will the run's micro batch fit one GPU of ``device_memory_bytes``? The plan of ``python -m bmc_fast.plan``
    (probe on CPU, model states, activations, fused loss) against the device less ``reserve_bytes`` (default
    the planner's ``--reserve``). Returns a pass or warn ``Verdict``, logged when ``announce`` (the trainer:
    rank 0); raises ``ConfigError`` when the plan is over the budget by more than ``PLANNER_ERROR``, naming
    planned vs device GiB and a fix the planner says fits. ``model_cfg`` carries the run's tokenizer vocabulary
    (else ModernBERT's) and its activation checkpointing; ``source`` names the JSON in messages."""
    reserve = parse_bytes(DEFAULT_RESERVE, "--reserve") if reserve_bytes is None else reserve_bytes
    if model_cfg.text.vocab_size is None:
        model_cfg = dataclasses.replace(model_cfg, text=dataclasses.replace(model_cfg.text, **MODERNBERT_TOKENS))
    # The probe runs the torch layers on the CPU, as python -m bmc_fast.plan does (TE and flash-attn are CUDA
    # only): for --te-precision fp8 the plan is an upper bound.
    model_cfg = dataclasses.replace(model_cfg, te_precision="none", attn_backend="auto")
    settings = deepspeed_settings(ds_config, gpus)
    if settings.micro_batch is None:
        raise ConfigError(f"{source}: set train_batch_size or train_micro_batch_size_per_gpu in the DeepSpeed JSON")
    common = plan_arguments(settings, gpus, gpus_per_node, planned_tokens(model_cfg, mean_tokens), preset)
    budget = device_memory_bytes - reserve
    start = time.perf_counter()
    measured = probe(model_cfg, settings.dtype, common["tokens"])
    seconds = time.perf_counter() - start
    chosen = plan(model_cfg, measured, settings.micro_batch, **common)
    head = f"{source}: {_describe(chosen, model_cfg, device_memory_bytes, reserve)}"
    if chosen.total_bytes > budget * (1 + PLANNER_ERROR):
        _logger.info("memory preflight: the probe took %.1f s; finding a fix", seconds)
        over = f"{chosen.total_bytes / budget - 1:.0%} over" if budget > 0 else "nothing left"
        raise ConfigError(f"{head} ({over}, beyond the planner's {PLANNER_ERROR:.0%} error); "
                          + _fixes(model_cfg, measured, settings, common, budget))
    fits = largest_micro_batch(model_cfg, measured, budget, **common)
    if chosen.total_bytes <= budget:
        verdict = Verdict("pass", chosen, device_memory_bytes, budget, fits, seconds,
                          f"{head}; largest micro batch that fits: {fits}")
    else:
        verdict = Verdict("warn", chosen, device_memory_bytes, budget, fits, seconds, (
            f"{head}, {chosen.total_bytes / budget - 1:.0%} over but within the planner's {PLANNER_ERROR:.0%} "
            f"error: launching; if it runs out of memory, "
            f"{'' if model_cfg.vision.grad_checkpointing else 'pass --grad-checkpointing or '}take a micro batch "
            f"of at most {fits} (python -m bmc_fast.plan shows what fits)"))
    if announce:
        _logger.log(logging.INFO if verdict.outcome == "pass" else logging.WARNING,
                    "memory preflight (%s; probe %.1f s): %s", verdict.outcome, seconds, verdict.message)
    return verdict


def _describe(chosen: Plan, model_cfg: ModelConfig, device_bytes: float, reserve: float) -> str:
    """The plan against the device, in GiB, for the preflight's messages."""
    budget = max(device_bytes - reserve, 0)
    return (f"the memory planner puts {chosen.preset} at {_gib(chosen.total_bytes)} GiB a GPU (micro batch "
            f"{chosen.micro_batch}, ZeRO-{chosen.zero_stage}, {chosen.dtype}, activation checkpointing "
            f"{'on' if model_cfg.vision.grad_checkpointing else 'off'}) against {_gib(budget)} GiB: a "
            f"{_gib(device_bytes)} GiB GPU less {_gib(reserve)} GiB reserved")


def _gib(size: float) -> str:
    """Bytes as GiB, with two decimals under 10 GiB (a small preset's plan) and one above."""
    return f"{size / GiB:.{2 if size < 10 * GiB else 1}f}"


def _fixes(model_cfg: ModelConfig, measured: Probe, settings: DeepSpeedSettings, common: dict[str, Any],
           budget: float) -> str:
    """The refusal's fix: what the planner says fits ``budget`` with the same pairs a step. Without activation
    checkpointing, first the run with it (one more probe, reusing ``measured`` for its block estimate)."""
    pairs = settings.micro_batch * settings.accumulation  # a GPU's pairs a step, kept by every fix
    checkpointing = model_cfg.vision.grad_checkpointing
    options = []
    if not checkpointing:
        checked_cfg = with_checkpointing(model_cfg, True)
        checked = probe(checked_cfg, settings.dtype, common["tokens"], unchecked=measured)
        same = plan(checked_cfg, checked, settings.micro_batch, **common).total_bytes
        if same <= budget:
            options.append(f"pass --grad-checkpointing (planned {_gib(same)} GiB)")
        else:
            options += _accumulation_fix(checked_cfg, checked, settings, common, budget, pairs,
                                         "pass --grad-checkpointing and ")
    options += _accumulation_fix(model_cfg, measured, settings, common, budget, pairs,
                                 "without activation checkpointing, " if options else "")
    return "; or ".join(options) or (
        f"not even 1 pair a GPU fits{'' if checkpointing else ', even with --grad-checkpointing'}: shard the model "
        "states further (ZeRO-3, offload_optimizer) or use more or larger GPUs")


def _accumulation_fix(model_cfg: ModelConfig, measured: Probe, settings: DeepSpeedSettings, common: dict[str, Any],
                      budget: float, pairs: int, prefix: str) -> list[str]:
    """``[fix]``: the largest micro batch that fits and divides ``pairs``, with the contrastive accumulation K
    that keeps micro x K = ``pairs`` (train_batch_size unchanged), and the shipped recipe that runs it; ``[]``
    when not one pair fits."""
    fits = largest_micro_batch(model_cfg, measured, budget, **common)
    if fits < 1:
        return []
    k = next(k for k in range(math.ceil(pairs / fits), pairs + 1) if pairs % k == 0)
    micro, gpus = pairs // k, common["gpus"]
    planned = plan(model_cfg, measured, micro, **common).total_bytes
    recipe = _recipe(dataclasses.replace(settings, micro_batch=micro, accumulation=k), gpus)
    return [f'{prefix}set "train_micro_batch_size_per_gpu": {micro} and "gradient_accumulation_steps": {k} '
            f"(planned {_gib(planned)} GiB; contrastive accumulation keeps train_batch_size {micro * k * gpus} "
            f"= {micro} x {k} x {gpus} GPUs in one loss)" + (f", as ds_configs/{recipe} does" if recipe else "")]


def _recipe(wanted: DeepSpeedSettings, gpus: int) -> str | None:
    """The name of the shipped ``ds_configs/paper_*.json`` that runs ``wanted`` (batch sizes, ZeRO stage, dtype,
    offload) on ``gpus`` GPUs, or None."""
    for path in sorted(RECIPES.glob("paper_*.json")):
        recipe = deepspeed_settings(load_ds_config(path), gpus)
        same = (recipe.micro_batch, recipe.accumulation, recipe.stage, recipe.dtype, recipe.offload) == (
            wanted.micro_batch, wanted.accumulation, wanted.stage, wanted.dtype, wanted.offload)
        if same and recipe.global_batch == wanted.micro_batch * wanted.accumulation * gpus:  # world size: gpus
            return path.name
    return None


def main(argv: list[str] | None = None) -> dict:
    from bmc_fast.cli import ArgumentParser, positive_int

    parser = ArgumentParser(prog="python -m bmc_fast.plan", description="Per-GPU memory of a contrastive batch.")
    parser.add_argument("--preset", default="bmc-longclip-l14-512")
    parser.add_argument("--ds_config", "--ds-config", dest="ds_config", required=True)
    parser.add_argument("--gpus", type=positive_int, required=True, help="GPUs in the run (all nodes)")
    parser.add_argument("--gpus-per-node", type=positive_int, default=8)
    parser.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB, 141GB")
    parser.add_argument("--reserve", default=DEFAULT_RESERVE,
                        help="left aside for the CUDA context and allocator slack")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--te-precision", default=None, choices=("none", "bf16", "fp8"),
                        help="noted in the plan: the probe runs the torch layers (TE is CUDA only); "
                        "an upper bound for fp8")
    parser.add_argument("--mean-tokens", type=float, default=MEAN_TOKENS,
                        help="real tokens a caption (BIOMEDICA: ~127); padded presets use the context")
    parser.add_argument("--global-batch", type=positive_int, default=None, help="pairs a contrastive loss should span")
    parser.add_argument("--micro-batch", type=positive_int, default=None, help="plan this micro batch instead")
    parser.add_argument("--json", default=None, help="also write the plan here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    checkpointing = {"grad_checkpointing": True} if args.grad_checkpointing else {}
    model_cfg = load_model_config(args.preset, vision=checkpointing, text={**MODERNBERT_TOKENS, **checkpointing})
    settings = deepspeed_settings(load_ds_config(args.ds_config), args.gpus)
    tokens = planned_tokens(model_cfg, args.mean_tokens)
    budget = parse_bytes(args.gpu_memory, "--gpu-memory") - parse_bytes(args.reserve, "--reserve")
    measured = probe(model_cfg, settings.dtype, tokens)
    common = plan_arguments(settings, args.gpus, args.gpus_per_node, tokens, args.preset)
    fits = largest_micro_batch(model_cfg, measured, budget, **common)
    micro = args.micro_batch or settings.micro_batch or max(fits, 1)
    chosen = plan(model_cfg, measured, micro, **common)
    out = {"plan": asdict(chosen), "probe": asdict(measured), "largest_micro_batch": fits, "budget_bytes": budget,
           "grad_checkpointing": args.grad_checkpointing, "te_precision": args.te_precision}
    lines = [f"{args.preset}, ZeRO-{settings.stage}, {chosen.dtype}, {args.gpus} GPU(s) of {args.gpu_memory} "
             f"({args.reserve} reserved), activation checkpointing {'on' if args.grad_checkpointing else 'off'}:",
             chosen.table(),
             f"  fits: {'yes' if chosen.total_bytes <= budget else 'NO'}; largest micro batch that fits: {fits}"]
    if args.te_precision in ("bf16", "fp8"):
        lines.append(f"  --te-precision {args.te_precision}: activations are the torch layers' (the probe runs on CPU, "
                     "without Transformer Engine)" + ("; FP8 layers can save 1-byte inputs where these count 2, so "
                                                      "this is an upper bound, not an FP8 measurement"
                                                      if args.te_precision == "fp8" else ""))
    if args.global_batch:
        if fits == 0:
            lines.append(f"  --global-batch {args.global_batch}: not even one pair a GPU fits")
        else:
            k = math.ceil(args.global_batch / (fits * args.gpus))
            micro_k = math.ceil(args.global_batch / (k * args.gpus))
            out["accumulation"] = {"k": k, "micro_batch": micro_k, "global_batch": k * micro_k * args.gpus}
            lines.append(f"  --global-batch {args.global_batch}: micro batch {micro_k} x contrastive accumulation "
                         f"{k} x {args.gpus} GPUs = {k * micro_k * args.gpus} pairs a loss")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    from bmc_fast.cli import run_main

    run_main(main)
