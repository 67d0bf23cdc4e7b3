"""The context-length ablation of BMC-LongCLIP, on the embedded synthetic data, on CPU.

    python -m bmc_fast.trainer.demo --out runs/demo

Trains the ``tiny`` model twice with the real ``deepspeed`` launcher on 2 ranks, at context 77 and
512 with everything else equal, evaluates both with ``bmc_fast.eval.retrieval`` and zero-shot
(``bmc_fast.eval.zeroshot``: the modality and the first lesion's colour, 3 choices and all classes), and
writes ``OUT/summary.json``: ``{"ctx77": {t2i_r1 ..., zeroshot_modality ...}, "ctx512": {...}}``. The
captions' findings start
after ~100 tokens of preamble, so a 77-token model cannot read them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from bmc_fast.cli import ArgumentParser, check_output_dir, run_main
from bmc_fast.ds_json import load_ds_config
from bmc_fast.errors import ConfigError, TrainingError
from bmc_fast.trainer.distributed import free_port

_logger = logging.getLogger(__name__)

CONTEXTS = (77, 512)
# Zero-shot tasks drawn from the captions' own attributes (each eval sample's .json): the modality, which
# the preamble names within 77 tokens, and the first lesion's colour, which only the findings name.
ZEROSHOT_TASKS = {"modality": "modality", "colour": "lesions.0.colour"}
ZEROSHOT_TEMPLATES = {"modality": ("{}",), "colour": ("a {} lesion", "{}")}


def _launcher() -> list[str]:
    script = Path(sys.executable).parent / "deepspeed"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def train_one(context_length: int, run_dir: Path, args: argparse.Namespace) -> None:
    train_script = Path(__file__).resolve().parent.parent / "train.py"  # bmc_fast/train.py
    command = _launcher() + [
        "--num_gpus", str(args.ranks), "--master_port", str(free_port()), str(train_script),
        "--ds_config", args.ds_config, "--context-length", str(context_length), "--seed", str(args.seed),
        "--output-dir", str(run_dir), "--overwrite", "--eval-every", "0", "--log-every", "25",
    ]
    if args.max_steps:
        command += ["--max-steps", str(args.max_steps)]
    _logger.info("ctx%d: %s", context_length, " ".join(command))
    log = run_dir.parent / f"ctx{context_length}.log"
    with open(log, "w") as sink:
        code = subprocess.call(command, stdout=sink, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log.read_text()[-3000:]
        raise TrainingError(f"training at context {context_length} failed (exit {code}); see {log}: {tail}")


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description="Context-length ablation (77 vs 512) on the embedded data.")
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--ds_config", "--ds-config", dest="ds_config", default="ds_configs/zero2.json")
    parser.add_argument("--ranks", type=int, default=2, help="processes for the deepspeed launcher")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the DeepSpeed JSON's schedule")
    parser.add_argument("--seed", type=int, default=0, help="dataset, init and data-order seed")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        raise ConfigError(f"--ranks must be >= 1 (processes for the deepspeed launcher), got {args.ranks}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
    load_ds_config(args.ds_config)  # a missing or malformed JSON stops here, not in each launch
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from bmc_fast.checkpoint.load import load_run
    from bmc_fast.data.default_data import ensure_default_data
    from bmc_fast.data.transforms import image_transform
    from bmc_fast.eval import zeroshot
    from bmc_fast.eval.labelled_images import load_labelled_images
    from bmc_fast.eval.retrieval import evaluate_shards, format_table
    from bmc_fast.eval.zeroshot import bmc_fast_encoder

    out = check_output_dir(args.out, "--out")
    data = ensure_default_data(seed=args.seed)
    summary, started = {}, time.perf_counter()
    zeroshot_sets = [load_labelled_images(name, data.eval, key) for name, key in ZEROSHOT_TASKS.items()]
    zeroshot_results = {}
    for context_length in CONTEXTS:
        run_dir = out / f"ctx{context_length}"
        train_one(context_length, run_dir, args)
        model, tokenizer, model_cfg = load_run(run_dir)
        summary[f"ctx{context_length}"] = evaluate_shards(model, tokenizer, model_cfg, data.eval)
        encoder = bmc_fast_encoder(model, tokenizer, image_transform(model_cfg.vision.image_size, train=False))
        for task in zeroshot_sets:  # 2 distractors: 3 choices, on 4 modalities and 6 colours alike
            result = zeroshot.evaluate(encoder, task, k=2, seed=args.seed, templates=ZEROSHOT_TEMPLATES[task.name])
            summary[f"ctx{context_length}"][f"zeroshot_{task.name}"] = {  # percent, as the recalls
                "multiple_choice": 100 * result["multiple_choice"]["accuracy"],
                "top1": 100 * result["all_classes"]["top1"]}
            zeroshot_results[f"ctx{context_length} {task.name}"] = result
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = format_table({name: {k: v for k, v in m.items() if not k.startswith("zeroshot_")}
                          for name, m in summary.items()})
    zeroshot_table = zeroshot.markdown(zeroshot_results, average=False)
    (out / "summary.md").write_text(table + "\n\nZero-shot (3 choices; all classes)\n\n" + zeroshot_table + "\n")
    ratio = summary["ctx512"]["t2i_r1"] / max(summary["ctx77"]["t2i_r1"], 1e-9)
    sys.stdout.write(f"\n{table}\n\n{zeroshot_table}\n\nT2I R@1 ctx512 / ctx77 = {ratio:.1f}x  "
                     f"({time.perf_counter() - started:.0f} s; {out / 'summary.json'})\n")
    return summary


if __name__ == "__main__":
    run_main(main)
