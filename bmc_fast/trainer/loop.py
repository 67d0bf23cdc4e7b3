"""The training loop: ``run`` builds the model, the DeepSpeed engine and the loaders of a ``Prepared`` run
(``start``), then trains ``max_steps`` optimizer steps, logging every ``log_every``, evaluating (retrieval, zero-shot)
every ``eval_every`` and saving checkpoints every ``save_every`` steps (each also at the end).

Its parts live beside it: the NaN guard (``nan_guard``), checkpoints (``checkpointing``), what rank 0 writes into the
run directory (``run_record``), the training stream (``run_data.TrainStream``). Code outside the trainer watches or
changes the steps through ``StepHooks`` (``benchmarks/bench_train.py``, the fault-injection tests), never by
replacing a session's fields.
"""
from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bmc_fast.checkpoint.run_dir import checkpoint_tag
from bmc_fast.errors import Preempted, TrainingError
from bmc_fast.trainer.checkpointing import Checkpointer
from bmc_fast.trainer.distributed import configure_device, release_shm_buffer, use_deterministic_algorithms
from bmc_fast.trainer.ds_config import with_resumable_cpu_adam
from bmc_fast.trainer.grad_norm import set_grad_norm_dtype
from bmc_fast.trainer.metrics import MetricsWriter, ThroughputWindow
from bmc_fast.trainer.nan_guard import Diverged, NanGuard, finite_weights, guard_loss
from bmc_fast.trainer.one_rank import skip_gradient_buckets
from bmc_fast.trainer.param_groups import lock_towers, log_groups, param_groups, schedule_lr, with_group_schedule
from bmc_fast.trainer.preemption import StopSignals
from bmc_fast.trainer.prepare import Prepared
from bmc_fast.trainer.run_data import TrainStream, log_token_waste, open_train_stream, total_skips
from bmc_fast.trainer.run_record import resolved_config, write_run_dir, write_summary
from bmc_fast.trainer.step_profile import NoProfile

_logger = logging.getLogger(__name__)


@dataclass
class StepHooks:
    """What code outside the trainer may add to a session's steps (``start(p, hooks)``), each applied once:

    - ``profile(device)`` builds the object that times each step's parts (``step_profile.StepProfile``; default
      none): ``bench_train.py`` breaks its steps down with it;
    - ``loss(loss_fn)`` returns the loss function the steps call instead (record the last loss, inject a fault);
    - ``batches(iterator)`` returns the training batches the steps take instead (hold them in memory, record
      their lengths).
    """

    profile: Callable[[torch.device], Any] | None = None
    loss: Callable[[Callable], Callable] | None = None
    batches: Callable[[Iterator[dict]], Iterator[dict]] | None = None


@dataclass
class Outputs:
    """Rank 0's views of the run while it trains (the other ranks' are silent)."""

    writer: MetricsWriter  # metrics.jsonl and TensorBoard
    window: ThroughputWindow  # loss and throughput since the last log line
    progress: Any  # tqdm bar

    def close(self) -> None:
        self.progress.close()
        self.writer.close()


@dataclass
class Results:
    """The latest metrics of each kind, for the summary."""

    train: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    n_eval: int = 0  # pairs in the last evaluation
    zeroshot: dict = field(default_factory=dict)  # bmc_fast.eval.zeroshot.scalars of the last evaluation


@dataclass
class Session:
    """What the loop carries from step to step."""

    p: Prepared
    engine: Any  # deepspeed.DeepSpeedEngine around BMCLongCLIP
    device: torch.device
    dtype: torch.dtype  # the engine's compute dtype (fp32, bf16, fp16)
    first_step: int
    loss_fn: Callable  # (image, text, scale) -> loss
    stream: TrainStream
    eval_loader: Any  # None without --eval-data
    out: Outputs
    guard: NanGuard
    checkpoints: Checkpointer
    profile: Any = field(default_factory=NoProfile)  # StepHooks.profile's, else parts go untimed
    results: Results = field(default_factory=Results)
    started: float = field(default_factory=time.perf_counter)

    @property
    def pairs_per_loss(self) -> int:
        """Pairs one loss contrasts: the global batch (contrastive accumulation) or micro batch × ranks."""
        plan = self.p.plan
        contrastive = plan.accumulation > 1 and self.p.cfg.accumulation == "contrastive"
        return plan.global_batch if contrastive else plan.micro_batch * plan.world_size


