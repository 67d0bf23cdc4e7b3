"""Every command line: a bad flag is one line on stderr naming the flag, exit status 2, no traceback."""
import subprocess
import sys

import pytest

from bmc_fast.cli import one_line, run_main
from bmc_fast.errors import ConfigError, DataError
from helpers import REPO

# (command after `python`, the flag the message must name). The first case of each CLI is refused by the
# parser (type or choice), the second, where there is one, by the CLI's own checks (ConfigError).
BAD_FLAGS = [
    (["bmc_fast/train.py", "--loader", "bogus"], "--loader"),
    (["bmc_fast/train.py", "--max-steps", "0"], "--max-steps"),
    (["-m", "bmc_fast.eval.retrieval", "--checkpoint", "runs/x", "--data", "x.tar", "--batch-size", "0"],
     "--batch-size"),
    (["-m", "bmc_fast.eval.retrieval", "--checkpoint", "/nowhere", "--data", "x.tar"], "--checkpoint"),
    (["-m", "bmc_fast.export", "/nowhere", "/tmp/bmc-export"], "/nowhere"),
    (["-m", "bmc_fast.eval.zeroshot", "--model", "runs/x", "--data", "a=b", "--choices", "0"], "--choices"),
    (["-m", "bmc_fast.data.index", "/nowhere/shard-{000000..000003}.tar", "--bogus"], "--bogus"),
    (["-m", "bmc_fast.data.index", "/nowhere/shard-{000000..000003}.tar"], "shards"),
    (["-m", "bmc_fast.data.token_stats", "--tokenizer", "t", "--data", "d.jsonl", "--cutoffs", "x"], "--cutoffs"),
    (["-m", "bmc_fast.data.token_stats", "--tokenizer", "t", "--data", "d.jsonl", "--cutoffs", "0"], "--cutoffs"),
    (["-m", "bmc_fast.data.synthetic", "--out", "x", "--train-samples", "0"], "--train-samples"),
    (["-m", "bmc_fast.data.synthetic", "--out", "x", "--eval-samples", "1"], "--eval-samples"),
    (["-m", "bmc_fast.trainer.demo", "--seed", "one"], "--seed"),
    (["-m", "bmc_fast.trainer.demo", "--ranks", "0"], "--ranks"),
    (["-m", "bmc_fast.trainer.demo", "--ds_config", "/nowhere.json"], "--ds_config"),
    (["bmc_fast/train.py", "--resume", "sometimes"], "--resume"),
    (["benchmarks/bench_accumulation.py", "--micro", "0"], "--micro"),
    (["benchmarks/bench_context.py", "--seeds", "x"], "--seeds"),
    (["benchmarks/bench_data.py", "--batch", "0"], "--batch"),
    (["benchmarks/bench_loss.py", "--impls", "bogus"], "--impls"),
    (["benchmarks/bench_text.py", "--repeats", "0"], "--repeats"),
]


@pytest.mark.slow
@pytest.mark.parametrize("command,flag", BAD_FLAGS, ids=[" ".join(c[:2] + c[-2:]) for c, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_naming_it_and_exit_2(command, flag):
    proc = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert flag in lines[0] and "error" in lines[0], lines[0]


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
