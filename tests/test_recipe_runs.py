"""The recipe in the trainer's own steps: parameter-group rates on ZeRO 1/2/3, the optimizer's state of a locked
model, the sigmoid loss against open_clip's; then runs one after another (one interpreter, tests/cli_driver.py):
SigLIP on the demo data, its export, a warm start from it at step 0, locked towers."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, deepspeed_config, free_port, run_clis

pytestmark = pytest.mark.slow  # DeepSpeed engines in child processes

RECIPE = {"lock_image": True, "lock_image_unlocked_groups": 2, "lr_image_scale": 0.5, "lr_text_scale": 2.0,
          "layer_decay": 0.8, "loss": "siglip"}
LAYERS = {"image": 4, "text": 3}  # the tiny preset's blocks and layers

# One rank over gloo: for each ZeRO stage the trainer's prepare + start build the engine with RECIPE, and four of its
# steps run; each step's group rates are read before the step, the first loss call's inputs and value kept.
STEPS_SCRIPT = r"""
import json, sys
import torch
from bmc_fast.trainer import loop
from bmc_fast.trainer.config import TrainConfig
from bmc_fast.trainer.distributed import DistEnv
from bmc_fast.trainer.prepare import prepare

args = json.loads(sys.argv[1])
report = {}
for stage, ds_config in args["configs"].items():
    first = {}

    def record(loss_fn):
        def recorded(*features):
            loss = loss_fn(*features)
            if not first:
                first.update(features=[f.detach().float().clone() for f in features], loss=loss.detach().clone())
            return loss
        return recorded

    cfg = TrainConfig(ds_config=ds_config, train_data=args["train"], tokenizer=args["tokenizer"], loader="pil",
                      workers=0, output_dir=f"{args['out']}/zero{stage}", max_steps=4, report_to="none",
                      **args["recipes"][stage])
    s = loop.start(prepare(cfg, DistEnv.from_environ()), loop.StepHooks(loss=record))
    groups = s.engine.optimizer.param_groups
    lrs = []
    for step in range(1, 5):
        lrs.append([group["lr"] for group in groups])
        loop.train_step(s, step)
    adam = s.engine.optimizer.optimizer  # the torch AdamW inside ZeRO
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions: the full count
    params = list(s.engine.module.parameters())
    moments = sum(v.numel() for st in adam.state.values() for k, v in st.items() if k == "exp_avg")
    report[stage] = {"names": [g["name"] for g in groups], "lrs": lrs, "adam_state": moments,
                     "trainable": sum(numel(p) for p in params if p.requires_grad), "total": sum(map(numel, params))}
    torch.save(first, f"{args['out']}/first-{stage}.pt")
    loop.finish(s)
print(json.dumps(report))
"""


def _world_of_one() -> dict:
    return {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}


def _reference_rates(config: dict, steps: int) -> list[float]:
    """DeepSpeed's own scheduler of ``config`` over one group at the JSON's lr: its rate before each step."""
    from deepspeed.runtime import lr_schedules

    sgd = torch.optim.SGD([torch.zeros(1)], lr=config["optimizer"]["params"]["lr"])
    scheduler = getattr(lr_schedules, config["scheduler"]["type"])(sgd, **config["scheduler"]["params"])
    rates = []
    for _ in range(steps):
        rates.append(sgd.param_groups[0]["lr"])
        scheduler.step()
    return rates


def _expected_scale(group_name: str) -> float:
    """EVA-CLIP's layer-wise scale of the group ``tower.layer[.no_decay]`` under RECIPE."""
    tower, layer = group_name.split(".")[:2]
    if tower == "other":
        return 1.0
    return RECIPE[f"lr_{tower}_scale"] * RECIPE["layer_decay"] ** (LAYERS[tower] + 1 - int(layer))


