"""Train BMC-LongCLIP with DeepSpeed.

    deepspeed bmc_fast/train.py --ds_config ds_configs/zero2.json                 # embedded data, tiny model
    deepspeed --num_gpus 8 bmc_fast/train.py --ds_config ds_configs/zero2.json \\
        --preset tiny --train-data 'shards/{000000..000999}.tar' --eval-data 'eval/{000000..000009}.tar' \\
        --tokenizer /path/to/modernbert-tokenizer --context-length 512

Every flag is checked before a model is built; see ``bmc_fast.training`` for what a run writes.
"""
import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script, Python put bmc_fast/ first on sys.path, where this package's modules would shadow
    # top-level packages of the same name. Import the installed package instead.
    _here = os.path.dirname(os.path.realpath(__file__))
    sys.path = [p for p in sys.path if os.path.realpath(p or ".") != _here]

import argparse  # noqa: E402
import dataclasses  # noqa: E402

from bmc_fast.config import ConfigError  # noqa: E402
from bmc_fast.training import DistEnv, TrainConfig, prepare, run  # noqa: E402


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Contrastive training of BMC-LongCLIP on DeepSpeed.",
                                     allow_abbrev=False)
    parser.add_argument("--ds_config", "--ds-config", dest="ds_config", default="ds_configs/zero2.json",
                        help="DeepSpeed JSON: batch size, optimizer, LR schedule, precision, ZeRO stage")
    parser.add_argument("--preset", default=_DEFAULTS["preset"], help="model preset name or JSON path")
    parser.add_argument("--train-data", help="WebDataset shards; omit (with --eval-data) for the embedded data")
    parser.add_argument("--eval-data", help="WebDataset shards for retrieval evaluation")
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer directory")
    parser.add_argument("--context-length", type=int, help="text tokens per caption (77, 154, 512)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (default: the JSON's total_num_steps)")
    parser.add_argument("--eval-every", type=int, default=_DEFAULTS["eval_every"],
                        help="steps between evaluations (0: end only)")
    parser.add_argument("--save-every", type=int, default=_DEFAULTS["save_every"],
                        help="steps between checkpoints (0: end only)")
    parser.add_argument("--log-every", type=int, default=_DEFAULTS["log_every"], help="steps between metric lines")
    parser.add_argument("--output-dir", help="run directory (default runs/<preset>-ctx<N>-seed<S>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its latest checkpoint")
    parser.add_argument("--seed", type=int, default=_DEFAULTS["seed"], help="init and data-order seed")
    parser.add_argument("--workers", type=int, default=_DEFAULTS["workers"],
                        help="data loader processes (pil) or threads (dali) per rank")
    parser.add_argument("--loader", default=_DEFAULTS["loader"], choices=("auto", "dali", "pil"),
                        help="image decode + augmentation: DALI (GPU mixed / CPU) or webdataset + PIL")
    parser.add_argument("--loss-backend", default=_DEFAULTS["loss_backend"], choices=("auto", "triton", "torch"),
                        help="fused contrastive loss kernels (auto: Triton on CUDA, torch on CPU)")
    parser.add_argument("--image-weights", help="open_clip (visual.*) or timm ViT checkpoint for the image tower")
    parser.add_argument("--text-weights", help="Hugging Face ModernBERT directory for the text tower")
    parser.add_argument("--image-proj", choices=("pretrained", "linear"),
                        help="keep the checkpoint's image projection or start a fresh one")
    parser.add_argument("--attn-backend", choices=("auto", "flash", "sdpa", "eager"), help="attention kernels")
    parser.add_argument("--te-precision", choices=("none", "bf16", "fp8"), help="Transformer Engine layers (CUDA)")
    parser.add_argument("--no-text-unpad", dest="text_unpad", action="store_const", const=False, default=None,
                        help="pad captions instead of packing their real tokens")
    parser.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing, both towers")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, check everything, train. Bad input raises ``ConfigError`` before any model exists."""
    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank")  # the launcher also sets LOCAL_RANK in the environment, which is what we read
    env = DistEnv.from_environ()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenisation happens in loader workers
    from bmc_fast.run_logging import setup_logging

    setup_logging(env.rank)
    return run(prepare(TrainConfig(**args), env))


if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:
        sys.exit(f"error: {error}")
