"""Bad input fails fast: one ConfigError naming the flag, the value and the fix, before any model exists."""
import io
import json
import tarfile
from pathlib import Path

import pytest

import bmc_fast.model.clip
import bmc_fast.trainer.loop
from bmc_fast import train
from bmc_fast.data import synthetic
from bmc_fast.ds_json import batch_plan
from bmc_fast.errors import ConfigError
from bmc_fast.trainer.ds_config import with_resumable_cpu_adam, with_total_steps
from helpers import REPO

ZERO2 = str(REPO / "ds_configs" / "zero2.json")


@pytest.fixture(autouse=True)
def one_rank_world(monkeypatch):
    """A 1-rank launcher environment; and any attempt to build a model fails the test."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29599").items():
        monkeypatch.setenv(key, value)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(bmc_fast.model.clip.BMCLongCLIP, "__init__", no_model)


def _args(small_data, tmp_path, **flags):
    base = {"--ds_config": ZERO2, "--train-data": small_data["train"], "--eval-data": small_data["eval"],
            "--tokenizer": small_data["tokenizer_dir"], "--output-dir": str(tmp_path / "run"), "--max-steps": "50"}
    base.update(flags)
    return [x for kv in base.items() for x in kv]


def test_pattern_matching_nothing(small_data, tmp_path):
    pattern = str(tmp_path / "nowhere" / "shard-{000000..000003}.tar")
    with pytest.raises(ConfigError, match=r"--train-data '.*nowhere.*' matches no file: .*shard-\{000000\.\.000009\}"):
        train.main(_args(small_data, tmp_path, **{"--train-data": pattern}))


@pytest.mark.parametrize("kind", ["zero_bytes", "no_members"])
def test_empty_shard(small_data, tmp_path, kind):
    empty = tmp_path / "empty.tar"
    if kind == "zero_bytes":
        empty.write_bytes(b"")
    else:
        tarfile.open(empty, "w").close()
    pattern = small_data["train"] + "::" + str(empty)
    with pytest.raises(ConfigError, match=r"--train-data: shard '.*empty.tar' is empty \(no samples\): remove it"):
        train.main(_args(small_data, tmp_path, **{"--train-data": pattern}))


def test_eval_set_smaller_than_two(small_data, tmp_path):
    shard = tmp_path / "one.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("a.txt", b"caption"), ("a.png", b"\x89PNG")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ConfigError, match=r"--eval-data '.*one.tar' holds 1 pair\(s\); retrieval needs at least 2"):
        train.main(_args(small_data, tmp_path, **{"--eval-data": str(shard)}))


def test_batch_not_divisible_by_world_size(small_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"--ds_config .*zero2.json: train_batch_size 64 is not divisible by "
                                          r"gradient_accumulation_steps 1 × world size 3: set train_batch_size to a "
                                          r"multiple of 3"):
        train.main(_args(small_data, tmp_path))


@pytest.mark.parametrize("change,message", [
    ({"zero_optimization": {"stage": 0}}, r"zero_optimization.stage is 0, whose plain optimizer applies a step with "
                                          r"non-finite gradients; set stage 1, 2 or 3"),
    ({"zero_optimization": {"stage": 3, "compute_grad_norm": False}}, r"compute_grad_norm is false"),
    ({"bf16": {"enabled": True, "check_grad_overflow": False}}, r"bf16.check_grad_overflow is false, so ZeRO-2"),
])
def test_deepspeed_settings_that_never_skip_a_non_finite_step_are_refused(small_data, tmp_path, change, message):
    config = {**json.loads(Path(ZERO2).read_text()), **change}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        train.main(_args(small_data, tmp_path, **{"--ds_config": str(path)}))


def test_fp16_on_an_accelerator_without_it_is_refused_before_the_model(small_data, tmp_path, monkeypatch):
    """DeepSpeed's CPU accelerator has float16 only where oneDNN does (AVX512-FP16 / AMX-FP16 CPUs); elsewhere its
    engine fails deep inside initialize. The trainer says so up front, with the fix."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    config = {**json.loads(Path(ZERO2).read_text()), "fp16": {"enabled": True}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"--ds_config: fp16.enabled is true, but DeepSpeed's cpu accelerator has no "
                                          r"float16 on this machine \(it supports float32(, bfloat16)?\); use "
                                          r'"bf16": \{"enabled": true\} instead'):
        train.main(_args(small_data, tmp_path, **{"--ds_config": str(path)}))


