"""Contrastive training of BMC-LongCLIP on a DeepSpeed engine (the library half of ``train.py``).

``prepare`` checks every input (flags, shards, tokenizer, DeepSpeed JSON against the world size)
before anything is built; ``run`` then builds the model and engine, trains for ``max_steps``
optimizer steps, evaluates retrieval every ``eval_every`` steps and at the end, and saves DeepSpeed
checkpoints. Rank 0 writes the run directory:

    config.json        resolved train / model / DeepSpeed config, world size, library versions
    tokenizer/         the tokenizer the run used
    metrics.jsonl      one JSON line per log step and per evaluation
    tensorboard/       the same scalars for TensorBoard
    checkpoints/       DeepSpeed checkpoints (``latest`` names the newest tag)
    summary.json       final loss, throughput and retrieval metrics
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bmc_fast.config import ConfigError, ModelConfig, load_model_config
from bmc_fast.data.loaders import LOADERS, resolve_loader
from bmc_fast.data.shards import REMOTE_PREFIXES, count_samples, expand_shards
from bmc_fast.ds_config import BatchPlan, batch_plan, load_ds_config, with_total_steps

_logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    ds_config: str  # DeepSpeed JSON: batch size, optimizer, LR schedule, precision, ZeRO stage
    preset: str = "tiny"  # model preset name (bmc_fast/model_configs) or JSON path
    train_data: str | None = None  # WebDataset shards; with eval_data unset too: the embedded synthetic data
    eval_data: str | None = None  # WebDataset shards for retrieval evaluation (>= 2 pairs)
    tokenizer: str | None = None  # Hugging Face tokenizer directory (required with train_data)
    context_length: int | None = None  # text tokens kept per caption; None: the preset's
    max_steps: int | None = None  # optimizer steps; None: the DeepSpeed scheduler's total_num_steps
    eval_every: int = 100  # retrieval evaluation every K steps, and always at the end (0: only at the end)
    save_every: int = 500  # DeepSpeed checkpoint every K steps, and always at the end (0: only at the end)
    log_every: int = 10  # steps between metric lines
    output_dir: str | None = None  # run directory; default runs/<preset>-ctx<context>-seed<seed>
    overwrite: bool = False  # replace an existing run directory
    resume: bool = False  # continue the run in output_dir from its latest checkpoint
    seed: int = 0  # model init and data order; also picks the embedded dataset
    workers: int = 1  # PIL loader: DataLoader worker processes per rank; DALI loader: its threads per rank
    loader: str = "auto"  # "dali" (decode + augment in DALI), "pil" (webdataset + PIL), "auto": dali when installed
    loss_backend: str = "auto"  # fused contrastive loss: "auto" (Triton on CUDA, torch on CPU), "triton", "torch"
    image_weights: str | None = None  # open_clip (visual.*) or timm ViT checkpoint file for the image tower
    text_weights: str | None = None  # Hugging Face ModernBERT directory (config.json + safetensors)
    image_proj: str | None = None  # with image_weights: "pretrained" projection or a fresh "linear" one
    attn_backend: str | None = None  # None: the preset's ("auto")
    te_precision: str | None = None  # Transformer Engine: "none", "bf16", "fp8"; None: the preset's
    text_unpad: bool | None = None  # None: the preset's (unpadded)
    grad_checkpointing: bool = False  # activation checkpointing in both towers

    def __post_init__(self) -> None:
        for name in ("max_steps", "context_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("eval_every", "save_every", "workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.loss_backend not in ("auto", "triton", "torch"):
            raise ConfigError(f"--loss-backend must be auto, triton or torch, got {self.loss_backend!r}")
        if self.loader not in LOADERS:
            raise ConfigError(f"--loader must be one of {LOADERS}, got {self.loader!r}")
        if self.log_every < 1:
            raise ConfigError(f"--log-every must be >= 1, got {self.log_every}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: pass one")
        if self.train_data is None and self.eval_data is not None:
            raise ConfigError("--eval-data was given without --train-data: pass both, or neither for the "
                              "embedded synthetic data")
        if self.train_data is not None and self.tokenizer is None:
            raise ConfigError("--train-data needs --tokenizer DIR (a Hugging Face tokenizer directory, e.g. "
                              "../shared/data/tokenizers/modernbert)")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_size: int

    @classmethod
    def from_environ(cls) -> "DistEnv":
        """Read the launcher's variables; a lone ``python train.py`` becomes a 1-rank world on loopback."""
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
        world = int(os.environ["WORLD_SIZE"])
        local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
        return cls(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), world, local_size)