def run(p: Prepared) -> dict[str, Any]:
    """Train; returns the summary (also written to ``summary.json`` on rank 0). SIGUSR1/SIGTERM stop every rank
    at one step with a checkpoint there (``preemption``: ``Preempted``, exit status 75)."""
    stop = StopSignals()
    try:
        s = start(p)
        cfg = p.cfg
        if cfg.pretrained is not None and s.first_step == 1 and (s.eval_loader is not None or p.zeroshot):
            evaluate(s, 0)  # where the warm start begins
        for step in range(s.first_step, p.max_steps + 1):
            lr, scale = train_step(s, step)
            s.stream.end_step(step)
            if due(step, cfg.log_every, p.max_steps):
                log_step(s, step, lr, scale)
            if (s.eval_loader is not None or p.zeroshot) and due(step, cfg.eval_every, p.max_steps):
                evaluate(s, step)
            if due(step, cfg.save_every, p.max_steps):
                save(s, step)
            if step < p.max_steps and (signum := stop.agreed(s.device)):
                _preempt(s, step, signum, stop)
    except Diverged as diverged:
        _stop(s, diverged)
    finally:
        stop.restore()
    return finish(s)


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action runs after ``step``: every ``every`` steps (0: never) and after the last."""
    return step == last or (every > 0 and step % every == 0)


def start(p: Prepared, hooks: StepHooks | None = None) -> Session:
    """Distributed set-up, run directory, model and engine (resumed if asked), loss, loaders, metrics."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from tqdm import tqdm

    from bmc_fast.kernels import FusedClipLoss, FusedSigLipLoss
    from bmc_fast.model.flops import peak_flops, train_step_flops

    cfg, env = p.cfg, p.env
    hooks = hooks or StepHooks()
    if cfg.deterministic:
        use_deterministic_algorithms()
    accelerator = get_accelerator()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    device = configure_device(accelerator, env)
    write_run_dir(p)
    engine, first_step, n_params = build_engine(p)
    checkpoints = Checkpointer(p.run, env.rank, cfg.keep_checkpoints, stream_split(p), asdict(p.plan),
                               last_saved=p.run.latest_tag() if cfg.resume else None)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
    _log_set_up(p, engine, n_params, device, dtype, accelerator.communication_backend_name())
    # open_clip's scalable setting: each rank's rows against every rank's negatives, fused (no b×N logits).
    if cfg.loss == "siglip":
        loss_fn = FusedSigLipLoss(rank=env.rank, world_size=env.world_size, backend=cfg.loss_backend)
    else:
        loss_fn = FusedClipLoss(local_loss=True, gather_with_grad=True, rank=env.rank, world_size=env.world_size,
                                backend=cfg.loss_backend)
    if env.rank == 0:
        log_token_waste(p)
    stream, eval_loader, skipped_steps = open_train_stream(p, device, dtype == torch.float16, first_step,
                                                           stream_split(p), checkpoints.last_saved)
    guard = NanGuard(cfg.max_bad_steps, announce=env.rank == 0)
    guard.skipped_steps = skipped_steps
    window = ThroughputWindow(device, p.plan.global_batch, flops_fn=partial(train_step_flops, p.model_cfg),
                              peak_flops=peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda"
                              else None)
    progress = tqdm(total=p.max_steps, initial=first_step - 1, desc="train", disable=env.rank != 0,
                    dynamic_ncols=True)
    writer = MetricsWriter(p.run, enabled=env.rank == 0, report_to=cfg.reporters,
                           wandb_init={"project": cfg.wandb_project, "config": resolved_config(p)})
    out = Outputs(writer, window, progress)
    if hooks.batches is not None:
        stream.batches = hooks.batches(stream.batches)
    return Session(p=p, engine=engine, device=device, dtype=dtype, first_step=first_step,
                   loss_fn=hooks.loss(loss_fn) if hooks.loss is not None else loss_fn, stream=stream,
                   eval_loader=eval_loader, out=out, guard=guard, checkpoints=checkpoints,
                   profile=hooks.profile(device) if hooks.profile is not None else NoProfile())


