"""Check every input of a run before anything is built: flags, shards, tokenizer, the DeepSpeed JSON
against the world size, the run directory and, on CUDA, the planned memory against the GPU's. The first
problem raises ``ConfigError`` naming the flag."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bmc_fast.checkpoint.run_dir import RunDir
from bmc_fast.cli import check_output_dir
from bmc_fast.data.mixture import Mixture, expected_shares, parse_weights
from bmc_fast.data.select_loader import resolve_loader
from bmc_fast.data.shards import REMOTE_PREFIXES, count_samples, expand_shards
from bmc_fast.ds_json import BatchPlan, batch_plan, load_ds_config
from bmc_fast.errors import ConfigError
from bmc_fast.model.config import ModelConfig, load_model_config
from bmc_fast.optional import transformer_engine_installed, triton_installed, wandb_installed
from bmc_fast.trainer.config import TrainConfig
from bmc_fast.trainer.distributed import DistEnv
from bmc_fast.trainer.ds_config import check_precision_supported, check_skips_non_finite_steps, with_total_steps
from bmc_fast.trainer.param_groups import check_schedule_takes_scales
from bmc_fast.trainer.resume import Resize, check_same_recipe, plan_resume
from bmc_fast.trainer.warm_start import check_architecture, source_config

# SigLIP's initial logit scale and bias (Zhai et al. 2023; open_clip's siglip model configs): t' = log 10, b = -10
SIGLIP_INIT_LOGIT_SCALE = math.log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0

_logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything ``prepare`` checked and resolved; nothing here has touched a model yet."""

    cfg: TrainConfig
    env: DistEnv
    run: RunDir
    ds_config: dict[str, Any]
    plan: BatchPlan
    max_steps: int
    train_urls: list[str]
    eval_urls: list[str]
    zeroshot: list  # bmc_fast.eval.labelled_images.LabelledImages of each --zeroshot-data, loaded and checked
    zeroshot_templates: tuple[str, ...]
    tokenizer: Any
    model_cfg: ModelConfig
    resize: Resize | None = None  # resumed on another number of ranks than the checkpoint's
    mixture: Mixture | None = None  # --train-data-weights: the weighted sources of train_urls


