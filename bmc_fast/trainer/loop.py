"""The training loop: ``run`` builds the model, the DeepSpeed engine and the loaders of a ``Prepared``
run, then trains ``max_steps`` optimizer steps, logging every ``log_every``, evaluating (retrieval, zero-shot)
every ``eval_every`` and saving DeepSpeed checkpoints every ``save_every`` steps (each also at the end). Rank 0
writes the run directory (``bmc_fast.checkpoint.run_dir.RunDir``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bmc_fast.checkpoint.run_dir import checkpoint_tag
from bmc_fast.errors import TrainingError
from bmc_fast.trainer import rank_state
from bmc_fast.trainer.distributed import configure_device, release_shm_buffer, use_deterministic_algorithms
from bmc_fast.trainer.ds_config import with_resumable_cpu_adam
from bmc_fast.trainer.grad_norm import set_grad_norm_dtype
from bmc_fast.trainer.metrics import MetricsWriter, ThroughputWindow
from bmc_fast.trainer.prepare import Prepared
from bmc_fast.trainer.run_data import log_token_waste, make_loaders, total_skips
from bmc_fast.trainer.step_profile import NoProfile

_logger = logging.getLogger(__name__)


@dataclass
class Session:
    """What the loop carries from step to step."""

    p: Prepared
    engine: Any  # deepspeed.DeepSpeedEngine around BMCLongCLIP
    device: torch.device
    dtype: torch.dtype  # the engine's compute dtype (fp32, bf16, fp16)
    first_step: int
    loss_fn: torch.nn.Module
    train_loader: Any  # the training stream's loader: state_dict() gives its place (bmc_fast.trainer.rank_state)
    batches: Iterator[dict]  # iter(train_loader): endless
    data_seed: int  # the seed train_loader was built with
    eval_loader: Any  # None without --eval-data
    writer: MetricsWriter
    window: ThroughputWindow
    progress: Any  # tqdm bar (rank 0)
    started: float = field(default_factory=time.perf_counter)
    skipped: Counter = field(default_factory=Counter)  # this rank's skipped samples by kind (PIL loader)
    last_train: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    n_eval: int = 0  # pairs in the last evaluation
    last_zeroshot: dict = field(default_factory=dict)  # the last zero-shot metrics (bmc_fast.eval.zeroshot.scalars)
    last_saved: str | None = None  # tag of the last checkpoint this run wrote
    skipped_steps: list[int] = field(default_factory=list)  # steps whose optimizer step was skipped (the guard)
    bad_in_a_row: list[int] = field(default_factory=list)  # the current run of skipped steps
    profile: Any = field(default_factory=NoProfile)  # a StepProfile times the parts of each step (bench_train.py)

    @property
    def pairs_per_loss(self) -> int:
        """Pairs one loss contrasts: the global batch (contrastive accumulation) or micro batch × ranks."""
        plan = self.p.plan
        contrastive = plan.accumulation > 1 and self.p.cfg.accumulation == "contrastive"
        return plan.global_batch if contrastive else plan.micro_batch * plan.world_size


def run(p: Prepared) -> dict[str, Any]:
    """Train; returns the summary (also written to ``summary.json`` on rank 0)."""
    s = start(p)
    cfg = p.cfg
    for step in range(s.first_step, p.max_steps + 1):
        lr, scale = train_step(s, step)
        if due(step, cfg.log_every, p.max_steps):
            log_step(s, step, lr, scale)
        if (s.eval_loader is not None or p.zeroshot) and due(step, cfg.eval_every, p.max_steps):
            evaluate(s, step)
        if due(step, cfg.save_every, p.max_steps):
            save(s, step)
    return finish(s)


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action runs after ``step``: every ``every`` steps (0: never) and after the last."""
    return step == last or (every > 0 and step % every == 0)