def test_group_rates_locked_state_and_the_sigmoid_loss_in_the_trainers_steps(small_data, tmp_path):
    """ZeRO 1 and 3 under WarmupCosineLR, ZeRO 2 under WarmupDecayLR (per-group bounds): each group's rate at each
    step is DeepSpeed's schedule × its EVA-CLIP scale; AdamW holds moments for the trainable parameters only (the
    locked ones are in no group; on ZeRO-3 the whole image tower is locked and runs without a graph); the first
    loss, SigLIP's at scale 10 and bias -10, is open_clip's SigLipLoss of the same features to fp32 rounding."""
    from open_clip.loss import SigLipLoss

    configs = {}
    for stage in (1, 2, 3):
        path = deepspeed_config(tmp_path, stage, steps=4, batch=16)
        config = json.loads(path.read_text())
        if stage == 2:
            config["scheduler"] = {"type": "WarmupDecayLR", "params": {
                "total_num_steps": 4, "warmup_min_lr": 1e-4, "warmup_max_lr": 1e-3, "warmup_num_steps": 2,
                "warmup_type": "linear"}}
            path.write_text(json.dumps(config))
        configs[stage] = config
    recipes = {stage: {**RECIPE, "lock_image_unlocked_groups": 0 if stage == 3 else 2} for stage in configs}
    args = {"configs": {stage: str(tmp_path / f"zero{stage}-accum1.json") for stage in configs},
            "train": small_data["train"], "tokenizer": small_data["tokenizer_dir"], "out": str(tmp_path),
            "recipes": recipes}
    proc = subprocess.run([sys.executable, "-c", STEPS_SCRIPT, json.dumps(args)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=_world_of_one())
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    for stage, config in configs.items():
        got = report[str(stage)]
        schedule = _reference_rates(config, 4)
        assert schedule[-1] > 0 and len(got["names"]) > 10, stage  # a warm rate, and groups per layer
        towers = {"text", "other"} | ({"image"} if stage != 3 else set())  # ZeRO-3: the image tower fully locked
        assert {name.split(".")[0] for name in got["names"]} == towers
        for step, rates in enumerate(got["lrs"]):
            for name, rate in zip(got["names"], rates):
                assert rate == pytest.approx(schedule[step] * _expected_scale(name), rel=1e-6, abs=1e-12), \
                    (stage, step, name)
        padding = 64 * len(got["names"])  # ZeRO aligns each group's flat partition
        assert got["total"] - got["trainable"] > 10 * padding  # the locked groups are most of the image tower
        assert got["trainable"] <= got["adam_state"] < got["trainable"] + padding, stage

        first = torch.load(tmp_path / f"first-{stage}.pt")
        image, text, scale, bias = first["features"]
        assert scale.item() == pytest.approx(10.0) and bias.item() == -10.0, (stage, scale.item(), bias.item())
        want = SigLipLoss()(image, text, scale, bias)
        torch.testing.assert_close(first["loss"], want, rtol=1e-5, atol=0)


def _losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row["train/loss"] for row in map(json.loads, lines) if "train/loss" in row]


def _weights(run_dir) -> dict[str, torch.Tensor]:
    from bmc_fast.checkpoint.run_dir import RunDir
    from bmc_fast.checkpoint.zero_weights import fp32_state_dict

    run = RunDir(run_dir)
    return fp32_state_dict(run.checkpoints, run.latest_tag())


