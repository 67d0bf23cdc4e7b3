"""The two error types of bad data and bad input, apart from the modules that raise them.

``ConfigError`` is bad user input found before or while a run starts: a flag, a config field, a file
that is missing or malformed. Its message names the flag or field, what was expected, what was given,
and the fix; every CLI turns it into one line on stderr and exit status 2.

``DataError`` is a failure of the data itself found while a run reads it (e.g. a loader worker that
meets no usable sample in a whole pass over its shards). ``TrainingError`` is a run that cannot go on
(its loss or weights became non-finite). The CLIs report either in one line too, with exit status 1:
the flags were fine, the data or the optimisation were not.
"""


class ConfigError(ValueError):
    """Bad user input (a flag, a config field, a file): the message names it and says how to fix it."""


class DataError(RuntimeError):
    """The data a run reads cannot serve it (raised while reading, possibly in a loader worker)."""


class TrainingError(RuntimeError):
    """A run that cannot go on: its loss or weights became non-finite (nothing of it is saved after that)."""