def start(p: Prepared) -> Session:
    """Distributed set-up, run directory, model and engine (resumed if asked), loss, loaders, metrics."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from tqdm import tqdm

    from bmc_fast.kernels import FusedClipLoss
    from bmc_fast.model.flops import peak_flops, train_step_flops

    cfg, env = p.cfg, p.env
    if cfg.deterministic:
        use_deterministic_algorithms()
    accelerator = get_accelerator()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    device = configure_device(accelerator, env)
    write_run_dir(p)
    engine, first_step, n_params = build_engine(p)
    saved = _saved_rank_state(p) if cfg.resume else None
    # Without a saved stream a resumed run must not replay the batches and augmentations of steps 1, 2, ...:
    # its loaders and RNG start from a seed that moves with the step.
    data_seed = saved["data_seed"] if saved else cfg.seed + first_step - 1
    torch.manual_seed(data_seed)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
    _log_set_up(p, engine, n_params, device, dtype, accelerator.communication_backend_name())
    # open_clip's scalable setting: each rank's rows against every rank's negatives, fused (no b×N logits).
    loss_fn = FusedClipLoss(local_loss=True, gather_with_grad=True, rank=env.rank, world_size=env.world_size,
                            backend=cfg.loss_backend)
    if env.rank == 0:
        log_token_waste(p)
    train_loader, eval_loader = make_loaders(p, device, half=dtype == torch.float16, seed=data_seed)
    if saved:
        train_loader.load_state_dict(saved["loader"])
        rank_state.restore_rng(saved["rng"])
    elif cfg.resume:
        _logger.warning("resumed run: the data is reshuffled with seed %d (--seed %d + %d steps done), not "
                        "continued: the rest of the run differs from an uninterrupted one", data_seed, cfg.seed,
                        first_step - 1)
    writer = MetricsWriter(p.run, enabled=env.rank == 0)
    window = ThroughputWindow(device, p.plan.global_batch, flops_fn=partial(train_step_flops, p.model_cfg),
                              peak_flops=peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda"
                              else None)
    progress = tqdm(total=p.max_steps, initial=first_step - 1, desc="train", disable=env.rank != 0,
                    dynamic_ncols=True)
    session = Session(p, engine, device, dtype, first_step, loss_fn, train_loader, iter(train_loader), data_seed,
                      eval_loader, writer, window, progress)
    session.last_saved = p.run.latest_tag() if cfg.resume else None
    if saved:
        session.skipped.update(saved["skipped"])
        session.skipped_steps = list(saved["skipped_steps"])
    return session


def stream_split(p: Prepared) -> dict[str, Any]:
    """How this rank's stream is cut: a saved place continues only under the same cut."""
    return {"loader": p.cfg.loader, "rank": p.env.rank, "world_size": p.env.world_size, "workers": p.cfg.workers,
            "micro_batch": p.plan.micro_batch}


def _saved_rank_state(p: Prepared) -> dict[str, Any] | None:
    """This rank's state in the checkpoint being resumed, or None (logged) when the stream cannot continue."""
    tag = p.run.latest_tag()
    path = rank_state.rank_state_path(p.run.checkpoints / tag, p.env.rank)
    if not path.is_file():
        _logger.warning("resumed run: checkpoint %s holds no data-stream state for rank %d", tag, p.env.rank)
        return None
    saved = rank_state.read(path)
    if saved["split"] != (now := stream_split(p)):
        changed = {key: f"{saved['split'].get(key)} -> {value}" for key, value in now.items()
                   if saved["split"].get(key) != value}
        _logger.warning("resumed run: the data stream is cut differently (%s): it is re-split", changed)
        return None
    if p.env.rank == 0:
        _logger.info("resumed the data stream, RNG states and skip counts of %s: the run continues exactly", tag)
    return saved


