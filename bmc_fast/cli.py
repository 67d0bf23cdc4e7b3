"""What every command line of bmc-fast shares: one-line errors, exit codes, flags derived from a config.

- ``ArgumentParser`` reports a bad flag in one line (``prog: error: argument --loader: invalid choice:
  ...``) and exits 2, without argparse's usage block.
- ``run_main(main)`` runs a CLI's ``main`` under ``if __name__ == "__main__"``: a ``ConfigError`` (bad
  input) becomes ``error: <message>`` and exit status 2, a ``DataError`` (bad data) or ``TrainingError``
  (a diverged run) the same with exit status 1; none prints a traceback.
- ``option(...)`` declares a typed config field with its CLI help and choices, and
  ``add_config_arguments`` turns such a dataclass into flags, so an option is written once: in its config.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, NoReturn

from bmc_fast.errors import ConfigError, DataError, TrainingError

WORKER_TRACEBACK = "Original Traceback"  # torch re-raises a worker's exception with its traceback in the text


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line on stderr and exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)  # --max would silently mean --max-steps
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(error: Exception) -> str:
    """The message of ``error`` on one line; for an exception re-raised from a DataLoader worker, the
    original message without the worker's traceback."""
    text = str(error)
    if WORKER_TRACEBACK in text:
        text = text.rpartition(f"{type(error).__name__}: ")[2]
    return " ".join(text.split())


def run_main(main: Callable[[], Any]) -> None:
    """Call ``main()``; bad input exits 2, bad data or a diverged run exits 1, each with one line on stderr."""
    try:
        main()
    except ConfigError as error:
        sys.stderr.write(f"error: {one_line(error)}\n")
        sys.exit(2)
    except (DataError, TrainingError) as error:
        sys.stderr.write(f"error: {one_line(error)}\n")
        sys.exit(1)


def positive_int(text: str) -> int:
    """argparse ``type`` of a count: an integer >= 1 (the error names the flag: ``argument --batch: ...``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def option(default: Any = None, help: str = "", *, choices: tuple[str, ...] | None = None,
           flags: tuple[str, ...] = (), negate: str | None = None, const: Any = None) -> Any:
    """A dataclass field that is also a command-line flag (see ``add_config_arguments``).

    A ``tuple[str, ...]`` field is a repeatable flag (each use appends one value; default ``()``).
    ``flags``: the flag names (default ``--field-name``); ``choices``: the legal values, checked by the
    parser and by the config's own validation; ``negate``: for a ``bool | None`` field, the name of a flag
    that sets it False (``--no-text-unpad``); ``const``: the value of the flag given without one
    (``--resume`` = ``--resume latest``). A field declared without ``option`` has no flag.
    """
    metadata = {"help": help, "choices": choices, "flags": flags, "negate": negate, "const": const}
    return dataclasses.field(default=default, metadata=metadata)


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per ``option`` field of ``config_cls``: its type, default, help and choices."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        if "help" not in meta:  # not an option(...) field
            continue
        flags = meta["flags"] or (f"--{f.name.replace('_', '-')}",)
        if hints[f.name] == tuple[str, ...]:
            parser.add_argument(*flags, dest=f.name, action="append", type=str, default=None,
                                help=meta["help"] + " (repeatable)")
            continue
        value_type = _scalar_type(hints[f.name], f.name)
        help_text = meta["help"] + (f" (default {f.default})" if f.default not in (None, False) else "")
        if meta["negate"]:
            parser.add_argument(meta["negate"], dest=f.name, action="store_const", const=False, default=f.default,
                                help=meta["help"])
            continue
        if value_type is bool:
            parser.add_argument(*flags, dest=f.name, action="store_true", help=meta["help"])
        else:
            optional_value = {"nargs": "?", "const": meta["const"]} if meta["const"] is not None else {}
            parser.add_argument(*flags, dest=f.name, type=value_type, default=f.default, choices=meta["choices"],
                                help=help_text, **optional_value)


def check_choice(obj: Any, name: str, allowed: tuple[str, ...], flag: str | None = None) -> None:
    """``ConfigError`` naming ``flag`` (default ``--name``) unless ``obj.name`` is one of ``allowed``."""
    value = getattr(obj, name)
    if value is not None and value not in allowed:
        flag = flag or f"--{name.replace('_', '-')}"
        raise ConfigError(f"{flag} must be one of {', '.join(allowed)}; got {value!r}")


def _scalar_type(hint: Any, name: str) -> type:
    """``int`` for ``int`` or ``int | None``; the one non-None type of a field's annotation."""
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [t for t in (typing.get_args(hint) if is_union else (hint,)) if t is not type(None)]
    if len(kinds) != 1 or kinds[0] not in (int, float, str, bool):
        raise TypeError(f"config field {name!r}: a CLI option must be int, float, str or bool (or None), or "
                        f"tuple[str, ...], got {hint}")
    return kinds[0]
