"""ZeRO-1/2 on a data-parallel world of one: no gradient buckets.

DeepSpeed 0.19's ZeRO-1/2 optimizer (``DeepSpeedZeroOptimizer``) hands every gradient, as autograd produces it
(stage 2) or at the accumulation boundary (stage 1), to ``reduce_independent_p_g_buckets_and_remove_grads``:
it copies the gradient into a reduce bucket, reduces the bucket over the data-parallel group and copies the
rank's share into a partition buffer. With one rank there is no one to reduce with, and the copies are the
whole cost: on ``tiny`` at context 77 on 2 CPU cores they were 9-14 ms of a 100 ms step
(``benchmarks/results/train_cpu.md``), more than open_clip's whole gradient path.

``skip_gradient_buckets`` makes that per-gradient call do nothing when the group has one rank. The
optimizer's epilogue (``independent_gradient_partition_epilogue``) then takes the gradients where autograd
left them, as it already does for the bucketed ones, and the step flattens them into the fp32 partition as
before: the weights, the clipping norm, the skip of a non-finite step and the checkpoints are DeepSpeed's
own and unchanged (``tests/test_one_rank.py`` trains both ways and compares every weight bit for bit).
ZeRO-3 and several ranks keep DeepSpeed's reduction; so does a DeepSpeed whose ZeRO-1/2 optimizer lacks
the method (logged).
"""
from __future__ import annotations

import logging

_logger = logging.getLogger(__name__)

BUCKET_METHOD = "reduce_independent_p_g_buckets_and_remove_grads"


def skip_gradient_buckets(engine) -> bool:
    """On one data-parallel rank, stop a ZeRO-1/2 engine's optimizer from bucketing gradients; returns whether
    it did (why not is logged)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or engine.dp_world_size != 1:
        return False
    if reason := _why_buckets_stay(optimizer):
        _logger.info("gradient reduction: DeepSpeed's buckets kept on one rank (%s)", reason)
        return False
    setattr(optimizer, BUCKET_METHOD, _keep_gradient_in_place)
    _logger.info("gradient reduction: none on one rank (ZeRO-%d's gradient buckets skipped; the step reads each "
                 "gradient in place)", engine.zero_optimization_stage())
    return True


def _why_buckets_stay(optimizer) -> str | None:
    """Where the buckets do more than reduce, they stay."""
    if not callable(getattr(optimizer, BUCKET_METHOD, None)):
        return f"this DeepSpeed's ZeRO optimizer has no {BUCKET_METHOD}"
    if optimizer.cpu_offload:
        return "ZeRO-Offload copies the gradients to the host through them"
    if getattr(optimizer, "use_separate_grad_accum", True):
        return (f"gradients accumulate in {optimizer.gradient_accumulation_dtype}, apart from the "
                f"{optimizer.dtype} weights, and reach that buffer through them")
    if getattr(optimizer, "has_moe_layers", True):
        return "expert parameters reduce over their own groups"
    return None


def _keep_gradient_in_place(param, group_index) -> None:
    """DeepSpeed's per-gradient bucketing call, on one rank: the gradient stays in ``param.grad``."""
