"""What every command line of bmc-fast shares: one-line errors, exit codes, flags derived from a config.

- ``ArgumentParser`` reports a bad flag in one line (``prog: error: argument --loader: invalid choice:
  ...``) and exits 2, without argparse's usage block.
- ``run_main(main)`` runs a CLI's ``main`` under ``if __name__ == "__main__"``: a ``ConfigError`` (bad
  input) becomes ``error: <message>`` and exit status 2, a ``DataError`` (bad data) or ``TrainingError``
  (a diverged run) the same with exit status 1; none prints a traceback.
- ``read_json_object`` reads a JSON file the user named (a preset, a DeepSpeed config, labels, a result),
  and ``check_output_file`` and ``check_output_dir`` refuse an output path that cannot be written (a directory
  where a file goes, a missing directory, a file in the path) before any work, naming the flag.
- ``option(...)`` declares a typed config field with its CLI help and choices, and
  ``add_config_arguments`` turns such a dataclass into flags, so an option is written once: in its config.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from bmc_fast.errors import EXIT_PREEMPTED, ConfigError, DataError, Preempted, TrainingError

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
    """Call ``main()``; bad input exits 2, bad data or a diverged run exits 1, a preempted run 75 (``Preempted``),
    each with one line on stderr."""
    try:
        main()
    except Preempted as stop:
        sys.stderr.write(f"{one_line(stop)}\n")
        sys.exit(EXIT_PREEMPTED)
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


def read_json_object(path: str | Path, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in the file ``path``; otherwise ``ConfigError`` that starts with ``what`` (the flag and
    its value) and ends with ``fix``: the file cannot be read or is not JSON, or its JSON is not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # missing, unreadable, not UTF-8, not JSON
        raise ConfigError(f"{what} is not a readable JSON file ({error}): {fix}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{what} holds a JSON {type(data).__name__}, not an object: {fix}")
    return data


def check_output_file(path: str | Path, flag: str, example_name: str | None = None) -> Path:
    """``path`` as a ``Path`` if a file can be written there (not a directory; its directory exists and is
    writable); otherwise ``ConfigError`` naming ``flag``. ``example_name``: the file name the message
    suggests inside ``path`` when ``path`` is a directory."""
    out = Path(path)
    if out.is_dir():
        example = f", e.g. {str(out / example_name)!r}" if example_name else ""
        raise ConfigError(f"{flag} {str(path)!r} is a directory: pass a file path{example}")
    if not out.parent.is_dir():
        base = _existing_part(out.parent)
        if base.is_dir():
            raise ConfigError(f"{flag} {str(path)!r}: the directory {str(out.parent)!r} does not exist: create it or "
                              "pass a path in an existing directory")
        raise ConfigError(f"{flag} {str(path)!r}: {str(base)!r} is a file, not a directory: pass a path in an "
                          "existing directory")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {str(path)!r}: the directory {str(out.parent)!r} is not writable: pass a path in "
                          "a directory you can write")
    return out


def check_output_dir(path: str | Path, flag: str, create: bool = True) -> Path:
    """``path`` as a ``Path`` once it is a directory (``create``, made with its parents) or can become one
    (``create=False``: nothing is made, e.g. on every rank or before a long step); otherwise ``ConfigError``
    naming ``flag``: ``path`` is a file, a file stands in its path, or it cannot be written."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a file: pass a new or existing directory")
    base = _existing_part(out)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {str(path)!r} cannot be written: {str(base)!r} is "
                          f"{'a file' if not base.is_dir() else 'not writable'}: pass a new or existing directory with "
                          "no file in its path")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # what the checks above cannot see, e.g. a dangling link
            raise ConfigError(f"{flag} {str(path)!r} cannot be created as a directory ({error.strerror}): pass a new "
                              "or existing directory with no file in its path") from error
    return out


def _existing_part(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (a relative path ends at the working directory)."""
    return next((p for p in (path, *path.parents) if p.exists()), Path("."))


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