def stream_split(p: Prepared) -> dict[str, Any]:
    """How this rank's stream is cut: a saved place continues only under the same cut."""
    return {"loader": p.cfg.loader, "rank": p.env.rank, "world_size": p.env.world_size, "workers": p.cfg.workers,
            "micro_batch": p.plan.micro_batch}


def build_engine(p: Prepared) -> tuple[Any, int, int]:
    """(DeepSpeed engine of a freshly seeded model, first step, parameter count); with ``--resume``, the
    engine is loaded from ``latest``."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from bmc_fast.checkpoint.universal import convert_to_universal, remove_universal
    from bmc_fast.model.clip import model_from_config
    from bmc_fast.trainer.warm_start import load_pretrained, restore_frozen

    cfg = p.cfg
    torch.manual_seed(cfg.seed)
    model = model_from_config(p.model_cfg, cfg.image_weights, cfg.text_weights)
    if cfg.pretrained is not None and not cfg.resume:
        load_pretrained(model, cfg.pretrained)
    lock_towers(model, cfg)
    if p.resize is not None and (cfg.lock_image or cfg.lock_text):  # the universal checkpoint has no locked tensor
        restore_frozen(model, p.run.checkpoints, p.resize.tag)
    n_params = sum(t.numel() for t in model.parameters())  # before ZeRO-3 partitions them
    base_lr = (p.ds_config.get("optimizer") or {}).get("params", {}).get("lr")
    groups = param_groups(model, cfg.lr_scales, base_lr)
    if p.env.rank == 0:
        log_groups(groups, base_lr)
    config = with_group_schedule(with_resumable_cpu_adam(p.ds_config, get_accelerator().device_name()), groups)
    set_grad_norm_dtype(p.cfg.grad_norm_dtype, get_accelerator().device_name())
    if p.resize is not None:  # another number of ranks: load DeepSpeed's universal form of the checkpoint
        if p.env.rank == 0:
            convert_to_universal(p.run.checkpoints, p.resize.tag)
        torch.distributed.barrier()
        config = {**config, "checkpoint": {**config.get("checkpoint", {}), "load_universal": True}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    skip_gradient_buckets(engine)
    if not cfg.resume:
        return engine, 1, n_params
    load_path, client_state = engine.load_checkpoint(str(p.run.checkpoints))  # `latest` (`latest_universal`)
    _logger.info("resumed from %s at step %d", Path(load_path).parent.name, client_state["step"])
    if p.resize is not None:
        torch.distributed.barrier()  # every rank has read it
        if p.env.rank == 0:
            remove_universal(p.run.checkpoints, p.resize.tag)
    return engine, client_state["step"] + 1, n_params


def train_step(s: Session, step: int) -> tuple[float, torch.Tensor]:
    """One optimizer step over ``accumulation`` micro batches; returns (the step's lr, the logit scale).

    With K > 1 micro batches and ``--accumulation contrastive`` one loss spans all K × micro × ranks pairs
    (``trainer.contrastive_accumulation``); otherwise each micro batch has its own loss (DeepSpeed's
    accumulation, which scales each by 1/K). A step whose loss or gradient norm is non-finite on any rank
    is skipped by every rank (``nan_guard``), counted, and after ``--max-bad-steps`` in a row stops the run."""
    plan = s.p.plan
    lr = schedule_lr(s.engine)  # this step's rate: the scheduler moves on inside the boundary engine.step()
    if plan.accumulation > 1 and s.p.cfg.accumulation == "contrastive":
        loss, scale = _contrastive_step(s)
        losses = [loss]
    else:
        losses = []  # this step's micro batch losses, on the device
        for _ in range(plan.accumulation):
            batch = _next_batch(s)
            with s.profile.part("forward"):
                outputs = s.engine(*_model_inputs(s, batch))  # image, text, scale[, bias]
            with s.profile.part("loss"):
                loss = guard_loss(s.loss_fn(*outputs))
            with s.profile.part("backward"):
                s.engine.backward(loss)
            with s.profile.part("optimizer"):
                s.engine.step()
            s.out.window.add_micro_batch(loss, batch["attention_mask"])
            losses.append(loss)
        scale = outputs[2]
    s.out.window.end_step()
    s.out.progress.update(1)
    s.guard.after_step(s.engine, step, losses, fp16=s.dtype == torch.float16)
    return lr, scale


def _contrastive_step(s: Session) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrastive accumulation of one step (its K micro batches held in memory); returns (loss, logit scale)."""
    from bmc_fast.trainer.contrastive_accumulation import contrastive_accumulation_step

    batches = [_next_batch(s) for _ in range(s.p.plan.accumulation)]

    def forward(batch: dict) -> tuple[torch.Tensor, ...]:
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
        s.out.window.add_micro_batch(loss if k == 0 else None, batch["attention_mask"])
    return loss, scale


def _next_batch(s: Session) -> dict:
    with s.profile.part("data"):
        return s.stream.next()


def _model_inputs(s: Session, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels in the engine's dtype, input_ids, attention_mask) on this rank's device."""
    return (batch["pixels"].to(s.device, s.dtype), batch["input_ids"].to(s.device),
            batch["attention_mask"].to(s.device))


def log_step(s: Session, step: int, lr: float, scale: torch.Tensor) -> None:
    """Loss and throughput since the last log line (one all-reduce), to metrics.jsonl, TensorBoard, the bar."""
    train = {**s.out.window.read(), "lr": lr, "logit_scale": scale.item(), "pairs_per_loss": s.pairs_per_loss,
             "skipped_steps": len(s.guard.skipped_steps)}
    if (norm := s.engine.get_global_grad_norm()) is not None:  # the last step's, before clipping
        train["grad_norm"] = float(norm)
    if s.p.cfg.loader == "pil":  # DALI never meets a bad sample: its skips are the index scan's, in the summary
        train["skipped_samples"] = sum(s.stream.skipped.values())  # this rank's, read so far
    s.results.train = train
    s.out.writer.write(step, train)
    s.out.progress.set_postfix(loss=f"{train.get('loss', math.nan):.3f}", scale=f"{train['logit_scale']:.1f}")


def evaluate(s: Session, step: int) -> None:
    """Retrieval Recall@k on the eval shards and zero-shot accuracy on the --zeroshot-data sets: every rank encodes
    its share of each batch (a ZeRO-3 forward needs them all) and the features are gathered; kept out of the
    throughput."""
    from bmc_fast.eval.retrieval import extract_features, retrieval_recall

    if s.eval_loader is not None:
        image, text = extract_features(s.engine.module, s.eval_loader, s.device, s.dtype, rank=s.p.env.rank,
                                       world_size=s.p.env.world_size)
        s.results.eval, s.results.n_eval = retrieval_recall(image, text), image.shape[0]
        s.out.writer.write(step, s.results.eval, prefix="eval")
        _logger.info("step %d eval: T2I R@1 %.1f  I2T R@1 %.1f (N=%d)", step, s.results.eval["t2i_r1"],
                     s.results.eval["i2t_r1"], s.results.n_eval)
    if s.p.zeroshot:
        evaluate_zeroshot(s, step)
    s.out.window.restart_clock()


def evaluate_zeroshot(s: Session, step: int) -> None:
    """Both zero-shot protocols on every --zeroshot-data set, as ``python -m bmc_fast.eval.zeroshot`` runs them
    on this step's checkpoint (the eval transform, ``--seed``'s choice order)."""
    from bmc_fast.data.transforms import image_transform
    from bmc_fast.eval import zeroshot

    p, model = s.p, s.engine.module
    transform = image_transform(p.model_cfg.vision.image_size, train=False)
    encoder = zeroshot.bmc_fast_encoder(model, p.tokenizer, transform, s.device, s.dtype, p.env.rank,
                                        p.env.world_size)
    was_training = model.training
    model.eval()
    results = {data.name: zeroshot.evaluate(encoder, data, k=p.cfg.zeroshot_choices, seed=p.cfg.seed,
                                            templates=p.zeroshot_templates) for data in p.zeroshot}
    model.train(was_training)
    s.results.zeroshot = scalars = zeroshot.scalars(results)
    s.out.writer.write(step, scalars, prefix="zeroshot")
    _logger.info("step %d zero-shot: %s", step, "  ".join(
        f"{name} {100 * scalars[f'{name}/mc_acc']:.1f} ({p.cfg.zeroshot_choices + 1} choices) / "
        f"{100 * scalars[f'{name}/top1']:.1f} (all {len(r['classes'])})" for name, r in results.items()))


def save(s: Session, step: int) -> None:
    """A checkpoint of ``step`` (``Checkpointer.save``); never one of non-finite weights (checked on every rank,
    one all-reduce)."""
    if not finite_weights(s.engine.module, s.device):
        raise Diverged(step, "a weight is not finite")
    s.checkpoints.save(s.engine, step, s.stream.state(s.guard.skipped_steps))


def _preempt(s: Session, step: int, signum: int, stop: StopSignals) -> None:
    """Every rank agreed to stop after ``step``: save it (unless just saved), wait for all, raise ``Preempted``."""
    if s.checkpoints.last_saved != checkpoint_tag(step):
        save(s, step)
    s.out.close()
    torch.distributed.barrier()  # every rank's save is done before any rank exits (the launcher kills the rest)
    if s.device.type == "cpu":
        release_shm_buffer(s.p.env)
    seconds = time.monotonic() - stop.received_at if stop.received else None
    raise Preempted(step, signal.Signals(signum).name, checkpoint_tag(step), seconds)


def _stop(s: Session, diverged: Diverged) -> None:
    """Stop the run (exit status 1 from the CLI): nothing is saved after a non-finite loss or weight."""
    last = s.checkpoints.last_saved
    s.out.close()
    torch.distributed.barrier()  # every rank stops at this step (their check was one all-reduce)
    if s.device.type == "cpu":
        release_shm_buffer(s.p.env)  # as finish() does: DeepSpeed would leave ~66 MiB a rank in /dev/shm
    raise TrainingError(f"{diverged}; nothing was saved after it, the last good checkpoint is "
                        f"{f'checkpoints/{last}' if last else 'none (no checkpoint was written)'}; lower the learning "
                        "rate or --resume from that checkpoint") from None


def finish(s: Session) -> dict[str, Any]:
    """Close the outputs, sum the skips over ranks, write ``summary.json`` (rank 0); all ranks wait."""
    p, env = s.p, s.p.env
    s.out.close()
    skips = total_skips(s.stream.skipped, p.cfg.loader, p.train_urls, s.device)
    summary = {"steps": p.max_steps, "seconds": time.perf_counter() - s.started, "train": s.results.train,
               "eval": s.results.eval, "n_eval": s.results.n_eval, "zeroshot": s.results.zeroshot,
               "world_size": env.world_size, "loader": p.cfg.loader, "skipped": skips,
               "skipped_steps": s.guard.skipped_steps}
    if env.rank == 0:
        _logger.info("skipped samples (%s loader, all ranks): %s", p.cfg.loader, skips or "none")
        write_summary(p, summary)
        _logger.info("done: %s", p.run.path)
    torch.distributed.barrier()
    if s.device.type == "cpu":
        release_shm_buffer(env)
    return summary


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
