"""Every command line: a bad flag is one line on stderr naming the flag, exit status 2, no traceback; and
``--help`` prints the usage, exits 0 and writes nothing."""
import os
import re
import subprocess
import sys

import pytest
import torch

from bmc_fast.cli import check_output_dir, check_output_file, one_line, run_main
from bmc_fast.errors import ConfigError, DataError
from helpers import REPO, run_clis

A_FILE = "pyproject.toml"  # a regular file of the repository: a path under it cannot be created
A_LIST = "bmc_fast/data/synthetic_modalities.json"  # valid JSON, but a list
NO_GPU = not torch.cuda.is_available()

# (command after `python`, run from the repository root; the text the message must hold: the flag, or the
# flag and its point). The first case of each CLI is refused by the parser (type or choice), the others by
# the CLI's own checks (ConfigError), each before anything is loaded, trained or written.
BAD_FLAGS = [
    (["bmc_fast/train.py", "--loader", "bogus"], "--loader"),
    (["bmc_fast/train.py", "--max-steps", "0"], "--max-steps"),
    (["bmc_fast/train.py", "--context-length", "0"], "--context-length must be >= 3"),  # [CLS], [SEP], a token
    (["-m", "bmc_fast.eval.retrieval", "--checkpoint", "runs/x", "--data", "x.tar", "--batch-size", "0"],
     "--batch-size"),
    (["-m", "bmc_fast.eval.retrieval", "--checkpoint", "/nowhere", "--data", "x.tar"], "--checkpoint '/nowhere'"),
    (["-m", "bmc_fast.eval.retrieval", "--checkpoint", "runs/x", "--data", "x.tar", "--workers", "-1"], "--workers"),
    (["-m", "bmc_fast.eval.retrieval", "--checkpoint", "runs/x", "--data", "x.tar", "--json", "/nowhere/eval.json"],
     "--json"),
    (["-m", "bmc_fast.export", "/nowhere", "/tmp/bmc-export"], "run_dir '/nowhere'"),  # the positional, by name
    (["-m", "bmc_fast.eval.zeroshot", "--model", "runs/x", "--data", "a=b", "--choices", "0"], "--choices"),
    (["-m", "bmc_fast.eval.zeroshot", "--model", "runs/x", "--data", "a=b", "--labels", "/nowhere.json"],
     "--labels"),
    (["-m", "bmc_fast.eval.zeroshot", "--model", "runs/x", "--data", "a=b", "--labels", "README.md"], "--labels"),
    (["-m", "bmc_fast.eval.zeroshot", "--model", "runs/x", "--data", "a=b", "--labels", A_LIST], "--labels"),
    (["-m", "bmc_fast.data.index", "/nowhere/shard-{000000..000003}.tar", "--bogus"], "--bogus"),
    (["-m", "bmc_fast.data.index", "/nowhere/shard-{000000..000003}.tar"], "shards"),
    (["-m", "bmc_fast.data.index", "x.tar", "--report", "/nowhere/report.json"], "--report"),
    (["-m", "bmc_fast.data.token_stats", "--tokenizer", "t", "--data", "d.jsonl", "--cutoffs", "x"], "--cutoffs"),
    (["-m", "bmc_fast.data.token_stats", "--tokenizer", "t", "--data", "d.jsonl", "--cutoffs", "0"], "--cutoffs"),
    (["-m", "bmc_fast.data.synthetic", "--out", "x", "--train-samples", "0"], "--train-samples"),
    (["-m", "bmc_fast.data.synthetic", "--out", "x", "--eval-samples", "1"], "--eval-samples"),
    (["-m", "bmc_fast.data.synthetic", "--out", f"{A_FILE}/x"], f"--out '{A_FILE}/x'"),
    (["-m", "bmc_fast.data.token_stats", "--tokenizer", "t", "--data", "d.jsonl", "--json", "/nowhere/s.json"],
     "--json"),
    (["-m", "bmc_fast.trainer.demo", "--seed", "one"], "--seed"),
    (["-m", "bmc_fast.trainer.demo", "--ranks", "0"], "--ranks"),
    (["-m", "bmc_fast.trainer.demo", "--ds_config", "/nowhere.json"], "--ds_config"),
    (["-m", "bmc_fast.trainer.demo", "--out", f"{A_FILE}/demo"], "--out"),
    (["bmc_fast/train.py", "--resume", "sometimes"], "--resume"),
    (["bmc_fast/train.py", "--preset", A_LIST], f"--preset '{A_LIST}' holds a JSON list"),
    (["bmc_fast/train.py", "--ds_config", "ds_configs"], "--ds_config 'ds_configs' is a directory"),
    (["-m", "bmc_fast.plan", "--preset", A_LIST, "--ds_config", "ds_configs/zero2.json", "--gpus", "1"],
     f"--preset '{A_LIST}' holds a JSON list"),
    (["-m", "bmc_fast.eval.zeroshot", "--model", "runs/x", "--data", "a=/nowhere"],
     "--data (zero-shot dataset 'a') '/nowhere' does not exist"),
    (["-m", "bmc_fast.eval.zeroshot", "--model", "runs/x", "--data", "a=/nowhere/shard-{000000..000001}.tar"],
     "--data (zero-shot dataset 'a') '/nowhere/shard-{000000..000001}.tar' matches no file"),
    (["-m", "bmc_fast.eval.retrieval", "--checkpoint", "runs/x", "--data", "x.tar", "--json", f"{A_FILE}/eval.json"],
     f"--json '{A_FILE}/eval.json': '{A_FILE}' is a file"),
    (["-m", "bmc_fast.trainer.demo", "--ds_config", "ds_configs"], "--ds_config 'ds_configs' is a directory"),
    (["benchmarks/bench_accumulation.py", "--micro", "0"], "--micro"),
    (["benchmarks/bench_context.py", "--seeds", "x"], "--seeds"),
    (["benchmarks/bench_context.py", "--max-steps", "0"], "--max-steps"),
    (["benchmarks/bench_context.py", "--from-json", "--out", "/nowhere/ablation"], "--from-json"),
    (["benchmarks/bench_data.py", "--batch", "0"], "--batch"),
    (["benchmarks/bench_loss.py", "--impls", "bogus"], "--impls"),
    (["benchmarks/bench_loss.py", "--rerender", "/nowhere.json"], "--rerender"),
    (["benchmarks/bench_loss.py", "--rerender", "README.md"], "--rerender"),
    (["benchmarks/bench_loss.py", "--memory-fraction", "0"], "--memory-fraction"),
    (["benchmarks/bench_preemption.py", "--repeats", "0"], "--repeats"),
    (["benchmarks/bench_preemption.py", "--out", "/nowhere/preemption"], "--out"),
    (["benchmarks/bench_text.py", "--repeats", "0"], "--repeats"),
    (["benchmarks/bench_text.py", "--device", "gpu"], "--device"),
    (["benchmarks/bench_tokens.py", "--tokenizer", "/nowhere"], "--tokenizer"),
    (["benchmarks/bench_tokens.py", "--out", "/nowhere/token_waste"], "--out"),
    (["benchmarks/bench_train.py", "--ds_config", "/nowhere.json"], "--ds_config"),
    (["benchmarks/bench_train.py", "--timeout", "0"], "--timeout"),
    (["benchmarks/bench_train.py", "--preset", A_LIST], f"--preset '{A_LIST}' holds a JSON list"),
    (["benchmarks/bench_train.py", "--suite", "quick", "--rerender", "--out", "/nowhere/train"], "--rerender"),
] + [([script, "--device", "cuda"], "--device cuda") for script in  # a GPU asked for where there is none
     ("benchmarks/bench_data.py", "benchmarks/bench_loss.py", "benchmarks/bench_text.py") if NO_GPU]