def _accelerator_dtypes() -> tuple[str, list[str]]:
    """DeepSpeed's accelerator: its device name and the dtypes it trains in, by the checks its engine makes."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = ["float32", *["float16"] * bool(accelerator.is_fp16_supported()),
                 *["bfloat16"] * bool(accelerator.is_bf16_supported())]
    return accelerator.device_name(), supported


def prepare(cfg: TrainConfig, env: DistEnv) -> Prepared:
    """Check every input and resolve defaults; raises ``ConfigError`` naming the flag at the first problem."""
    from bmc_fast.data.text_tokenizer import load_tokenizer

    if cfg.output_dir is not None:  # before any work: the default directory is checked once it is known
        check_output_dir(cfg.output_dir, "--output-dir", create=False)
    ds_config, max_steps = with_total_steps(load_ds_config(cfg.ds_config), cfg.max_steps)
    source = f"--ds_config {cfg.ds_config}"
    plan = None if cfg.resume else batch_plan(ds_config, env.world_size, source=source)  # resumed: the checkpoint's
    check_skips_non_finite_steps(ds_config)
    device, dtypes = _accelerator_dtypes()
    check_precision_supported(ds_config, device, dtypes)
    check_schedule_takes_scales(ds_config, cfg.lr_scales)
    cfg = _fetch_hub_ids(cfg)
    _check_weights(cfg)
    model_cfg = _model_config(cfg)
    _check_packages(cfg, model_cfg)

    if cfg.train_data is None:
        from bmc_fast.data.default_data import ensure_default_data

        default = ensure_default_data(seed=cfg.seed)
        cfg = dataclasses.replace(cfg, train_data=default.train, eval_data=default.eval,
                                  tokenizer=cfg.tokenizer or default.tokenizer)
        _logger.info("no --train-data: using the embedded synthetic dataset %s", Path(default.train).parent.parent)
    train_urls = expand_shards(cfg.train_data, "--train-data")
    mixture = _mixture(cfg.train_data, cfg.train_data_weights) if cfg.train_data_weights else None
    eval_urls = _eval_shards(cfg.eval_data)
    zeroshot, templates = _zeroshot_sets(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer, clean=model_cfg.text_clean, context_length=model_cfg.context_length)
    model_cfg = model_cfg.with_tokenizer(tokenizer)
    cfg = dataclasses.replace(cfg, loader=resolve_loader(cfg.loader, train_urls + eval_urls))

    run = RunDir(cfg.output_dir or f"runs/{Path(cfg.preset).stem}-ctx{model_cfg.context_length}-seed{cfg.seed}")
    if cfg.resume == "auto":
        cfg = _resolve_auto_resume(cfg, run)
    resize = None
    if cfg.resume:
        # a run's captions are cleaned as they were from its start (runs from before text_clean: not at all)
        clean = run.read_config()["model"].get("text_clean", "none") if run.is_run() else model_cfg.text_clean
        model_cfg, tokenizer.clean = dataclasses.replace(model_cfg, text_clean=clean), clean
        check_same_recipe(run, cfg)
        ds_config, plan, resize = plan_resume(run, model_cfg, ds_config, env.world_size, max_steps, cfg.accumulation)
    else:
        plan = plan or batch_plan(ds_config, env.world_size, source=source)
        _check_new_run_dir(run, cfg.overwrite)
        if cfg.pretrained is not None:
            check_architecture(cfg.pretrained, source_config(cfg.pretrained), model_cfg)
    _check_memory(cfg, env, device, model_cfg, ds_config)  # last: its probe takes seconds
    cfg = dataclasses.replace(cfg, output_dir=str(run.path), max_steps=max_steps,
                              context_length=model_cfg.context_length)
    return Prepared(cfg, env, run, ds_config, plan, max_steps, train_urls, eval_urls, zeroshot, templates, tokenizer,
                    model_cfg, resize, mixture)


def _model_config(cfg: TrainConfig) -> ModelConfig:
    """The preset with the flags' overrides, validated; ``--loss siglip`` adds SigLIP's logit bias and scale init
    (log 10, -10) to a preset without a bias of its own."""
    checkpointing = {"grad_checkpointing": True} if cfg.grad_checkpointing else {}
    drop_path = {"drop_path": cfg.drop_path} if cfg.drop_path is not None else {}
    model_cfg = load_model_config(
        cfg.preset, context_length=cfg.context_length, text_unpad=cfg.text_unpad, attn_backend=cfg.attn_backend,
        te_precision=cfg.te_precision, image_proj=cfg.image_proj, vision={**checkpointing, **drop_path} or None,
        text=checkpointing or None)
    if cfg.loss == "siglip" and model_cfg.init_logit_bias is None:
        model_cfg = dataclasses.replace(model_cfg, init_logit_scale=SIGLIP_INIT_LOGIT_SCALE,
                                        init_logit_bias=SIGLIP_INIT_LOGIT_BIAS)
    return model_cfg


def _mixture(pattern: str, weights: str) -> Mixture:
    """The weighted sources of ``--train-data`` (its ``::`` parts), their expected shares logged."""
    sources = [expand_shards(part, "--train-data") for part in pattern.split("::")]
    mixture = Mixture(tuple(map(tuple, sources)), parse_weights(weights, len(sources)))
    if not any(url.startswith(REMOTE_PREFIXES) for urls in sources for url in urls):
        samples = [sum(count_samples(url, "--train-data") for url in urls) for urls in sources]
        shares = expected_shares(mixture, samples)
        _logger.info("--train-data-weights %s: expected shares of the training samples %s", weights, ", ".join(
            f"{part!r} {100 * share:.1f}% ({n} samples × {factor:g})" for part, share, n, factor in
            zip(pattern.split("::"), shares, samples, mixture.factors)))
    return mixture


def _resolve_auto_resume(cfg: TrainConfig, run: RunDir) -> TrainConfig:
    """``--resume auto``: resume from ``latest`` when the run has one; otherwise start a new run, replacing a
    run that died before its first checkpoint (nothing of it could be resumed)."""
    if run.latest_tag() is not None:
        _logger.info("--resume auto: %s has checkpoint %s, resuming", run.path, run.latest_tag())
        return dataclasses.replace(cfg, resume="latest")
    if run.is_run():
        _logger.warning("--resume auto: %s holds a run without a checkpoint; starting it again", run.path)
        return dataclasses.replace(cfg, resume=None, overwrite=True)
    _logger.info("--resume auto: no checkpoint in %s, starting a new run", run.path)
    return dataclasses.replace(cfg, resume=None)


def _fetch_hub_ids(cfg: TrainConfig) -> TrainConfig:
    """``--image-weights``, ``--text-weights`` and ``--tokenizer`` given as Hub ids (``ORG/NAME[@REVISION]``), fetched
    into huggingface_hub's cache: the run records the cached paths, whose snapshot names the commit."""
    from bmc_fast.checkpoint.hub import resolve

    fetched = {name: resolve(getattr(cfg, name), kind, f"--{name.replace('_', '-')}")
               for name, kind in (("image_weights", "image"), ("text_weights", "text"), ("tokenizer", "tokenizer"),
                                  ("pretrained", "model"))
               if getattr(cfg, name) is not None}
    return dataclasses.replace(cfg, **fetched)


def _check_weights(cfg: TrainConfig) -> None:
    if cfg.image_weights is not None and not Path(cfg.image_weights).is_file():
        raise ConfigError(f"--image-weights {cfg.image_weights!r} is not a file: pass a local open_clip or timm "
                          "checkpoint (.pt/.bin/.safetensors)")
    if cfg.text_weights is not None and not (Path(cfg.text_weights) / "config.json").is_file():
        raise ConfigError(f"--text-weights {cfg.text_weights!r} has no config.json: pass a directory written by "
                          "save_pretrained")