@pytest.mark.parametrize("extra,message", [
    (["--zeroshot-data", "m=EVAL", "--zeroshot-label-key", "no.such.key"],
     r"zero-shot dataset 'm': sample '.*' of '.*' has no 'no.such.key' in its .json .* pass another "
     r"--zeroshot-label-key"),
    (["--zeroshot-data", "m=EVAL"], r"zero-shot dataset 'm': shards need --zeroshot-label-key"),
    (["--zeroshot-data", "m=EVAL", "--zeroshot-label-key", "modality", "--zeroshot-choices", "40"],
     r"zero-shot dataset 'm': --zeroshot-choices 40 distractors, but only \d+ other class\(es\)"),
    (["--zeroshot-data", "a=EVAL", "--zeroshot-data", "b=EVAL", "--zeroshot-label-key", "modality",
      "--zeroshot-label-key", "modality", "--zeroshot-label-key", "modality"],
     r"--zeroshot-label-key is given 3 times for 2 --zeroshot-data"),
    (["--zeroshot-data", "a=EVAL", "--zeroshot-data", "a=EVAL", "--zeroshot-label-key", "modality"],
     r"--zeroshot-data: the name 'a' is given twice"),
    (["--zeroshot-data", "EVAL", "--zeroshot-label-key", "modality"], r"--zeroshot-data '.*': write NAME=SOURCE"),
    (["--zeroshot-label-key", "modality"], r"--zeroshot-label-key was given without --zeroshot-data"),
    (["--zeroshot-data", "m=EVAL", "--zeroshot-label-key", "modality", "--zeroshot-choices", "2",
      "--zeroshot-templates", "missing.txt"],
     r"--zeroshot-templates 'missing.txt' is not a file"),
])
def test_bad_zeroshot_flags_stop_before_the_model(small_data, tmp_path, extra, message):
    extra = [x.replace("EVAL", small_data["eval"]) for x in extra]
    with pytest.raises(ConfigError, match=message):
        train.main(_args(small_data, tmp_path) + extra)


def test_zeroshot_flags_repeat_into_a_checked_config(small_data, tmp_path, monkeypatch):
    """Two --zeroshot-data sets and their label keys reach the loop loaded and in order."""
    seen = {}

    def fake_run(prepared):
        seen["p"] = prepared
        return {}

    monkeypatch.setattr(bmc_fast.trainer.loop, "run", fake_run)
    train.main(_args(small_data, tmp_path) + ["--zeroshot-data", f"modality={small_data['eval']}", "--zeroshot-data",
                                              f"colour={small_data['eval']}", "--zeroshot-label-key", "modality",
                                              "--zeroshot-label-key", "lesions.0.colour", "--zeroshot-choices", "1"])
    p = seen["p"]
    assert p.cfg.zeroshot_data == (f"modality={small_data['eval']}", f"colour={small_data['eval']}")
    assert [d.name for d in p.zeroshot] == ["modality", "colour"] and all(len(d.labels) == 32 for d in p.zeroshot)
    assert len(p.zeroshot[0].classes) >= 2 and p.zeroshot_templates == ("{}",)


def test_tokenizer_directory_without_tokenizer(small_data, tmp_path):
    (tmp_path / "tok").mkdir()
    with pytest.raises(ConfigError, match=r"--tokenizer '.*tok' holds no tokenizer"):
        train.main(_args(small_data, tmp_path, **{"--tokenizer": str(tmp_path / "tok")}))


def test_tokenizer_directory_missing(small_data, tmp_path):
    with pytest.raises(ConfigError, match=r"--tokenizer '.*missing' is not a directory"):
        train.main(_args(small_data, tmp_path, **{"--tokenizer": str(tmp_path / "missing")}))