@dataclass
class Prepared:
    """Everything ``prepare`` checked and resolved; nothing here has touched a model yet."""

    cfg: TrainConfig
    env: DistEnv
    run_dir: Path
    ds_config: dict[str, Any]
    plan: BatchPlan
    max_steps: int
    train_urls: list[str]
    eval_urls: list[str]
    tokenizer: Any
    model_cfg: ModelConfig


def prepare(cfg: TrainConfig, env: DistEnv) -> Prepared:
    """Check every input and resolve defaults; raises ``ConfigError`` naming the flag at the first problem."""
    from bmc_fast.data.text_tokenizer import load_tokenizer

    ds_config, max_steps = with_total_steps(load_ds_config(cfg.ds_config), cfg.max_steps)
    plan = batch_plan(ds_config, env.world_size, source=f"--ds_config {cfg.ds_config}")
    if cfg.image_weights is not None and not Path(cfg.image_weights).is_file():
        raise ConfigError(f"--image-weights {cfg.image_weights!r} is not a file: pass a local open_clip or timm "
                          "checkpoint (.pt/.bin/.safetensors)")
    if cfg.text_weights is not None and not (Path(cfg.text_weights) / "config.json").is_file():
        raise ConfigError(f"--text-weights {cfg.text_weights!r} has no config.json: pass a directory written by "
                          "save_pretrained")
    checkpointing = {"grad_checkpointing": True} if cfg.grad_checkpointing else None
    model_cfg = load_model_config(  # validates the preset and the overrides early
        cfg.preset, context_length=cfg.context_length, text_unpad=cfg.text_unpad, attn_backend=cfg.attn_backend,
        te_precision=cfg.te_precision, image_proj=cfg.image_proj, vision=checkpointing, text=checkpointing)

    if cfg.train_data is None:
        from bmc_fast.data.default_data import ensure_default_data

        default = ensure_default_data(seed=cfg.seed)
        cfg = dataclasses.replace(cfg, train_data=default.train, eval_data=default.eval,
                                  tokenizer=cfg.tokenizer or default.tokenizer)
        _logger.info("no --train-data: using the embedded synthetic dataset %s", Path(default.train).parent.parent)
    train_urls = expand_shards(cfg.train_data, "--train-data")
    eval_urls, n_eval = [], 0
    if cfg.eval_data is not None:
        eval_urls = expand_shards(cfg.eval_data, "--eval-data")
        n_eval = sum(count_samples(url, "--eval-data") for url in eval_urls)
        if n_eval < 2:
            raise ConfigError(f"--eval-data {cfg.eval_data!r} holds {n_eval} pair(s); retrieval needs at least 2: "
                              "point it at a larger evaluation split")
    tokenizer = load_tokenizer(cfg.tokenizer)
    model_cfg = model_cfg.with_tokenizer(tokenizer)
    cfg = dataclasses.replace(cfg, loader=resolve_loader(cfg.loader, train_urls + eval_urls))

    run_dir = Path(cfg.output_dir or f"runs/{Path(cfg.preset).stem}-ctx{model_cfg.context_length}-seed{cfg.seed}")
    if cfg.resume:
        _check_resumable(run_dir, model_cfg, ds_config, plan, max_steps)
    elif (run_dir / "config.json").exists() and not cfg.overwrite:
        raise ConfigError(f"--output-dir {str(run_dir)!r} already holds a run: choose another directory, pass "
                          "--resume to continue it or --overwrite to replace it")
    elif run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / "config.json").exists():
        raise ConfigError(f"--output-dir {str(run_dir)!r} holds files but no run (no config.json), and "
                          "--overwrite only replaces runs: choose a new or empty directory")
    cfg = dataclasses.replace(cfg, output_dir=str(run_dir), max_steps=max_steps,
                              context_length=model_cfg.context_length)
    return Prepared(cfg, env, run_dir, ds_config, plan, max_steps, train_urls, eval_urls, tokenizer,
                    model_cfg)