def one_error_line(result: dict) -> str | None:
    """The run's one stderr line when it exited 2 with one line holding "error" and no traceback, else None."""
    lines = result["stderr"].strip().splitlines()
    ok = result["code"] == 2 and "Traceback" not in result["stderr"] and len(lines) == 1 and "error" in lines[0]
    return lines[0] if ok else None


# As BAD_FLAGS, for a bad file the case writes: (command with {file} for its path, the file's text, the text the
# message must hold, with {file} for the path).
BAD_FILES = [
    ([*script, "--preset", "{file}", *extra], "{", "--preset '{file}' is not a readable JSON file")
    for script, extra in ((["bmc_fast/train.py"], []), (["benchmarks/bench_train.py"], []),
                          (["-m", "bmc_fast.plan"], ["--ds_config", "ds_configs/zero2.json", "--gpus", "1"]))
]


@pytest.mark.slow
def test_a_bad_flag_or_file_is_one_line_naming_it_and_exit_2(tmp_path):
    """Every case of BAD_FLAGS and BAD_FILES, and --output-dir under a file (checked first, on every rank,
    creating nothing, not when rank 0 makes it after the model is built)."""
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    cases = BAD_FLAGS + [([part.replace("{file}", str(tmp_path / "bad.json")) for part in command],
                          flag.replace("{file}", str(tmp_path / "bad.json"))) for command, _, flag in BAD_FILES] + [
        (["bmc_fast/train.py", "--output-dir", str(out)],
         f"error: --output-dir {str(out)!r} cannot be written: {str(tmp_path / 'file')!r} is a file: pass a new or "
         "existing directory with no file in its path")]
    failures = [f"python {' '.join(command)}: expected one line naming {flag!r}, exit 2; got exit {r['code']}:\n"
                f"{r['stderr'][-2000:]}" for (command, flag), r in zip(cases, run_clis([c for c, _ in cases]))
                if (line := one_error_line(r)) is None or flag not in line]
    assert not failures, "\n\n".join(failures)