def _check_packages(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """A switch that names a GPU package stops here when the package is missing, not after the model is built."""
    if cfg.loss_backend == "triton" and not triton_installed():
        raise ConfigError("--loss-backend triton needs the triton package (pip install triton): pass "
                          "--loss-backend auto or torch")
    if "wandb" in cfg.reporters and not wandb_installed():
        raise ConfigError("--report-to wandb needs Weights & Biases: pip install wandb (or bmc-fast[wandb]), or "
                          "leave wandb out of --report-to")
    if model_cfg.te_precision != "none" and not transformer_engine_installed():
        raise ConfigError(f"--te-precision {model_cfg.te_precision} needs NVIDIA Transformer Engine on a CUDA machine "
                          "(pip install 'transformer-engine[pytorch]'): pass --te-precision none")


def _device_memory(local_rank: int) -> int:
    """Bytes of memory of this rank's CUDA device."""
    import torch

    return torch.cuda.get_device_properties(local_rank).total_memory


def _check_memory(cfg: TrainConfig, env: DistEnv, device: str, model_cfg: ModelConfig,
                  ds_config: dict[str, Any]) -> None:
    """On CUDA, the memory planner's preflight (``bmc_fast.plan.preflight``) on every rank, before any model is
    built: a micro batch that cannot fit this GPU stops here with the planner's fix instead of running out of
    memory after the engine is built; rank 0 logs the verdict, a warning when over within the planner's error."""
    if device != "cuda":
        _logger.debug("memory preflight: skipped on %s (it plans CUDA memory)", device)
        return
    if cfg.skip_memory_check:
        _logger.info("memory preflight: skipped (--skip-memory-check)")
        return
    import torch

    from bmc_fast.plan import preflight

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_size))  # the node's ranks all probe at once
    try:  # logs the verdict (a warning when over within the planner's error) on rank 0
        preflight(model_cfg, ds_config, env.world_size, _device_memory(env.local_rank), gpus_per_node=env.local_size,
                  preset=cfg.preset, source=f"--ds_config {cfg.ds_config}", announce=env.rank == 0)
    except ConfigError as error:
        raise ConfigError(f"{error}; or pass --skip-memory-check to launch anyway") from None
    finally:
        torch.set_num_threads(threads)


def _eval_shards(pattern: str | None) -> list[str]:
    """The evaluation shards; retrieval needs at least 2 pairs."""
    if pattern is None:
        return []
    urls = expand_shards(pattern, "--eval-data")
    if any(url.startswith(REMOTE_PREFIXES) for url in urls):  # counted as they are read
        return urls
    n_eval = sum(count_samples(url, "--eval-data") for url in urls)
    if n_eval < 2:
        raise ConfigError(f"--eval-data {pattern!r} holds {n_eval} pair(s); retrieval needs at least 2: "
                          "point it at a larger evaluation split")
    return urls


def _zeroshot_sets(cfg: TrainConfig) -> tuple[list, tuple[str, ...]]:
    """Every --zeroshot-data set, read into memory now: a bad label key or too few classes stop the run here."""
    from bmc_fast.eval.labelled_images import load_named_sets
    from bmc_fast.eval.zeroshot import DEFAULT_TEMPLATES, check_choices, read_templates

    if not cfg.zeroshot_data:
        return [], DEFAULT_TEMPLATES
    sets = load_named_sets(cfg.zeroshot_data, cfg.zeroshot_label_key, "--zeroshot-data", "--zeroshot-label-key")
    for data in sets:
        check_choices(data, cfg.zeroshot_choices, "--zeroshot-choices")
        _logger.info("zero-shot set %r: %d images, %d classes", data.name, len(data.labels), len(data.classes))
    templates = read_templates(cfg.zeroshot_templates, "--zeroshot-templates") if cfg.zeroshot_templates else \
        DEFAULT_TEMPLATES
    return sets, templates


def _check_new_run_dir(run: RunDir, overwrite: bool) -> None:
    """A new run never lands on another run (unless ``overwrite``) nor replaces a folder that holds no run; its
    directory can be created (checked on every rank, made by rank 0 in ``write_run_dir``)."""
    check_output_dir(run.path, "--output-dir", create=False)
    if run.is_run() and not overwrite:
        raise ConfigError(f"--output-dir {str(run.path)!r} already holds a run: choose another directory, pass "
                          "--resume to continue it or --overwrite to replace it")
    if run.path.is_dir() and any(run.path.iterdir()) and not run.is_run():
        raise ConfigError(f"--output-dir {str(run.path)!r} holds files but no run (no config.json), and "
                          "--overwrite only replaces runs: choose a new or empty directory")
