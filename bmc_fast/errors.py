"""The two error types of bad data and bad input, apart from the modules that raise them.

``ConfigError`` is bad user input found before or while a run starts: a flag, a config field, a file
that is missing or malformed. Its message names the flag or field, what was expected, what was given,
and the fix; every CLI turns it into one line on stderr and exit status 2.

``DataError`` is a failure of the data itself found while a run reads it (e.g. a loader worker that
meets no usable sample in a whole pass over its shards). ``TrainingError`` is a run that cannot go on
(its loss or weights became non-finite). The CLIs report either in one line too, with exit status 1:
the flags were fine, the data or the optimisation were not.

``Preempted`` is a run stopped on purpose by SIGUSR1/SIGTERM after saving where it stopped
(``bmc_fast/trainer/preemption.py``): exit status ``EXIT_PREEMPTED`` (75, ``EX_TEMPFAIL``), which a batch script
requeues.
"""

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, try again


class ConfigError(ValueError):
    """Bad user input (a flag, a config field, a file): the message names it and says how to fix it."""


class DataError(RuntimeError):
    """The data a run reads cannot serve it (raised while reading, possibly in a loader worker)."""


class TrainingError(RuntimeError):
    """A run that cannot go on: its loss or weights became non-finite (nothing of it is saved after that)."""


class Preempted(Exception):
    """A run stopped by a signal at ``step`` after saving checkpoint ``tag``: ``--resume auto`` continues it."""

    def __init__(self, step: int, signal_name: str, tag: str, seconds: float | None):
        when = f"{seconds:.2f} s after the signal" if seconds is not None else "signalled on another rank"
        super().__init__(f"stopped by {signal_name} at step {step} ({when}): checkpoint {tag} saved; exit status "
                         f"{EXIT_PREEMPTED}; continue with --resume auto")
        self.step, self.signal_name, self.tag, self.seconds = step, signal_name, tag, seconds