def build_engine(p: Prepared) -> tuple[Any, int, int]:
    """(DeepSpeed engine of a freshly seeded model, first step, parameter count); with ``--resume``, the
    engine is loaded from ``latest``."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from bmc_fast.model.clip import model_from_config
    from bmc_fast.trainer.param_groups import param_groups

    torch.manual_seed(p.cfg.seed)
    model = model_from_config(p.model_cfg, p.cfg.image_weights, p.cfg.text_weights)
    n_params = sum(t.numel() for t in model.parameters())  # before ZeRO-3 partitions them
    config = with_resumable_cpu_adam(p.ds_config, get_accelerator().device_name())
    set_grad_norm_dtype(p.cfg.grad_norm_dtype, get_accelerator().device_name())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=config)
    if not p.cfg.resume:
        return engine, 1, n_params
    load_path, client_state = engine.load_checkpoint(str(p.run.checkpoints))  # the `latest` tag
    _logger.info("resumed from %s at step %d", Path(load_path).parent.name, client_state["step"])
    return engine, client_state["step"] + 1, n_params


def train_step(s: Session, step: int) -> tuple[float, torch.Tensor]:
    """One optimizer step over ``accumulation`` micro batches; returns (the step's lr, the logit scale).

    With K > 1 micro batches and ``--accumulation contrastive`` one loss spans all K × micro × ranks pairs
    (``bmc_fast.trainer.contrastive_accumulation``); otherwise each micro batch has its own loss (DeepSpeed's
    accumulation, which scales each by 1/K). A step whose loss or gradient norm is non-finite on any rank
    is skipped by every rank (``guard_loss``), counted, and after ``--max-bad-steps`` in a row stops the run."""
    plan = s.p.plan
    lr = s.engine.get_lr()[0]  # this step's rate: the scheduler moves on inside the boundary engine.step()
    if plan.accumulation > 1 and s.p.cfg.accumulation == "contrastive":
        loss, scale = _contrastive_step(s)
        losses = [loss]
    else:
        losses = []  # this step's micro batch losses, on the device
        for _ in range(plan.accumulation):
            batch = _next_batch(s)
            with s.profile.part("forward"):
                image, text, scale = s.engine(*_model_inputs(s, batch))
            with s.profile.part("loss"):
                loss = guard_loss(s.loss_fn(image, text, scale))
            with s.profile.part("backward"):
                s.engine.backward(loss)
            with s.profile.part("optimizer"):
                s.engine.step()
            s.window.add_micro_batch(loss, batch["attention_mask"])
            losses.append(loss)
    s.window.end_step()
    s.progress.update(1)
    # DeepSpeed's ZeRO optimizers skip a step whose all-reduced gradient norm is not finite (their own host
    # sync); was_step_applied() reads their verdict, the same on every rank.
    if s.engine.was_step_applied():
        s.bad_in_a_row.clear()
    elif s.dtype == torch.float16 and _finite_on_every_rank(losses):
        _log_loss_scale_overflow(s, step)
    else:
        _count_skipped_step(s, step)
    return lr, scale


def _finite_on_every_rank(losses: list[torch.Tensor]) -> bool:
    """Whether every rank's losses of this step are finite: one all-reduce, only on a skipped step (which every
    rank sees together)."""
    finite = torch.stack([torch.isfinite(loss.detach()) for loss in losses]).all().to(torch.int32)
    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def _log_loss_scale_overflow(s: Session, step: int) -> None:
    """fp16: finite losses whose scaled gradients overflowed. DeepSpeed's dynamic loss scaling skips the step
    and lowers the scale (it stops the run itself at its minimum scale); not a bad step for --max-bad-steps."""
    s.skipped_steps.append(step)
    if s.p.env.rank == 0:
        _logger.warning("step %d skipped: fp16 loss scale overflow (finite loss), loss scale now %g; weights and "
                        "optimizer state are unchanged, not counted toward --max-bad-steps", step,
                        s.engine.optimizer.loss_scale)


def guard_loss(loss: torch.Tensor) -> torch.Tensor:
    """``loss``, turned NaN when it is not finite: its gradients are then NaN on this rank, DeepSpeed's
    gradient norm (all-reduced) is NaN on every rank, and every rank skips the step. An infinite loss can
    have finite gradients, which DeepSpeed alone would apply. On the device: no host sync."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))


