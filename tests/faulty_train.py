"""``bmc_fast/train.py`` with a fault injected, for the tests; the deepspeed launcher runs it as train.py.

    BMC_FAST_TEST_KILL="RANK:STEP"            rank RANK kills itself with SIGKILL as step STEP begins
                                              (a preempted job, a lost node)
    BMC_FAST_TEST_SIGNAL="RANK:STEP"          rank RANK sends itself SIGUSR1 as step STEP begins (a preemption
                                              notice that reached one rank)
    BMC_FAST_TEST_NONFINITE="RANK:S1,S2,..."  rank RANK's loss gets +inf added at steps S1, S2, ... (its
                                              gradients stay finite: only the guard can catch it)
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

    loop.train_step, loop.start = faulty_train_step, faulty_start
    script = Path(__file__).resolve().parent.parent / "bmc_fast" / "train.py"
    sys.argv[0] = str(script)
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