def test_siglip_then_a_warm_start_with_locked_towers(tmp_path):
    """SigLIP trains 50 steps on the demo data and its loss falls; the export keeps the learnt bias (open_clip loads
    it); a run --pretrained from that export evaluates at step 0 exactly as bmc_fast.eval.retrieval evaluates the
    export; --lock-image leaves every image-tower weight as it was and changes every other (ZeRO-2); with
    --lock-image-unlocked-groups 1 the projection alone changes in the image tower (ZeRO-3); both still so after
    a --resume two steps further."""
    from safetensors.torch import load_file

    import bmc_fast
    from bmc_fast.data.default_data import ensure_default_data
    from bmc_fast.model.state_dict_adapters import OpenClip

    eval_data = ensure_default_data(seed=0).eval
    zero2, zero3 = (str(deepspeed_config(tmp_path, stage, steps=50, batch=8)) for stage in (2, 3))
    siglip, export, warm, unlocked = (tmp_path / name for name in ("siglip", "export", "warm", "unlocked"))
    common = ["bmc_fast/train.py", "--loss", "siglip", "--report-to", "none", "--eval-every", "0"]
    warm_start = [*common, "--pretrained", str(export), "--lock-image", "--max-steps", "5"]
    results = run_clis([
        [*common, "--ds_config", zero2, "--max-steps", "50", "--log-every", "5", "--output-dir", str(siglip)],
        ["-m", "bmc_fast.export", str(siglip), str(export)],
        ["-m", "bmc_fast.eval.retrieval", "--checkpoint", str(export), "--data", eval_data, "--json",
         str(tmp_path / "export_eval.json")],
        [*warm_start, "--ds_config", zero2, "--output-dir", str(warm)],
        [*warm_start, "--ds_config", zero3, "--lock-image-unlocked-groups", "1", "--output-dir", str(unlocked)],
        # each resumed: the locked weights come back from the checkpoint, not from a fresh init
        [*warm_start, "--ds_config", zero2, "--output-dir", str(warm), "--max-steps", "7", "--resume"],
        [*warm_start, "--ds_config", zero3, "--lock-image-unlocked-groups", "1", "--output-dir", str(unlocked),
         "--max-steps", "7", "--resume"],
    ], env=_world_of_one())
    for result in results:
        assert result["code"] == 0, result["stderr"][-3000:]

    losses = _losses(siglip)
    assert len(losses) == 10 and losses[-1] < 0.6 * losses[0], losses
    bias = bmc_fast.load_model(siglip)[0].logit_bias.item()
    assert bias != -10.0  # it was learnt
    assert json.loads((export / "open_clip_config.json").read_text())["model_cfg"]["init_logit_bias"] == -10.0
    import open_clip

    from bmc_fast.checkpoint.open_clip_compat import register_modernbert

    register_modernbert()
    assert open_clip.create_model(f"local-dir:{export}").logit_bias.item() == pytest.approx(bias)

    step0 = [json.loads(line) for line in (warm / "metrics.jsonl").read_text().splitlines()][0]
    offline = json.loads((tmp_path / "export_eval.json").read_text())
    assert step0["step"] == 0 and step0 == {"step": 0, "time": step0["time"],
                                            **{f"eval/{k}": offline[k] for k in ("t2i_r1", "t2i_r5", "t2i_r10",
                                                                                 "t2i_r100", "i2t_r1", "i2t_r5",
                                                                                 "i2t_r10", "i2t_r100")}}

    start = OpenClip.from_open_clip(load_file(str(export / "open_clip_model.safetensors")))
    for run, trained in ((warm, set()), (unlocked, {"visual.proj"})):
        assert (run / "checkpoints" / "latest").read_text() == "step0000007"
        after = _weights(run)
        assert set(after) == set(start)
        same = {k for k in start if torch.equal(start[k], after[k])}
        assert {k for k in start if k.startswith("visual.")} - same == trained, run.name
        assert not same & {k for k in start if not k.startswith("visual.")}, run.name  # the rest all trained
    assert math.isfinite(_losses(warm)[-1])


def test_bench_recipe_times_each_recipe_beside_the_full_model(tmp_path):
    """The benchmark's quick shape: every recipe's step against the full model's in one process; the trainable
    parameters and Adam state of each are those its locks leave (the image tower's count from the model itself)."""
    from bmc_fast.model.clip import BMCLongCLIP
    from bmc_fast.model.config import load_model_config

    proc = subprocess.run([sys.executable, "benchmarks/bench_recipe.py", "--shape", "tiny", "--rounds", "1", "--out",
                           str(tmp_path / "recipe")], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=_world_of_one())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["recipe"]: row for row in json.loads((tmp_path / "recipe.json").read_text())["rows"]}
    assert "| lock image | 2 |" in (tmp_path / "recipe.md").read_text()
    model = BMCLongCLIP(load_model_config("tiny", context_length=128, text={"vocab_size": 1024, "pad_token_id": 0,
                                                                            "cls_token_id": 1, "sep_token_id": 2}))
    image = sum(p.numel() for p in model.visual.parameters())
    full = rows["full"]
    assert full["ratio_to_full"] == 1.0 and full["trainable"] == sum(p.numel() for p in model.parameters())
    assert rows["lock image"]["trainable"] == full["trainable"] - image
    assert rows["lock image, projection trains"]["trainable"] == full["trainable"] - image + model.visual.proj.numel()
    assert full["param_groups"] == 2 and rows["layer decay 0.8, text × 0.5"]["param_groups"] > 10
    for row in rows.values():  # Adam's two fp32 moments of every trainable parameter, and of nothing else
        assert 8 * row["trainable"] <= row["adam_state_bytes"] < 8 * (row["trainable"] + 64 * row["param_groups"])
        assert row["median_s"] > 0