def run(prepared: Prepared) -> dict[str, Any]:
    """Train; returns the summary (also written to ``summary.json`` on rank 0)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from tqdm import tqdm

    from bmc_fast.flops import peak_flops, train_step_flops
    from bmc_fast.kernels import FusedClipLoss
    from bmc_fast.model import BMCLongCLIP, param_groups
    from bmc_fast.run_logging import MetricsWriter, ThroughputWindow

    p, cfg, env = prepared, prepared.cfg, prepared.env
    accelerator = get_accelerator()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    device = _configure_device(accelerator, env)
    _start_run_dir(p)

    torch.manual_seed(cfg.seed)
    model = BMCLongCLIP(p.model_cfg, image_weights=cfg.image_weights, text_weights=cfg.text_weights)
    n_params = sum(t.numel() for t in model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=p.ds_config)
    first_step = 1
    if cfg.resume:
        load_path, client_state = engine.load_checkpoint(str(p.run_dir / "checkpoints"))  # the `latest` tag
        first_step = client_state["step"] + 1
        _logger.info("resumed from %s at step %d", Path(load_path).parent.name, first_step - 1)
    # A resumed run must not replay the batches and augmentations of steps 1, 2, ...: its loaders and
    # RNG start from a seed that moves with the step (the exact stream position is not restored).
    data_seed = cfg.seed + first_step - 1
    torch.manual_seed(data_seed)
    if cfg.resume:
        _logger.info("resumed run: data reshuffled with seed %d (--seed %d + %d steps done)", data_seed, cfg.seed,
                     first_step - 1)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
    _logger.info("model %s: %.2fM parameters; ZeRO stage %d, %s, %d rank(s) on %s over %s; batch %d = %d micro × %d "
                 "accum × %d ranks; %d steps", cfg.preset, n_params / 1e6, engine.zero_optimization_stage(), dtype,
                 env.world_size, device, accelerator.communication_backend_name(), p.plan.global_batch,
                 p.plan.micro_batch, p.plan.accumulation, env.world_size, p.max_steps)

    if p.plan.accumulation > 1:
        _logger.warning("gradient accumulation %d: each loss contrasts %d pairs (micro batch %d × %d ranks), not "
                        "the global batch of %d", p.plan.accumulation, p.plan.micro_batch * env.world_size,
                        p.plan.micro_batch, env.world_size, p.plan.global_batch)
    # open_clip's scalable setting: each rank's rows against every rank's negatives, fused (no b×N logits).
    loss_fn = FusedClipLoss(local_loss=True, gather_with_grad=True, rank=env.rank, world_size=env.world_size,
                            backend=cfg.loss_backend)
    if env.rank == 0:
        _log_token_waste(p)
    train_loader, eval_loader = _make_loaders(p, device, half=dtype == torch.float16, seed=data_seed)
    skipped = Counter()

    writer = MetricsWriter(p.run_dir, enabled=env.rank == 0)
    window = ThroughputWindow(device, p.plan.global_batch, flops_fn=partial(train_step_flops, p.model_cfg),
                              peak_flops=peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda"
                              else None)
    batches = iter(train_loader)
    run_start, last_train, last_eval, n_eval = time.perf_counter(), {}, {}, 0
    progress = tqdm(total=p.max_steps, initial=first_step - 1, desc="train", disable=env.rank != 0,
                    dynamic_ncols=True)
    for step in range(first_step, p.max_steps + 1):
        lr = engine.get_lr()[0]  # this step's rate: the scheduler moves on inside the boundary engine.step()
        for _ in range(p.plan.accumulation):
            batch = next(batches)
            skipped.update(batch["skipped"])
            image, text, scale = engine(batch["pixels"].to(device, dtype), batch["input_ids"].to(device),
                                        batch["attention_mask"].to(device))
            loss = loss_fn(image, text, scale)
            engine.backward(loss)
            engine.step()
            window.add_micro_batch(loss, batch["attention_mask"])
        window.end_step()
        progress.update(1)
        if step % cfg.log_every == 0 or step == p.max_steps:
            last_train = {**window.read(), "lr": lr, "logit_scale": scale.item()}
            if cfg.loader == "pil":  # DALI never meets a bad sample: its skips are the index scan's, in the summary
                last_train["skipped_samples"] = sum(skipped.values())  # this rank's, read so far
            writer.write(step, last_train)
            progress.set_postfix(loss=f"{last_train['loss']:.3f}", scale=f"{last_train['logit_scale']:.1f}")
        if eval_loader is not None and (step == p.max_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            last_eval, n_eval = _evaluate(engine.module, eval_loader, device, dtype)
            writer.write(step, last_eval, prefix="eval")
            _logger.info("step %d eval: T2I R@1 %.1f  I2T R@1 %.1f (N=%d)", step, last_eval["t2i_r1"],
                         last_eval["i2t_r1"], n_eval)
            window.restart_clock()  # keep evaluation out of the throughput
        if step == p.max_steps or (cfg.save_every and step % cfg.save_every == 0):
            engine.save_checkpoint(str(p.run_dir / "checkpoints"), tag=checkpoint_tag(step), client_state={"step": step})
    progress.close()
    writer.close()

    skips = _total_skips(skipped, cfg.loader, p.train_urls, device)
    summary = {"steps": p.max_steps, "seconds": time.perf_counter() - run_start, "train": last_train,
               "eval": last_eval, "n_eval": n_eval, "world_size": env.world_size, "loader": cfg.loader,
               "skipped": skips}
    if env.rank == 0:
        _logger.info("skipped samples (%s loader, all ranks): %s", cfg.loader, skips or "none")
        (p.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        _logger.info("done: %s", p.run_dir)
    torch.distributed.barrier()
    if device.type == "cpu":
        _release_shm_buffer(env)
    return summary


def _release_shm_buffer(env: DistEnv) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment, which DeepSpeed leaves in /dev/shm (~66 MiB a rank,
    a run). After the last barrier no rank opens it again; mappings outlive the name."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{env.rank}")  # deepspeed/ops/csrc/cpu/comm/shm.cpp
    segment = Path("/dev/shm") / name
    if segment.exists():
        segment.unlink()
        _logger.debug("removed %s", segment)


def _make_loaders(p: Prepared, device: torch.device, half: bool, seed: int):
    """(train loader, eval loader or None) of the kind ``--loader`` chose; eval batches reach every rank whole."""
    from bmc_fast.data.loaders import build_loader

    cfg, env = p.cfg, p.env
    common = dict(kind=cfg.loader, tokenizer=p.tokenizer, context_length=p.model_cfg.context_length,
                  image_size=p.model_cfg.vision.image_size, batch_size=p.plan.micro_batch, workers=cfg.workers,
                  device_id=None if device.type == "cpu" else env.local_rank, half=half)
    train = build_loader(p.train_urls, train=True, rank=env.rank, world_size=env.world_size, seed=seed, **common)
    evaluation = build_loader(p.eval_urls, train=False, **common) if p.eval_urls else None
    return train, evaluation


def _log_token_waste(p: Prepared) -> None:
    """Rank 0: how many caption tokens this run's context length throws away (first 2,000 captions)."""
    from bmc_fast.data.token_stats import shard_waste

    if all(url.startswith(REMOTE_PREFIXES) for url in p.train_urls):
        _logger.info("caption tokens: not measured (remote shards; python -m bmc_fast.data.token_stats reads "
                     "local copies)")
        return
    context = p.model_cfg.context_length
    stats = shard_waste(p.train_urls, p.tokenizer, sorted({77, context}), max_texts=2000)  # local shards only
    waste = ", ".join(f"{row['waste_pct']:.1f}% of tokens beyond {row['cutoff']} ({row['truncated_pct']:.1f}% of "
                      "captions truncated)" for row in stats["cutoffs"])
    _logger.info("caption tokens: mean %.1f, median %.0f over %d captions; %s", stats["mean"], stats["median"],
                 stats["n_texts"], waste)


