"""Run many command lines in one interpreter, as ``python ...`` would run each, and report what each did.

    python tests/cli_driver.py < commands.json > results.json

``commands.json``: a list of argument lists after ``python`` (``["-m", "bmc_fast.plan", "--help"]`` or
``["bmc_fast/train.py", "--max-steps", "0"]``), run from the working directory. Each runs as the interpreter
runs it (``runpy`` with ``run_name="__main__"``: the module's ``if __name__ == "__main__"`` block, the
script's folder first on ``sys.path``), with file descriptors 1 and 2 redirected, so everything printed,
logged or written by C code is captured; an exception that escapes prints its traceback as Python would.
The result of each: ``{"code": exit status, "stdout": ..., "stderr": ...}``. Starting Python, torch and
DeepSpeed once instead of once a command is what makes the CLI tests affordable.
"""
import json
import logging
import os
import runpy
import sys
import tempfile
import traceback


def run(command: list[str]) -> dict:
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    for handler in logging.root.handlers[:]:  # each CLI's logging.basicConfig binds this command's stderr
        logging.root.removeHandler(handler)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved_fds = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        code = 0
        try:
            if command[0] == "-m":  # `python -m` puts the working directory first on sys.path
                sys.argv = [command[1], *command[2:]]
                sys.path.insert(0, os.getcwd())
                sys.modules.pop(command[1], None)  # imported by an earlier command: `python -m` never has it
                runpy.run_module(command[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = command[:]
                sys.path.insert(0, os.path.dirname(os.path.abspath(command[0])))
                runpy.run_path(command[0], run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if not isinstance(exit_.code, int | None):
                sys.stderr.write(f"{exit_.code}\n")
        except BaseException:  # noqa: B036 - what would escape to the interpreter: print it as it would
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            sys.argv, sys.path[:] = saved_argv, saved_path
        out.seek(0)
        err.seek(0)
        return {"code": code, "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace")}


if __name__ == "__main__":
    del sys.path[0]  # this file's folder: each command puts its own entry first
    commands = json.load(sys.stdin)
    results = [run(command) for command in commands]
    sys.stdout.write(json.dumps(results))
