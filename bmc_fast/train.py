"""Train BMC-LongCLIP with DeepSpeed: the thin script the launcher runs (the trainer is ``bmc_fast.trainer``).

    deepspeed bmc_fast/train.py --ds_config ds_configs/zero2.json                 # embedded data, tiny model
    deepspeed --num_gpus 8 bmc_fast/train.py --ds_config ds_configs/zero2.json \\
        --preset tiny --train-data 'shards/{000000..000999}.tar' --eval-data 'eval/{000000..000009}.tar' \\
        --tokenizer /path/to/modernbert-tokenizer --context-length 512

Every flag is a field of ``bmc_fast.trainer.config.TrainConfig`` and is checked before a model is built.
"""
import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script, Python put bmc_fast/ first on sys.path, where this package's modules would shadow
    # top-level packages of the same name. Import the installed package instead.
    _here = os.path.dirname(os.path.realpath(__file__))
    sys.path = [p for p in sys.path if os.path.realpath(p or ".") != _here]

import argparse

from bmc_fast.cli import ArgumentParser, add_config_arguments, run_main
from bmc_fast.trainer.config import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Contrastive training of BMC-LongCLIP on DeepSpeed.")
    add_config_arguments(parser, TrainConfig)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, check everything, train. Bad input raises ``ConfigError`` before any model exists."""
    from bmc_fast.trainer.distributed import DistEnv
    from bmc_fast.trainer.loop import run
    from bmc_fast.trainer.metrics import setup_logging
    from bmc_fast.trainer.prepare import prepare

    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank")  # the launcher also sets LOCAL_RANK in the environment, which is what we read
    env = DistEnv.from_environ()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenisation happens in loader workers
    setup_logging(env.rank)
    return run(prepare(TrainConfig(**args), env))


if __name__ == "__main__":
    run_main(main)
