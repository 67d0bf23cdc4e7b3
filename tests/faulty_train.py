"""``bmc_fast/train.py`` with a fault injected, for the tests; the deepspeed launcher runs it as train.py.

    BMC_FAST_TEST_KILL="RANK:STEP"            rank RANK kills itself with SIGKILL as step STEP begins
                                              (a preempted job, a lost node)
    BMC_FAST_TEST_SIGNAL="RANK:STEP"          rank RANK sends itself SIGUSR1 as step STEP begins (a preemption
                                              notice that reached one rank)
    BMC_FAST_TEST_NONFINITE="RANK:S1,S2,..."  rank RANK's loss gets +inf added at steps S1, S2, ... (its
                                              gradients stay finite: only the guard can catch it)
    BMC_FAST_TEST_MOMENTS=DIR                 not a fault: DeepSpeed's full fp32 Adam moments of every parameter
                                              (``safe_get_full_optimizer_state``, all ranks together) go to
                                              DIR/saved-<step>.pt after each checkpoint and, in a resumed run,
                                              to DIR/loaded-<step>.pt right after the checkpoint is loaded
"""
import os
import runpy
import signal
import sys
from pathlib import Path

import bmc_fast.trainer.loop as loop


def _fault(name: str) -> tuple[int, set[int]] | None:
    if not (value := os.environ.get(name)):
        return None
    rank, steps = value.split(":")
    return int(rank), {int(step) for step in steps.split(",")}


def main() -> None:
    kill, nonfinite = _fault("BMC_FAST_TEST_KILL"), _fault("BMC_FAST_TEST_NONFINITE")
    notice = _fault("BMC_FAST_TEST_SIGNAL")
    rank = int(os.environ["RANK"])
    current = {"step": 0}
    train_step = loop.train_step

    def faulty_train_step(s, step):
        current["step"] = step
        if kill and rank == kill[0] and step in kill[1]:
            os.kill(os.getpid(), signal.SIGKILL)
        if notice and rank == notice[0] and step in notice[1]:
            os.kill(os.getpid(), signal.SIGUSR1)
        return train_step(s, step)

    start = loop.start

    def poison(loss_fn):
        def poisoned(*args):
            loss = loss_fn(*args)
            return loss + float("inf") if current["step"] in nonfinite[1] else loss

        return poisoned

    def faulty_start(p, hooks=None):
        if nonfinite and rank == nonfinite[0]:
            hooks = loop.StepHooks(loss=poison)
        return start(p, hooks)

    moments = os.environ.get("BMC_FAST_TEST_MOMENTS")
    save = loop.save

    def save_and_dump(s, step):
        save(s, step)
        _dump_moments(s, Path(moments) / f"saved-{step}.pt", rank)

    def start_and_dump(p, hooks=None):
        session = faulty_start(p, hooks)
        if p.cfg.resume:
            _dump_moments(session, Path(moments) / f"loaded-{session.first_step - 1}.pt", rank)
        return session

    loop.train_step, loop.start = faulty_train_step, start_and_dump if moments else faulty_start
    if moments:
        loop.save = save_and_dump
    script = Path(__file__).resolve().parent.parent / "bmc_fast" / "train.py"
    sys.argv[0] = str(script)
    runpy.run_path(str(script), run_name="__main__")


def _dump_moments(session, path: Path, rank: int) -> None:
    """Every parameter's fp32 Adam moments, gathered whole (a collective: every rank calls it); rank 0 saves them."""
    import torch
    from deepspeed.utils import safe_get_full_optimizer_state

    optimizer = session.engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 (DeepSpeed 0.19.8) links each parameter to its optimizer state once, right after the first
        # param group's first step, before the second group has any state: link again, now that all groups have it
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    moments = {name: {key: safe_get_full_optimizer_state(param, key).clone() for key in ("exp_avg", "exp_avg_sq")}
               for name, param in session.engine.module.named_parameters() if param.requires_grad}  # locked: none
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(moments, path)


if __name__ == "__main__":
    main()