def _total_skips(skipped: Counter, loader: str, urls: list[str], device: torch.device) -> dict[str, int]:
    """Samples skipped by kind, summed over ranks (PIL: counted while reading; DALI: by the index scan)."""
    from bmc_fast.data.samples import SKIP_KINDS

    if loader == "dali":
        from bmc_fast.dali_pipelines import index_skips

        return index_skips(urls)
    counts = torch.tensor([skipped[kind] for kind in SKIP_KINDS], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(counts)  # on the training device: NCCL takes no CPU tensors
    return {kind: int(n) for kind, n in zip(SKIP_KINDS, counts.tolist()) if n}


# Model-config keys that change how the model runs, not its weights: a resumed run may switch them.
RUNTIME_SWITCHES = {"text_unpad", "attn_backend", "vision.grad_checkpointing", "text.grad_checkpointing"}


def checkpoint_tag(step: int) -> str:
    """The DeepSpeed checkpoint tag of ``step``: ``step0000006``."""
    return f"step{step:07d}"


def tag_step(tag: str) -> int | None:
    """The step of a ``checkpoint_tag``, or None for a tag this trainer did not write."""
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else None


def _check_resumable(run_dir: Path, model_cfg: ModelConfig, ds_config: dict[str, Any], plan: BatchPlan,
                     max_steps: int) -> None:
    """The checkpoint exists, holds the same weights layout and steps are left; a changed set-up is logged."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        raise ConfigError(f"--resume: {str(run_dir)!r} has no checkpoints/latest to resume from; drop --resume "
                          "to start a new run")
    tag = latest.read_text().strip()
    if (done := tag_step(tag)) is not None and done >= max_steps:
        raise ConfigError(f"--resume: the checkpoint {tag!r} is at step {done} and --max-steps is "
                          f"{max_steps}: nothing is left to train; raise --max-steps")
    saved = json.loads((run_dir / "config.json").read_text())
    differs = sorted(set(_differing_keys(saved.get("model", {}), model_cfg.to_dict())) - RUNTIME_SWITCHES)
    if differs:
        raise ConfigError(f"--resume: the run in {str(run_dir)!r} used a different model ({differs} differ); "
                          "resume with the same --preset, --context-length and --tokenizer")
    changed = _differing_keys(saved.get("deepspeed", {}), ds_config) + _differing_keys(
        saved.get("batch", {}), dataclasses.asdict(plan), prefix="batch.")
    if changed:
        _logger.warning("--resume: the training set-up differs from the saved run's config.json in %s; "
                        "continuing with the new values", changed)


def _differing_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _configure_device(accelerator, env: DistEnv) -> torch.device:
    device = torch.device(accelerator.device_name(env.local_rank))
    if device.type == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:  # ranks on one host share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_size))
        _logger.info("device cpu: %d thread(s) per rank", torch.get_num_threads())
    else:
        accelerator.set_device(env.local_rank)
        _logger.info("device %s", device)
    return device


def _start_run_dir(p: Prepared) -> None:
    """Rank 0 (re)creates the run directory and writes config.json and the tokenizer; all ranks wait."""
    if p.env.rank == 0:
        if p.cfg.overwrite and p.run_dir.exists():
            shutil.rmtree(p.run_dir)
        p.run_dir.mkdir(parents=True, exist_ok=True)
        p.tokenizer.save_pretrained(str(p.run_dir / "tokenizer"))
        name = "config.json"
        if p.cfg.resume:  # the original stays; each resume records its own resolved config beside it
            name = f"config.resume-{len(list(p.run_dir.glob('config.resume-*.json'))) + 1}.json"
        (p.run_dir / name).write_text(json.dumps(_resolved_config(p), indent=2))
    torch.distributed.barrier()


def _resolved_config(p: Prepared) -> dict[str, Any]:
    import deepspeed
    import transformers

    return {
        "train": dataclasses.asdict(p.cfg),
        "model": p.model_cfg.to_dict(),
        "deepspeed": p.ds_config,
        "batch": dataclasses.asdict(p.plan),
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "transformers": transformers.__version__},
    }


def _evaluate(model, loader, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, float], int]:
    """Retrieval metrics and the number of (good) pairs they cover."""
    from bmc_fast.eval_retrieval import extract_features, retrieval_recall

    image, text = extract_features(model, loader, device, dtype)
    return retrieval_recall(image, text), image.shape[0]


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
