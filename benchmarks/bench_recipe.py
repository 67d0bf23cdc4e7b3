"""Fine-tuning recipes: a DeepSpeed ZeRO-2 training step of each against the full model's, side by side.

    python benchmarks/bench_recipe.py [--rounds 7] [--batch 32] [--out benchmarks/results/recipe_cpu]

Each recipe is the trainer's own set-up of its flags (``trainer.param_groups``: ``lock_towers``, ``param_groups``):
the full model (two optimizer groups), ``--layer-decay 0.8 --lr-text-scale 0.5`` (a group per layer and tower),
``--lock-image`` (the image tower without a backward graph), ``--lock-image --lock-image-unlocked-groups 1``
(its projection trains), ``--lock-text``. Model: the ``tiny`` preset widened to a mid-size shape (ViT 96 px /
patch 8, width 256, 6 layers; ModernBERT hidden 256, 6 layers), fp32, captions of 32–128 tokens, the fused CLIP
loss; one process, one rank (gloo), one engine per recipe built up front. The steps are interleaved round by
round (every recipe once a round, on the same batch) and each recipe's median step is reported with its ratio to
the full model's, the trainable parameters and the Adam state.

Writes ``OUT.{json,md}``.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from bench_accumulation import SHAPE
from report import machine, write_report

from bmc_fast.cli import ArgumentParser, positive_int, run_main

RESULTS = Path(__file__).parent / "results"
RECIPES = {  # name: the TrainConfig flags
    "full": {},
    "layer decay 0.8, text × 0.5": {"layer_decay": 0.8, "lr_text_scale": 0.5},
    "lock image": {"lock_image": True},
    "lock image, projection trains": {"lock_image": True, "lock_image_unlocked_groups": 1},
    "lock text": {"lock_text": True},
}
TINY = {"context_length": 128}  # --shape tiny: the preset itself (the suite's quick run of this script)
TEXT_IDS = {"vocab_size": 1024, "pad_token_id": 0, "cls_token_id": 1, "sep_token_id": 2}


def build(flags: dict, shape: dict, ds_config: dict):
    """(engine, trainable parameters, param groups) of one recipe: the model seeded alike for every recipe."""
    import deepspeed
    import torch

    from bmc_fast.model.clip import BMCLongCLIP
    from bmc_fast.model.config import load_model_config
    from bmc_fast.trainer.config import TrainConfig
    from bmc_fast.trainer.param_groups import lock_towers, param_groups, with_group_schedule

    torch.manual_seed(0)
    shape = {**shape, "text": {**shape.get("text", {}), **TEXT_IDS}}
    model = BMCLongCLIP(load_model_config("tiny", **shape))
    cfg = TrainConfig(**flags)
    lock_towers(model, cfg)
    groups = param_groups(model, cfg.lr_scales, ds_config["optimizer"]["params"]["lr"])
    config = with_group_schedule(ds_config, groups)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    return engine, sum(p.numel() for p in model.parameters() if p.requires_grad), len(groups)


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=7, help="timed steps of every recipe, interleaved")
    parser.add_argument("--batch", type=positive_int, default=32, help="pairs per step")
    parser.add_argument("--shape", choices=("mid", "tiny"), default="mid", help="mid: the documented shape; tiny: "
                        "the tiny preset (the suite's quick run)")
    parser.add_argument("--out", default=str(RESULTS / "recipe_cpu"), help="results path without suffix")
    args = parser.parse_args(argv)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29517")
    import deepspeed
    import torch

    from bmc_fast.kernels import FusedClipLoss

    deepspeed.init_distributed(dist_backend="gloo")
    shape = SHAPE if args.shape == "mid" else TINY
    ds_config = {"train_batch_size": args.batch, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.2, "torch_adam": True}},
                 "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 1000, "warmup_num_steps": 10}},
                 "steps_per_print": 10 ** 9}
    engines = {name: build(flags, shape, ds_config) for name, flags in RECIPES.items()}
    size, context = (SHAPE["vision"]["image_size"], SHAPE["context_length"]) if args.shape == "mid" else (64, 128)
    torch.manual_seed(1)
    lengths = torch.randint(32, context + 1, (args.batch,))
    mask = (torch.arange(context) < lengths[:, None]).long()
    ids = torch.randint(3, TEXT_IDS["vocab_size"], (args.batch, context)) * mask
    pixels = torch.randn(args.batch, 3, size, size)
    loss_fn = FusedClipLoss()

    def step(engine) -> float:
        start = time.perf_counter()
        loss = loss_fn(*engine(pixels, ids, mask))
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - start

    seconds = {name: [] for name in RECIPES}
    for engine, _, _ in engines.values():
        step(engine)  # warm-up: thread pools, allocator, the optimizer's state
    for _ in range(args.rounds):
        for name, (engine, _, _) in engines.items():
            seconds[name].append(step(engine))
        sys.stderr.write(" ".join(f"{name}: {s[-1]:.3f}s" for name, s in seconds.items()) + "\n")
    full = statistics.median(seconds["full"])
    rows = []
    for name, (engine, trainable, n_groups) in engines.items():
        adam = engine.optimizer.optimizer.state.values()
        moments = sum(v.numel() * v.element_size() for st in adam for k, v in st.items() if k.startswith("exp_avg"))
        rows.append({"recipe": name, "flags": RECIPES[name], "median_s": statistics.median(seconds[name]),
                     "seconds": seconds[name], "ratio_to_full": statistics.median(seconds[name]) / full,
                     "trainable": trainable, "param_groups": n_groups, "adam_state_bytes": moments})
    result = {"what": " ".join(__doc__.split("\n\n")[2].split()), "machine": machine("cpu"), "batch": args.batch,
              "shape": args.shape, "rounds": args.rounds, "rows": rows}
    table = [[r["recipe"], str(r["param_groups"]), f"{r['trainable'] / 1e6:.2f}M",
              f"{r['adam_state_bytes'] / 2 ** 20:.1f}", f"{r['median_s']:.3f}", f"{r['ratio_to_full']:.2f}"]
             for r in rows]
    write_report(Path(args.out), result,
                 f"One ZeRO-2 training step of each recipe, {args.shape} shape, batch {args.batch}, fp32, median of "
                 f"{args.rounds} interleaved rounds on {result['machine']['cores']} CPU cores "
                 f"({result['machine']['cpu_model']}, torch {result['machine']['torch']}).",
                 ["recipe", "param groups", "trainable", "Adam state MiB", "step s", "step / full"], table)
    return result


if __name__ == "__main__":
    run_main(main)
