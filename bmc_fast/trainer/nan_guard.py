"""The NaN guard: a step whose loss or gradient norm is not finite on any rank is skipped by every rank, counted,
and after ``--max-bad-steps`` in a row stops the run (``Diverged``); nothing is saved after a non-finite loss or
weight.

It rests on DeepSpeed's ZeRO optimizers, which skip a step whose all-reduced gradient norm is not finite (their own
host sync; ``trainer/ds_config.py`` refuses the settings under which they never skip). ``guard_loss`` turns a
non-finite loss into NaN, so that an infinite loss with finite gradients is skipped too; ``NanGuard.after_step``
reads DeepSpeed's verdict (``engine.was_step_applied()``, the same on every rank) and keeps the counts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

_logger = logging.getLogger(__name__)


class Diverged(Exception):
    """Training cannot go on at ``step``: ``what`` happened (every rank raises it at the same step)."""

    def __init__(self, step: int, what: str):
        super().__init__(f"training diverged at step {step}: {what}")
        self.step, self.what = step, what


def guard_loss(loss: torch.Tensor) -> torch.Tensor:
    """``loss``, turned NaN when it is not finite: its gradients are then NaN on this rank, DeepSpeed's
    gradient norm (all-reduced) is NaN on every rank, and every rank skips the step. An infinite loss can
    have finite gradients, which DeepSpeed alone would apply. On the device: no host sync."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))


@dataclass
class NanGuard:
    """The skipped steps of a run (a resumed run starts from the checkpoint's list) and the current bad streak."""

    max_bad_steps: int  # --max-bad-steps: this many skipped steps in a row stop the run
    announce: bool  # rank 0 logs (every rank agrees on every verdict)
    skipped_steps: list[int] = field(default_factory=list)  # steps whose optimizer step was skipped
    bad_in_a_row: list[int] = field(default_factory=list)  # the current run of skipped steps

    def after_step(self, engine, step: int, losses: list[torch.Tensor], fp16: bool) -> None:
        """Count ``step`` if DeepSpeed skipped it; raise ``Diverged`` after ``max_bad_steps`` in a row. Under fp16
        a skip with finite losses is DeepSpeed's loss scaling at work: logged, not counted as bad."""
        if engine.was_step_applied():
            self.bad_in_a_row.clear()
        elif fp16 and _finite_on_every_rank(losses):
            self.skipped_steps.append(step)
            if self.announce:
                _logger.warning("step %d skipped: fp16 loss scale overflow (finite loss), loss scale now %g; weights "
                                "and optimizer state are unchanged, not counted toward --max-bad-steps", step,
                                engine.optimizer.loss_scale)
        else:
            self.skipped_steps.append(step)
            self.bad_in_a_row.append(step)
            if self.announce:
                _logger.warning("step %d skipped: a loss or the gradient norm was not finite; weights and optimizer "
                                "state are unchanged (%d step(s) skipped so far)", step, len(self.skipped_steps))
            if len(self.bad_in_a_row) >= self.max_bad_steps:
                raise Diverged(step, f"{len(self.bad_in_a_row)} steps in a row (--max-bad-steps {self.max_bad_steps}) "
                                     f"had a non-finite loss or gradient norm: steps {_step_list(self.bad_in_a_row)}")


def finite_weights(module: torch.nn.Module, device: torch.device) -> bool:
    """Whether every rank's weights (its ZeRO-3 partition) are finite: one all-reduce."""
    bad = torch.zeros((), device=device)
    for param in module.parameters():
        bad += (~torch.isfinite(getattr(param, "ds_tensor", param).detach())).any().float()
    torch.distributed.all_reduce(bad)
    return bad.item() == 0


def _finite_on_every_rank(losses: list[torch.Tensor]) -> bool:
    """Whether every rank's losses of this step are finite: one all-reduce, only on a skipped step (which every
    rank sees together)."""
    finite = torch.stack([torch.isfinite(loss.detach()) for loss in losses]).all().to(torch.int32)
    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def _step_list(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 12 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