def _count_skipped_step(s: Session, step: int) -> None:
    s.skipped_steps.append(step)
    s.bad_in_a_row.append(step)
    if s.p.env.rank == 0:  # every rank agrees: one line
        _logger.warning("step %d skipped: a loss or the gradient norm was not finite; weights and optimizer state are "
                        "unchanged (%d step(s) skipped so far)", step, len(s.skipped_steps))
    if len(s.bad_in_a_row) >= (limit := s.p.cfg.max_bad_steps):
        _stop_diverged(s, step, f"{len(s.bad_in_a_row)} steps in a row (--max-bad-steps {limit}) had a non-finite "
                                f"loss or gradient norm: steps {_step_list(s.bad_in_a_row)}")


def _step_list(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 12 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"


def _contrastive_step(s: Session) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrastive accumulation of one step (its K micro batches held in memory); returns (loss, logit scale)."""
    from bmc_fast.trainer.contrastive_accumulation import contrastive_accumulation_step

    batches = [_next_batch(s) for _ in range(s.p.plan.accumulation)]

    def forward(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with s.profile.part("forward"):
            return s.engine(*_model_inputs(s, batch))

    def loss(*features: torch.Tensor) -> torch.Tensor:
        with s.profile.part("loss"):
            return guard_loss(s.loss_fn(*features))

    def backward(surrogate: torch.Tensor) -> None:
        with s.profile.part("backward"):
            s.engine.backward(surrogate, scale_wrt_gas=False)  # the surrogates already sum to the step's gradient
        with s.profile.part("optimizer"):
            s.engine.step()  # an optimizer step only at the K-th micro batch (DeepSpeed counts them)

    loss, scale = contrastive_accumulation_step(forward, batches, loss, backward, s.device)
    for k, batch in enumerate(batches):
        s.window.add_micro_batch(loss if k == 0 else None, batch["attention_mask"])
    return loss, scale


def _next_batch(s: Session) -> dict:
    with s.profile.part("data"):
        batch = next(s.batches)
    s.skipped.update(batch["skipped"])
    return batch


def _model_inputs(s: Session, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels in the engine's dtype, input_ids, attention_mask) on this rank's device."""
    return (batch["pixels"].to(s.device, s.dtype), batch["input_ids"].to(s.device),
            batch["attention_mask"].to(s.device))


def log_step(s: Session, step: int, lr: float, scale: torch.Tensor) -> None:
    """Loss and throughput since the last log line (one all-reduce), to metrics.jsonl, TensorBoard, the bar."""
    s.last_train = {**s.window.read(), "lr": lr, "logit_scale": scale.item(), "pairs_per_loss": s.pairs_per_loss,
                    "skipped_steps": len(s.skipped_steps)}
    if (norm := s.engine.get_global_grad_norm()) is not None:  # the last step's, before clipping
        s.last_train["grad_norm"] = float(norm)
    if s.p.cfg.loader == "pil":  # DALI never meets a bad sample: its skips are the index scan's, in the summary
        s.last_train["skipped_samples"] = sum(s.skipped.values())  # this rank's, read so far
    s.writer.write(step, s.last_train)
    s.progress.set_postfix(loss=f"{s.last_train.get('loss', math.nan):.3f}",
                           scale=f"{s.last_train['logit_scale']:.1f}")


def evaluate(s: Session, step: int) -> None:
    """Retrieval Recall@k on the eval shards and zero-shot accuracy on the --zeroshot-data sets, on every rank
    (a ZeRO-3 forward needs them all); kept out of the throughput."""
    from bmc_fast.eval.retrieval import extract_features, retrieval_recall

    if s.eval_loader is not None:
        image, text = extract_features(s.engine.module, s.eval_loader, s.device, s.dtype)
        s.last_eval, s.n_eval = retrieval_recall(image, text), image.shape[0]
        s.writer.write(step, s.last_eval, prefix="eval")
        _logger.info("step %d eval: T2I R@1 %.1f  I2T R@1 %.1f (N=%d)", step, s.last_eval["t2i_r1"],
                     s.last_eval["i2t_r1"], s.n_eval)
    if s.p.zeroshot:
        evaluate_zeroshot(s, step)
    s.window.restart_clock()


def evaluate_zeroshot(s: Session, step: int) -> None:
    """Both zero-shot protocols on every --zeroshot-data set, as ``python -m bmc_fast.eval.zeroshot`` runs them
    on this step's checkpoint (the eval transform, ``--seed``'s choice order)."""
    from bmc_fast.data.transforms import image_transform
    from bmc_fast.eval import zeroshot

    p, model = s.p, s.engine.module
    transform = image_transform(p.model_cfg.vision.image_size, train=False)
    encoder = zeroshot.bmc_fast_encoder(model, p.tokenizer, transform, s.device, s.dtype)
    was_training = model.training
    model.eval()
    results = {data.name: zeroshot.evaluate(encoder, data, k=p.cfg.zeroshot_choices, seed=p.cfg.seed,
                                            templates=p.zeroshot_templates) for data in p.zeroshot}
    model.train(was_training)
    s.last_zeroshot = zeroshot.scalars(results)
    s.writer.write(step, s.last_zeroshot, prefix="zeroshot")
    _logger.info("step %d zero-shot: %s", step, "  ".join(
        f"{name} {100 * s.last_zeroshot[f'{name}/mc_acc']:.1f} ({p.cfg.zeroshot_choices + 1} choices) / "
        f"{100 * s.last_zeroshot[f'{name}/top1']:.1f} (all {len(r['classes'])})" for name, r in results.items()))


def save(s: Session, step: int) -> None:
    """A DeepSpeed checkpoint of ``step`` and every rank's state (``rank_state``); ``latest`` moves to it only
    once every rank has written its part. Never one of non-finite weights (checked on every rank, one
    all-reduce)."""
    p = s.p
    if not _finite_weights(s):
        _stop_diverged(s, step, "a weight is not finite")
    tag = checkpoint_tag(step)
    # DeepSpeed would write `latest` from rank 0 before the other ranks finish their shards: we do it after
    s.engine.save_checkpoint(str(p.run.checkpoints), tag=tag, client_state={"step": step}, save_latest=False)
    state = rank_state.capture(s.train_loader, data_seed=s.data_seed, split=stream_split(p), skipped=s.skipped,
                               skipped_steps=s.skipped_steps)
    rank_state.write(rank_state.rank_state_path(p.run.checkpoints / tag, p.env.rank), state)
    torch.distributed.barrier()
    if p.env.rank == 0:  # every rank's part of `tag` is on disk
        p.run.write_latest(tag)
        if deleted := p.run.prune_checkpoints(p.cfg.keep_checkpoints):
            _logger.info("--keep-checkpoints %d: deleted %s", p.cfg.keep_checkpoints, ", ".join(deleted))
    torch.distributed.barrier()  # no rank goes on (or resumes) before `latest` names the new checkpoint
    s.last_saved = tag


def _finite_weights(s: Session) -> bool:
    """Whether every rank's weights (its ZeRO-3 partition) are finite: one all-reduce."""
    bad = torch.zeros((), device=s.device)
    for param in s.engine.module.parameters():
        bad += (~torch.isfinite(getattr(param, "ds_tensor", param).detach())).any().float()
    torch.distributed.all_reduce(bad)
    return bad.item() == 0


def _stop_diverged(s: Session, step: int, what: str) -> None:
    """Stop the run (exit status 1 from the CLI): nothing is saved after a non-finite loss or weight."""
    last = f"checkpoints/{s.last_saved}" if s.last_saved else "none (no checkpoint was written)"
    s.progress.close()
    s.writer.close()
    torch.distributed.barrier()  # every rank stops at this step (their check was one all-reduce)
    if s.device.type == "cpu":
        release_shm_buffer(s.p.env)  # as finish() does: DeepSpeed would leave ~66 MiB a rank in /dev/shm
    raise TrainingError(f"training diverged at step {step}: {what}; nothing was saved after it, the last good "
                        f"checkpoint is {last}; lower the learning rate or --resume from that checkpoint")


def finish(s: Session) -> dict[str, Any]:
    """Close the outputs, sum the skips over ranks, write ``summary.json`` (rank 0); all ranks wait."""
    p, env = s.p, s.p.env
    s.progress.close()
    s.writer.close()
    skips = total_skips(s.skipped, p.cfg.loader, p.train_urls, s.device)
    summary = {"steps": p.max_steps, "seconds": time.perf_counter() - s.started, "train": s.last_train,
               "eval": s.last_eval, "n_eval": s.n_eval, "zeroshot": s.last_zeroshot, "world_size": env.world_size,
               "loader": p.cfg.loader, "skipped": skips, "skipped_steps": s.skipped_steps}
    if env.rank == 0:
        _logger.info("skipped samples (%s loader, all ranks): %s", p.cfg.loader, skips or "none")
        p.run.summary.write_text(json.dumps(summary, indent=2))
        _logger.info("done: %s", p.run.path)
    torch.distributed.barrier()
    if s.device.type == "cpu":
        release_shm_buffer(env)
    return summary


def write_run_dir(p: Prepared) -> None:
    """Rank 0 (re)creates the run directory and writes config.json and the tokenizer; all ranks wait."""
    if p.env.rank == 0:
        if p.cfg.overwrite and p.run.path.exists():
            shutil.rmtree(p.run.path)
        p.run.path.mkdir(parents=True, exist_ok=True)
        p.tokenizer.save_pretrained(str(p.run.tokenizer))
        # the original stays; each resume records its own resolved config beside it
        path = p.run.next_resume_config() if p.cfg.resume else p.run.config
        path.write_text(json.dumps(resolved_config(p), indent=2))
    torch.distributed.barrier()


def resolved_config(p: Prepared) -> dict[str, Any]:
    """What ``config.json`` holds: the train, model and DeepSpeed configs as resolved, the batch, versions."""
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


def _log_set_up(p: Prepared, engine, n_params: int, device: torch.device, dtype: torch.dtype, backend: str) -> None:
    cfg, env, plan = p.cfg, p.env, p.plan
    _logger.info("model %s: %.2fM parameters; ZeRO stage %d, %s, %d rank(s) on %s over %s; batch %d = %d micro × %d "
                 "accum × %d ranks; %d steps", cfg.preset, n_params / 1e6, engine.zero_optimization_stage(), dtype,
                 env.world_size, device, backend, plan.global_batch, plan.micro_batch, plan.accumulation,
                 env.world_size, p.max_steps)
    if plan.accumulation > 1 and cfg.accumulation == "contrastive":
        _logger.info("contrastive accumulation %d: each loss contrasts all %d pairs of a step (%d micro batches × %d "
                     "× %d ranks), one extra forward per micro batch", plan.accumulation, plan.global_batch,
                     plan.accumulation, plan.micro_batch, env.world_size)
    elif plan.accumulation > 1:
        _logger.warning("gradient accumulation %d (--accumulation independent): each loss contrasts %d pairs (micro "
                        "batch %d × %d ranks), not the global batch of %d", plan.accumulation,
                        plan.micro_batch * env.world_size, plan.micro_batch, env.world_size, plan.global_batch)