def test_the_driver_runs_a_command_as_python_does(tmp_path):
    """tests/cli_driver.py against real interpreters, on a bad flag of a script and --help of a module."""
    commands = [["bmc_fast/train.py", "--max-steps", "0"], ["-m", "bmc_fast.data.synthetic", "--help"]]
    driven = run_clis(commands)
    for command, result in zip(commands, driven):
        proc = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert (result["code"], result["stdout"], result["stderr"]) == (proc.returncode, proc.stdout, proc.stderr)
    assert driven[0]["code"] == 2 and driven[1]["code"] == 0


def test_output_path_checks_name_the_flag_and_the_reason(tmp_path):
    (tmp_path / "file").write_text("")
    checks = [
        (check_output_file, tmp_path, "is a directory: pass a file path, e.g. '.*out.json'"),
        (check_output_file, tmp_path / "absent" / "out.json", "the directory '.*absent' does not exist: create it"),
        (check_output_file, tmp_path / "file" / "out.json", "'.*file' is a file, not a directory"),
        (check_output_dir, tmp_path / "file", "is a file: pass a new or existing directory"),
        (check_output_dir, tmp_path / "file" / "a" / "b", "cannot be written: '.*file' is a file"),
    ]
    for check, path, message in checks:
        kwargs = {"example_name": "out.json"} if check is check_output_file else {}
        with pytest.raises(ConfigError, match=f"^--out {re.escape(repr(str(path)))}:? .*{message}"):
            check(path, "--out", **kwargs)
    assert check_output_file(tmp_path / "out.json", "--out") == tmp_path / "out.json"
    assert check_output_dir(tmp_path / "new" / "dir", "--out", create=False) == tmp_path / "new" / "dir"
    assert not (tmp_path / "new").exists()  # create=False only checks
    assert check_output_dir(tmp_path / "new" / "dir", "--out").is_dir()


# Every command line, as run from anywhere: an installed module, or a script by its path.
CLIS = [[str(REPO / "bmc_fast" / "train.py")]] + [
    ["-m", f"bmc_fast.{module}"] for module in ("eval.retrieval", "eval.zeroshot", "export", "plan", "data.index",
                                                 "data.token_stats", "data.synthetic", "trainer.demo",
                                                 "kernels.compile_report")] + [
    [str(REPO / "benchmarks" / name)] for name in ("bench_accumulation.py", "bench_context.py", "bench_data.py",
                                                   "bench_loss.py", "bench_plan.py", "bench_preemption.py",
                                                   "bench_recipe.py", "bench_text.py",
                                                   "bench_tokens.py", "bench_train.py", "paper_gpus.py",
                                                   "run_all.py", "gpu_check.py", "gpu_steps.py", "gpu_wheelhouse.py")]
HELP_ELSEWHERE = {"readme_tables.py"}  # its --help is tested with its own fixes


def test_every_benchmark_script_is_in_the_help_table():
    scripts = {path.name for path in (REPO / "benchmarks").glob("*.py") if '__name__ == "__main__"' in path.read_text()}
    assert scripts - HELP_ELSEWHERE == {command[0].rpartition("/")[2] for command in CLIS if "benchmarks" in command[0]}


@pytest.mark.slow
def test_help_prints_usage_exits_0_and_writes_nothing(tmp_path):
    """From an empty directory (the installed package) and, for ``python -m``, from the repository root, which
    puts the root first on sys.path beside kernels/ and dali_pipelines/."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    modules = [command for command in CLIS if command[0] == "-m"]
    before = sorted(p.name for p in REPO.iterdir())
    runs = [(command, "elsewhere", r) for command, r in zip(CLIS, run_clis([[*c, "--help"] for c in CLIS], tmp_path,
                                                                             env))]
    runs += [(command, "the root", r) for command, r in zip(modules, run_clis([[*c, "--help"] for c in modules]))]
    failures = [f"{' '.join(command)} --help from {where}: exit {r['code']}\n{r['stdout'][:200]}{r['stderr'][-2000:]}"
                for command, where, r in runs
                if r["code"] != 0 or not r["stdout"].startswith("usage:") or "Traceback" in r["stderr"]]
    assert not failures, "\n\n".join(failures)
    assert list(tmp_path.iterdir()) == [] and sorted(p.name for p in REPO.iterdir()) == before


def test_run_main_exit_codes_bad_input_2_bad_data_1(capsys):
    def bad_input():
        raise ConfigError("--loader must be one of auto, dali, pil; got 'x'")

    def bad_data():
        raise DataError("all 6 sample(s) of a full pass over 2 shard(s) were skipped")

    for main, code, text in ((bad_input, 2, "--loader must be"), (bad_data, 1, "all 6 sample(s)")):
        with pytest.raises(SystemExit) as exit_info:
            run_main(main)
        assert exit_info.value.code == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {text}")


def test_a_data_error_from_a_loader_worker_loses_its_traceback_in_one_line():
    """torch re-raises a worker's exception as the same type with the worker's traceback in its text."""
    from torch._utils import ExceptionWrapper

    try:
        raise DataError("no usable sample in shard-000000.tar")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as error:
        wrapped.reraise()
    assert "Traceback" in str(error.value)
    assert one_line(error.value) == "no usable sample in shard-000000.tar"