def test_overwrite_never_deletes_a_directory_that_holds_no_run(small_data, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train-000000.tar").write_bytes(b"precious")
    with pytest.raises(ConfigError, match="--output-dir .* holds files but no run .* choose a new or empty"):
        train.main(_args(small_data, tmp_path) + ["--overwrite"])
    assert (tmp_path / "run" / "train-000000.tar").read_bytes() == b"precious"


def test_train_data_without_tokenizer(small_data, tmp_path):
    args = _args(small_data, tmp_path)
    i = args.index("--tokenizer")
    del args[i:i + 2]
    with pytest.raises(ConfigError, match="--train-data needs --tokenizer DIR"):
        train.main(args)


def test_existing_run_directory_is_not_overwritten(small_data, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="--output-dir .* already holds a run: .* --resume .* --overwrite"):
        train.main(_args(small_data, tmp_path))


def test_unknown_flag_is_an_error(small_data, tmp_path):
    with pytest.raises(SystemExit):
        train.main(_args(small_data, tmp_path) + ["--max-step", "3"])  # no abbreviations either


def test_warmup_longer_than_run(small_data, tmp_path):
    with pytest.raises(ConfigError, match="warmup_num_steps 40 >= --max-steps 10"):
        train.main(_args(small_data, tmp_path, **{"--max-steps": "10"}))


@pytest.mark.parametrize("fields,world,want", [
    ({"train_batch_size": 128}, 2, (128, 64, 1)),
    ({"train_batch_size": 128, "gradient_accumulation_steps": 2}, 4, (128, 16, 2)),
    ({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 3}, 2, (48, 8, 3)),
    ({"train_batch_size": 96, "train_micro_batch_size_per_gpu": 8}, 3, (96, 8, 4)),
])
def test_batch_plan_solves_deepspeeds_equation(fields, world, want):
    plan = batch_plan(fields, world)
    assert (plan.global_batch, plan.micro_batch, plan.accumulation) == want


def test_batch_plan_rejects_inconsistent_fields():
    with pytest.raises(ConfigError, match="train_batch_size 100 != micro 8 × accum 2 × world size 4"):
        batch_plan({"train_batch_size": 100, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}, 4)


def test_schedule_follows_max_steps():
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    resolved, steps = with_total_steps(config, 77)
    assert steps == 77 and resolved["scheduler"]["params"]["total_num_steps"] == 77
    assert config["scheduler"]["params"]["total_num_steps"] != 77  # the loaded JSON is not mutated
    assert with_total_steps(config, None)[1] == config["scheduler"]["params"]["total_num_steps"]


def test_cpu_runs_train_with_torch_fused_adamw_unless_the_json_chooses():
    """DeepSpeed's CPU FusedAdam would make a resumed run drift (its bias correction); CUDA keeps FusedAdam."""
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    params = with_resumable_cpu_adam(config, "cpu")["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    assert "torch_adam" not in config["optimizer"]["params"]  # the loaded JSON is not mutated
    for choice in ({"fused": False}, {"foreach": True}):  # the JSON's choice of torch's implementation stands
        chosen = {**config, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, **choice}}}
        assert with_resumable_cpu_adam(chosen, "cpu")["optimizer"]["params"] == {"lr": 1e-3, "torch_adam": True,
                                                                                 **choice}
    assert with_resumable_cpu_adam(config, "cuda") == config
    chosen = {**config, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": False}}}
    assert with_resumable_cpu_adam(chosen, "cpu") == chosen
    sgd = {**config, "optimizer": {"type": "SGD", "params": {"lr": 1e-3}}}
    assert with_resumable_cpu_adam(sgd, "cpu") == sgd


def test_synthetic_generator_cli(tmp_path):
    synthetic.main(["--out", str(tmp_path), "--seed", "1", "--train-samples", "5", "--eval-samples", "3",
                    "--samples-per-shard", "2"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["train"].endswith("shard-{000000..000002}.tar")
    assert len(list((tmp_path / "train").glob("*.tar"))) == 3 and len(list((tmp_path / "eval").glob("*.tar"))) == 2


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero1_bf16", "zero1_bf16_cpu_offload", "paper_16k_zero2",
                                  "finetune_zero2"])
def test_shipped_ds_configs_parse_in_deepspeed_and_follow_the_recipe(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    config = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
    parsed = DeepSpeedConfig(config)  # DeepSpeed's own validation: unknown keys are errors there
    expected_stage = int(name[4]) if name.startswith("zero") else 2  # paper_*, finetune_*: ZeRO-2
    assert parsed.zero_optimization_stage == expected_stage
    offload = parsed.zero_config.offload_optimizer
    assert (offload is not None and offload.device == "cpu") == name.endswith("cpu_offload")
    optimizer = config["optimizer"]
    assert optimizer["type"] == "AdamW" and optimizer["params"]["betas"] == [0.9, 0.95]
    assert optimizer["params"]["weight_decay"] > 0
    assert config["gradient_clipping"] == 1.0
    assert config["scheduler"]["type"] == "WarmupCosineLR"
    assert "enabled" in config["bf16"]


# The paper's runs: recipe -> (GPUs it is written for, micro batch per GPU, contrastive accumulation).
RECIPES = {"paper_16k_16gpu": (16, 1024, 1), "paper_16k_8gpu": (8, 2048, 1), "paper_16k_8gpu_accum2": (8, 1024, 2),
           "paper_8k_8gpu": (8, 1024, 1), "paper_16k_4gpu_accum4": (4, 1024, 4)}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_paper_recipes_solve_for_their_world_size_only(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    gpus, micro, accumulation = RECIPES[name]
    config = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
    plan = batch_plan(config, world_size=gpus)
    assert (plan.micro_batch, plan.accumulation) == (micro, accumulation)
    assert plan.global_batch == micro * accumulation * gpus == (8192 if "8k" in name else 16384)
    with pytest.raises(ConfigError, match=r"train_batch_size \d+ != micro|is not divisible"):
        batch_plan(config, world_size=gpus * 2)  # the same JSON on twice the GPUs is refused, not re-solved
    single = {k: v for k, v in config.items() if k not in ("train_micro_batch_size_per_gpu",
                                                            "gradient_accumulation_steps")}
    assert DeepSpeedConfig(single).zero_optimization_stage == 2  # DeepSpeed's own validation of the rest
    assert config["optimizer"]["params"]["lr"] == 5e-4 and config["bf16"]["enabled"]


def test_paper_recipe_batch_plan():
    config = json.loads((REPO / "ds_configs" / "paper_16k_zero2.json").read_text())
    assert config["optimizer"]["params"]["lr"] == 5e-4 and config["bf16"]["enabled"]
    plan = batch_plan(config, world_size=64)  # 8 nodes × 8 GPUs
    assert (plan.global_batch, plan.micro_batch) == (16384, 256)
    with pytest.raises(ConfigError, match="train_batch_size 16384 is not divisible"):
        batch_plan(config, world_size=24)


def test_resume_without_a_checkpoint(small_data, tmp_path):
    with pytest.raises(ConfigError, match="--resume: '.*run' has no checkpoints/latest to resume from"):
        train.main(_args(small_data, tmp_path) + ["--resume"])


def test_resume_with_another_model(small_data, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step0000006")
    (run / "config.json").write_text(json.dumps({"model": {"context_length": 77}}))
    with pytest.raises(ConfigError, match=r"--resume: the run in .* used a different model \(\[.*'context_length'"):
        train.main(_args(small_data, tmp_path) + ["--resume"])


def test_resume_accepts_runtime_switches_and_refuses_a_finished_run(small_data, tmp_path, monkeypatch):
    """Checkpointing, attention backend and unpadding change how the model runs, not its weights."""
    from bmc_fast.data.text_tokenizer import load_tokenizer
    from bmc_fast.model.config import load_model_config

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step0000050")
    tokenizer = load_tokenizer(small_data["tokenizer_dir"])
    saved = load_model_config("tiny", text_unpad=False, attn_backend="eager").with_tokenizer(tokenizer).to_dict()
    del saved["text_clean"]  # a run from before caption cleaning existed
    (run / "config.json").write_text(json.dumps({"model": saved}))
    args = _args(small_data, tmp_path) + ["--resume", "--preset", "tiny"]
    monkeypatch.setattr(bmc_fast.trainer.loop, "run", lambda prepared: prepared)  # stop after every check
    prepared = train.main(args + ["--grad-checkpointing", "--max-steps", "60"])
    assert prepared.cfg.resume and prepared.model_cfg.text.grad_checkpointing and prepared.model_cfg.text_unpad
    # its captions stay uncleaned to the end, though the preset now cleans them
    assert prepared.model_cfg.text_clean == prepared.tokenizer.clean == "none"
    with pytest.raises(ConfigError, match="--resume: the checkpoint .step0000050. is at step 50 and --max-steps "
                                          "is 50: nothing is left"):
        train.main(args + ["--max-steps", "50"])


def test_resume_on_another_number_of_ranks_keeps_the_checkpoints_global_batch(small_data, tmp_path, monkeypatch):
    """A checkpoint written by 2 ranks (16 micro × 1 × 2 = 32), resumed here on 1 rank with a JSON of 64: the
    global batch stays the checkpoint's, cut 16 × 2 accumulated, and the JSON the engine gets says so. The ranks
    are counted and the batch read from the small rank states, before any model exists."""
    from bmc_fast.data.text_tokenizer import load_tokenizer
    from bmc_fast.ds_json import BatchPlan
    from bmc_fast.model.config import load_model_config
    from bmc_fast.trainer import rank_state
    from bmc_fast.trainer.resume import Resize

    run = tmp_path / "run"
    tag = run / "checkpoints" / "step0000006"
    tag.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step0000006")
    saved_batch = {"global_batch": 32, "micro_batch": 16, "accumulation": 1, "world_size": 2}
    for rank in range(2):
        rank_state.write(rank_state.rank_state_path(tag, rank), {
            "split": {"loader": "pil", "rank": rank, "world_size": 2, "workers": 1, "micro_batch": 16},
            "batch": saved_batch})
    saved = load_model_config("tiny").with_tokenizer(load_tokenizer(small_data["tokenizer_dir"])).to_dict()
    (run / "config.json").write_text(json.dumps({"model": saved, "batch": saved_batch}))
    monkeypatch.setattr(bmc_fast.trainer.loop, "run", lambda prepared: prepared)
    prepared = train.main(_args(small_data, tmp_path) + ["--resume"])
    assert prepared.resize == Resize("step0000006", BatchPlan(32, 16, 1, 2), BatchPlan(32, 16, 2, 1))
    assert prepared.plan == BatchPlan(32, 16, 2, 1)
    config = prepared.ds_config
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (32, 16, 2)


@pytest.mark.parametrize("saved,ranks,max_micro,expected", [
    ((32, 16, 1, 2), 1, None, (32, 16, 2, 1)),  # the old micro batch, accumulated
    ((32, 16, 1, 2), 4, None, (32, 8, 1, 4)),  # a smaller share: no accumulation
    ((36, 18, 1, 2), 3, None, (36, 12, 1, 3)),
    ((36, 9, 2, 2), 1, None, (36, 9, 4, 1)),  # never a micro batch above the one that fitted
    ((32, 16, 1, 2), 1, 8, (32, 8, 4, 1)),  # the JSON's train_micro_batch_size_per_gpu bounds it
    ((24, 12, 1, 2), 1, 5, (24, 4, 6, 1)),  # the largest divisor of the share under the bound
])
def test_replan_keeps_the_global_batch_with_the_largest_micro_batch_that_fits(saved, ranks, max_micro, expected):
    from bmc_fast.ds_json import BatchPlan
    from bmc_fast.trainer.resume import replan

    plan = replan(BatchPlan(*saved), ranks, max_micro)
    assert plan == BatchPlan(*expected)
    assert plan.micro_batch * plan.accumulation * plan.world_size == plan.global_batch


def test_replan_refuses_a_global_batch_the_new_ranks_cannot_share():
    from bmc_fast.ds_json import BatchPlan
    from bmc_fast.trainer.resume import replan

    with pytest.raises(ConfigError, match=r"global batch of 32 pairs \(train_batch_size, 2 ranks\) cannot be split "
                                          r"over 3 ranks; resume on a number of ranks that divides it \(1, 2, 4\)"):
        replan(BatchPlan(32, 16, 1, 2), 3)


def test_missing_image_weights(small_data, tmp_path):
    with pytest.raises(ConfigError, match="--image-weights '.*nope.pt' is not a file"):
        train.main(_args(small_data, tmp_path) + ["--image-weights", str(tmp_path / "nope.pt")])


def test_text_weights_without_config(small_data, tmp_path):
    with pytest.raises(ConfigError, match="--text-weights '.*' has no config.json"):
        train.main(_args(small_data, tmp_path) + ["--text-weights", str(tmp_path)])


def test_resume_auto_starts_fresh_then_resumes_once_a_checkpoint_exists(small_data, tmp_path, monkeypatch):
    """For schedulers that requeue the same command: no run -> a new one; a checkpoint -> resume it; a run
    that died before its first checkpoint -> started again in place."""
    monkeypatch.setattr(bmc_fast.trainer.loop, "run", lambda prepared: prepared)  # stop after every check
    args = _args(small_data, tmp_path) + ["--resume", "auto"]
    fresh = train.main(args)
    assert fresh.cfg.resume is None and not fresh.cfg.overwrite
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": fresh.model_cfg.to_dict()}))
    again = train.main(args)  # a run without a checkpoint
    assert again.cfg.resume is None and again.cfg.overwrite
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step0000010")
    resumed = train.main(args)
    assert resumed.cfg.resume == "latest"
    assert train.main(_args(small_data, tmp_path) + ["--resume"]).cfg.resume == "latest"  # bare --resume


def test_latest_moves_atomically_and_pruning_keeps_it(tmp_path, monkeypatch):
    from bmc_fast.checkpoint.run_dir import RunDir, checkpoint_tag

    run = RunDir(tmp_path)
    for step in (5, 10, 15, 20):
        (run.checkpoints / checkpoint_tag(step)).mkdir(parents=True)
    (run.checkpoints / "not-ours").mkdir()
    run.write_latest(checkpoint_tag(10))

    def killed(*args):
        raise KeyboardInterrupt("killed while moving latest")

    monkeypatch.setattr("os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run.write_latest(checkpoint_tag(20))
    assert run.latest_tag() == "step0000010"  # the previous complete checkpoint, whole
    monkeypatch.undo()
    assert run.prune_checkpoints(2) == ["step0000005"]  # step 10 is older than the newest 2 but latest
    assert run.checkpoint_tags() == ["step0000010", "step0000015", "step0000020"]
    assert (run.checkpoints / "not-ours").is_dir() and run.prune_checkpoints(0) == []


@pytest.mark.parametrize("value,ok", [("tensorboard", True), ("tensorboard,wandb", True), ("wandb", True),
                                      ("none", True), ("comet", False), ("tensorboard,", False), ("", False)])
def test_report_to_takes_tensorboard_wandb_both_or_none(value, ok):
    from bmc_fast.trainer.config import TrainConfig

    if ok:
        assert TrainConfig(report_to=value).reporters == (() if value == "none" else tuple(value.split(",")))
    else:
        with pytest.raises(ConfigError, match=f"--report-to {value!r}: each of its comma-separated parts must be one"):
            TrainConfig(report_to=value)



def test_train_data_weights_make_a_mixture_of_the_sources(small_data, tmp_path, monkeypatch, capfd):
    """'A::B' with '1::3': the loaders get the two sources with their factors, the expected shares are logged;
    a count of factors that does not match the sources is refused naming the flag."""
    from bmc_fast.data.shards import expand_shards

    urls = expand_shards(small_data["train"], "--train-data")
    sources = f"{urls[0]}::{urls[1]}"
    monkeypatch.setattr(bmc_fast.trainer.loop, "run", lambda prepared: prepared)
    prepared = train.main(_args(small_data, tmp_path, **{"--train-data": sources, "--train-data-weights": "1::3"}))
    assert prepared.mixture.sources == ((urls[0],), (urls[1],)) and prepared.mixture.factors == (1.0, 3.0)
    log = capfd.readouterr().err  # the trainer's logging goes to stderr
    assert "expected shares of the training samples" in log and "75.0% (64 samples × 3)" in log
    with pytest.raises(ConfigError, match=r"--train-data-weights '1::2::3' gives 3 factor\(s\) for 2"):
        train.main(_args(small_data, tmp_path, **{"--train-data": sources, "--train-data-weights": "1::2::3"}))
