"""End to end on CPU: the real `deepspeed` launcher, 2 gloo ranks, real shards; then the evaluate CLI."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bmc_fast.errors import ConfigError
from bmc_fast.eval import retrieval as eval_retrieval
from bmc_fast.eval import zeroshot
from helpers import (
    REPO,
    RunsCode,
    ShardServer,
    assert_same_tensors,
    deepspeed_config,
    free_port,
    launch_deepspeed,
    wandb_offline_history,
)

pytestmark = pytest.mark.slow  # real processes: mp.spawn or the deepspeed launcher

STEPS = 12
BATCH = 36  # pairs a step: 18 a rank on 2 ranks, 12 on 3, 18 × 2 accumulated on 1


def _ds_config(tmp_path, stage, bf16=False):
    return deepspeed_config(tmp_path, stage, steps=STEPS, batch=BATCH, bf16=bf16)


def _train_args(small_data, ds_config, run_dir, ranks, *extra):
    return ["--num_gpus", str(ranks), "--master_port", str(free_port()), "bmc_fast/train.py",
            "--ds_config", str(ds_config), "--train-data", small_data["train"], "--eval-data", small_data["eval"],
            "--tokenizer", small_data["tokenizer_dir"], "--max-steps", str(STEPS), "--log-every", "1",
            "--eval-every", "6", "--save-every", "6", "--output-dir", str(run_dir), "--seed", "1", *extra]


# ZeRO-1 runs in the contrastive accumulation test below; bf16 here with contrastive accumulation 2 and
# activation checkpointing (fp16 with both: tests/test_nan_guard.py). The first two runs then resume from step 6 on
# other numbers of ranks (_check_resumes_on_other_ranks).
@pytest.mark.parametrize("stage,bf16,loader,resize_to", [(2, False, "pil", (1, 3)), (3, False, "dali", (1,)),
                                                         (2, True, "dali", ())])
def test_deepspeed_launcher_trains_and_checkpoints(stage, bf16, loader, resize_to, small_data, tmp_path):
    run_dir = tmp_path / "run"
    keep = ["--keep-checkpoints", "1"] if bf16 else []  # the bf16 run keeps only its last checkpoint
    accumulation, extra = (2, ["--grad-checkpointing"]) if bf16 else (1, [])
    ds_config = deepspeed_config(tmp_path, stage, steps=STEPS, batch=BATCH, bf16=bf16, accumulation=accumulation)
    zeroshot_flags = ["--zeroshot-data", f"modality={small_data['eval']}", "--zeroshot-label-key", "modality",
                      "--zeroshot-data", f"colour={small_data['eval']}", "--zeroshot-label-key",
                      "lesions.0.colour", "--zeroshot-choices", "2"]
    args = _train_args(small_data, ds_config, run_dir, 2, "--loader", loader, *keep, *extra, *zeroshot_flags,
                       *(("--audit-samples",) if resize_to else ()))
    warm = stage == 3  # a warm start, its image tower locked but for the projection: the resize keeps what is locked
    if warm:
        source = _random_export(small_data, tmp_path / "source")
        args += ["--pretrained", str(source), "--lock-image", "--lock-image-unlocked-groups", "1"]
    server = None
    if bf16:  # the training shards over http from a local server: the DALI loader reads them as dali-stream
        server = ShardServer(small_data["root"])
        args[args.index("--train-data") + 1] = small_data["train"].replace(str(small_data["root"]), server.url)
    if resize_to:  # DeepSpeed's Adam moments at each checkpoint, for the resumed runs to compare
        args[args.index("bmc_fast/train.py")] = "tests/faulty_train.py"
    try:
        proc = launch_deepspeed(args, tmp_path, env={"BMC_FAST_TEST_MOMENTS": str(tmp_path / "moments")})
    finally:
        if server is not None:
            server.close()
    port = args[args.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # no 66 MiB left per rank
    assert f"ZeRO stage {stage}, torch.{'bfloat16' if bf16 else 'float32'}" in proc.stdout + proc.stderr
    resolved = "dali-stream" if server is not None else loader
    why = "DALI's reader reads local shards only and 'http://" if server is not None else "as requested"
    assert f"data loader: {resolved} (requested {loader}: {why}" in proc.stdout + proc.stderr
    assert server is None or len({path for path, _ in server.requests if path.endswith(".tar")}) == 4

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses  # the loss falls
    evals = [r for r in records if "eval/t2i_r1" in r]
    evaluated = [0] * warm + [6, STEPS]  # a warm start evaluates before its first step
    assert [r["step"] for r in evals] == evaluated
    zeroshot_evals = [r for r in records if "zeroshot/modality/mc_acc" in r]
    assert [r["step"] for r in zeroshot_evals] == evaluated
    assert {"zeroshot/colour/top1", "zeroshot/average/mc_acc"} <= set(zeroshot_evals[-1])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:07d}"
    assert (run_dir / "checkpoints" / "step0000006").is_dir() == (not keep)
    assert not (run_dir / "checkpoints" / "latest.tmp").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"train/loss", "eval/t2i_r1", "zeroshot/modality/mc_acc", "zeroshot/colour/top1"} <= set(
        events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("zeroshot/average/mc_acc")] == evaluated
    config = json.loads((run_dir / "config.json").read_text())
    assert config["deepspeed"]["zero_optimization"]["stage"] == stage
    assert config["batch"] == {"global_batch": BATCH, "micro_batch": BATCH // 2 // accumulation,
                               "accumulation": accumulation, "world_size": 2}
    assert not bf16 or f"contrastive accumulation 2: each loss contrasts all {BATCH} pairs" in proc.stdout + proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["tokens_per_s"] > 0 and 0 <= summary["train"]["padding_fraction"] < 1
    assert summary["train"]["tflops"] > 0 and "mfu" not in summary["train"]  # no peak is known for a CPU
    assert summary["loader"] == resolved and summary["skipped"] == {}

    # The evaluate CLI rebuilds fp32 weights from the ZeRO checkpoint; in fp32 it reproduces the final
    # evaluation exactly (a bf16 run evaluated in bf16 during training, so only the fp32 runs compare).
    out = tmp_path / "eval.json"
    metrics = eval_retrieval.main(["--checkpoint", str(run_dir), "--data", small_data["eval"], "--json", str(out),
                             "--workers", "0", "--loader", loader])
    assert json.loads(out.read_text())["n"] == 32
    if not bf16:
        for key, value in summary["eval"].items():
            assert metrics[key] == pytest.approx(value, abs=1e-9), key
    # The zero-shot CLI on the checkpoint gives the accuracies logged at the last step (fp32 runs).
    logged = {k.removeprefix("zeroshot/"): v for k, v in zeroshot_evals[-1].items() if k.startswith("zeroshot/")}
    assert summary["zeroshot"] == logged
    cli = [flag.removeprefix("--zeroshot-").join(("--", "")) if flag.startswith("--zeroshot-") else flag
           for flag in zeroshot_flags]  # --zeroshot-data -> --data, ...
    offline = zeroshot.scalars(zeroshot.main(["--model", str(run_dir), "--out", str(tmp_path / "zeroshot"),
                                              "--seed", "1", *cli]))
    if not bf16:
        assert summary["zeroshot"] == pytest.approx(offline, abs=1e-9)
    consolidated = _check_weights_only_consolidation(run_dir)
    if warm:
        assert _changed_image_weights(source, consolidated) == {"visual.proj"}  # locked: the source's
    if loader == "pil":  # the export CLI from the repository root, where transformers >= 5.25 imports HF's kernels
        import bmc_fast

        proc = subprocess.run([sys.executable, "-m", "bmc_fast.export", str(run_dir), str(tmp_path / "export-cli")],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        exported, _, _ = bmc_fast.load_model(tmp_path / "export-cli")
        assert_same_tensors(exported.state_dict(), bmc_fast.load_model(run_dir)[0].state_dict())
    if stage == 3:  # the export holds DeepSpeed's fp32 consolidation of the partitioned weights, bit for bit
        from safetensors.torch import load_file

        from bmc_fast.checkpoint.export import WEIGHTS_NAME, export_run

        exported = load_file(export_run(run_dir, tmp_path / "export") / WEIGHTS_NAME)
        assert exported.keys() == consolidated.keys()
        assert_same_tensors({k: exported[k].reshape(v.shape) for k, v in consolidated.items()}, consolidated)
        # a shard swapped for one that runs code when unpickled: refused, and the code never ran
        import bmc_fast

        marker = tmp_path / "code-ran"
        shard = run_dir / "checkpoints" / f"step{STEPS:07d}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        torch.save({"optimizer_state_dict": RunsCode(marker)}, shard)
        with pytest.raises(ConfigError, match=r"zero_pp_rank_1_mp_rank_00_optim_states.pt' is refused: it pickles "
                                              r"\['builtins.exec'\]"):
            bmc_fast.load_model(run_dir)
        assert not marker.exists()
    for ranks in resize_to:
        _check_resumes_on_other_ranks(run_dir, args, ranks, loader, small_data, tmp_path)
    if warm:  # and after the resume on 1 rank, through the universal checkpoint, which holds no locked tensor
        assert _changed_image_weights(source, _weights(tmp_path / "resized-1")[0]) == {"visual.proj"}


def _changed_image_weights(export_dir: Path, weights: dict) -> set[str]:
    """The image-tower tensors of ``weights`` that differ from the export's."""
    from safetensors.torch import load_file

    from bmc_fast.checkpoint.export import WEIGHTS_NAME
    from bmc_fast.model.state_dict_adapters import OpenClip

    start = OpenClip.from_open_clip(load_file(export_dir / WEIGHTS_NAME))
    return {k for k in start if k.startswith("visual.") and not torch.equal(start[k], weights[k])}


def _random_export(small_data, out: Path) -> Path:
    """An export of a tiny model with its own random weights (another seed than the runs'), as --pretrained reads."""
    from bmc_fast.checkpoint.export import export
    from bmc_fast.data.text_tokenizer import load_tokenizer
    from bmc_fast.model.clip import BMCLongCLIP
    from bmc_fast.model.config import load_model_config

    tokenizer = load_tokenizer(small_data["tokenizer_dir"])
    cfg = load_model_config("tiny").with_tokenizer(tokenizer)
    torch.manual_seed(1234)
    return export(BMCLongCLIP(cfg), tokenizer, cfg, out)


def _without_evaluation(args: list[str]) -> list[str]:
    """``args`` less the evaluation flags and their values."""
    flags = ("--eval-data", "--zeroshot-data", "--zeroshot-label-key", "--zeroshot-choices")
    return [arg for i, arg in enumerate(args) if arg not in flags and (i == 0 or args[i - 1] not in flags)]


def _check_resumes_on_other_ranks(run_dir, args, ranks, loader, small_data, tmp_path):
    """A copy of the 2-rank run as it was at its step-6 checkpoint resumes on ``ranks`` ranks to step 12: the global
    batch stays, the checkpoint goes through DeepSpeed's universal form, every parameter's Adam moments right after
    loading equal the saving run's bit for bit, the LR schedule goes on where it was. Data, by the audit files: the
    PIL stream finishes the interrupted epoch over the new ranks, every sample of it read exactly once across the
    resize; DALI starts a new epoch, and the count of the old epoch's unread samples it logs is the audit's."""
    from bmc_fast.checkpoint.run_dir import RunDir
    from bmc_fast.data.tar_samples import read_tar_samples
    from bmc_fast.trainer.sample_audit import read_audit

    copy = tmp_path / f"resized-{ranks}"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(f"step{STEPS:07d}"))
    RunDir(copy).write_latest("step0000006")
    resumed = [*_without_evaluation(args), "--output-dir", str(copy), "--resume"]  # evaluation: tested above
    resumed[resumed.index("--num_gpus") + 1], resumed[resumed.index("--master_port") + 1] = str(ranks), str(free_port())
    proc = launch_deepspeed(resumed, tmp_path, env={"BMC_FAST_TEST_MOMENTS": str(copy / "moments")},
                            log=f"resized-{ranks}.log")
    log = proc.stdout + proc.stderr
    micro, accumulation = (BATCH // ranks, 1) if BATCH // ranks <= BATCH // 2 else (BATCH // 2, 2)
    assert (f"--resume on {ranks} rank(s): checkpoint step0000006 was written by 2; the global batch stays {BATCH} = "
            f"{micro} micro × {accumulation} accum × {ranks} ranks (was {BATCH // 2} × 1 × 2)") in log
    assert "resumed from step0000006_universal at step 6" in log
    assert RunDir(copy).latest_tag() == f"step{STEPS:07d}"
    assert not [p.name for p in (copy / "checkpoints").iterdir() if "universal" in p.name]  # removed once loaded
    saved, loaded = (torch.load(path, weights_only=True) for path in (tmp_path / "moments" / "saved-6.pt",
                                                                     copy / "moments" / "loaded-6.pt"))
    assert saved.keys() == loaded.keys() and len(saved) > 20  # every trainable tensor (24 in a locked image tower)
    for name in saved:
        assert_same_tensors(loaded[name], saved[name])
    lrs = {run: _last_per_step(run, "train/lr") for run in (run_dir, copy)}
    assert [lrs[copy][step] for step in range(7, STEPS + 1)] == [lrs[run_dir][step] for step in range(7, STEPS + 1)]

    audit = read_audit(copy / "audit")  # the lines of steps 7-12 of the 2-rank run were dropped on resume
    assert sorted(audit) == list(range(max(2, ranks)))
    steps = {step: [key for rank in audit.values() for key in rank.get(step, {}).get("keys", [])]
             for step in range(1, STEPS + 1)}
    assert all(len(keys) == BATCH for keys in steps.values())
    urls = sorted({url for url, _ in (key.split("#") for keys in steps.values() for key in keys)})
    every = sorted(f"{url}#{s['__key__']}" for url in urls for s in read_tar_samples(url, read=False))
    if loader == "pil":
        epoch_0 = [key for rank in audit.values() for line in rank.values()
                   for key, epoch in zip(line["keys"], line["epochs"]) if epoch == 0]
        assert sorted(epoch_0) == every  # 216 samples before the resize, the other 40 after it
    else:
        before = {key for step in range(1, 7) for key in steps[step]}
        after = [key for step in range(7, STEPS + 1) for key in steps[step]]
        assert len(set(after)) == len(after)  # one new epoch: no sample twice
        assert (f"the interrupted epoch had {len(before)} of its {len(every)} samples read (step 6 × {BATCH} pairs), "
                f"the other {len(every) - len(before)} are not seen in that epoch") in log


def test_evaluate_cli_rejects_a_directory_that_is_not_a_run(tmp_path):
    from bmc_fast.errors import ConfigError

    with pytest.raises(ConfigError, match="--checkpoint .* is not a finished run directory"):
        eval_retrieval.main(["--checkpoint", str(tmp_path), "--data", "x.tar"])


def _per_step(run_dir, key):
    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_contrastive_accumulation_matches_one_big_micro_batch_on_every_zero_stage(small_data, tmp_path):
    """2 ranks, 5 steps, PIL loader (the same samples in the same order for any micro batch): K = 2 micro
    batches of 8 per rank give the losses and gradient norms of one micro batch of 16, on ZeRO 1, 2 and 3
    (the norm, before clipping, would show DeepSpeed's 1/K scaling; the losses after the warm-up steps at
    lr 0 show the updates). The ZeRO-3 run reads its shards over http from a local server: streamed shards give the
    local files' losses. The ZeRO-1 run then resumes on 1 rank (8 micro × 4 accum) through DeepSpeed's universal
    checkpoint, its Adam moments as saved (ZeRO 2 and 3: test_deepspeed_launcher_trains_and_checkpoints)."""
    steps = ["--max-steps", "5", "--loader", "pil", "--eval-every", "0", "--save-every", "0"]
    # ZeRO-1 also logs to Weights & Biases, offline
    zero_1 = {"BMC_FAST_TEST_MOMENTS": str(tmp_path / "moments"), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}

    def train(stage, accumulation, ranks=2, *extra):
        ds_config = deepspeed_config(tmp_path, stage, steps=5, batch=32, accumulation=accumulation)
        run_dir = tmp_path / f"run-zero{stage}-k{accumulation}"
        args = _train_args(small_data, ds_config, run_dir, ranks, *steps, *extra)
        if stage == 1:
            args[args.index("bmc_fast/train.py")] = "tests/faulty_train.py"
            args += ["--report-to", "tensorboard,wandb"]
        if stage == 3:  # the same shards over http from a local server: the same samples, so the same losses
            args[args.index("--train-data") + 1] = small_data["train"].replace(str(small_data["root"]), server.url)
        proc = launch_deepspeed(args, tmp_path, env=zero_1 if stage == 1 else None)
        assert stage != 3 or len({path for path, _ in server.requests if path.endswith(".tar")}) == 4
        return _per_step(run_dir, "train/loss"), _per_step(run_dir, "train/grad_norm"), proc.stdout + proc.stderr

    big_losses, big_norms, _ = train(2, 1)
    assert len(big_losses) == len(big_norms) == 5 and min(big_norms) > 0
    server = ShardServer(small_data["root"])  # a daemon thread of this process: it ends with it in any case
    for stage in (1, 2, 3):
        losses, norms, log = train(stage, 2)
        assert "contrastive accumulation 2: each loss contrasts all 32 pairs" in log
        assert losses == pytest.approx(big_losses, rel=1e-5), (stage, losses, big_losses)
        assert norms == pytest.approx(big_norms, rel=1e-4), (stage, norms, big_norms)
        _check_weights_only_consolidation(tmp_path / f"run-zero{stage}-k2")
    server.close()
    records = [json.loads(line) for line in (tmp_path / "run-zero3-k2" / "metrics.jsonl").read_text().splitlines()]
    assert {r["train/pairs_per_loss"] for r in records if "train/pairs_per_loss" in r} == {32}

    saved = torch.load(tmp_path / "moments" / "saved-5.pt", weights_only=True)
    _, _, log = train(1, 2, 1, "--resume", "--max-steps", "6")
    assert "the global batch stays 32 = 8 micro × 4 accum × 1 ranks (was 8 × 2 × 2)" in log
    loaded = torch.load(tmp_path / "moments" / "loaded-5.pt", weights_only=True)
    assert saved.keys() == loaded.keys() and len(saved) > 50
    for name in saved:
        assert_same_tensors(loaded[name], saved[name])
    # W&B: the resumed run logged to the first one's run id, its steps after the first's, the losses of metrics.jsonl
    run_dir = tmp_path / "run-zero1-k2"
    run_id = (run_dir / "wandb_run_id").read_text()
    history = wandb_offline_history(run_dir)
    assert len(history) == 2 and all(name.endswith(f"-{run_id}") for name in history), history.keys()
    logged = [{row["trainer/step"]: row["train/loss"] for row in rows if "train/loss" in row} for rows in
              history.values()]
    assert [sorted(steps) for steps in logged] == [[1, 2, 3, 4, 5], [6]]
    assert {**logged[0], **logged[1]} == pytest.approx(_last_per_step(run_dir, "train/loss"), rel=1e-6)


def _check_weights_only_consolidation(run_dir):
    """Our weights_only reading of the latest checkpoint equals DeepSpeed's (which unpickles), bit for bit."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from bmc_fast.checkpoint.zero_weights import fp32_state_dict

    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"))
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert_same_tensors(fp32_state_dict(run_dir / "checkpoints", tag), consolidated)
    return consolidated


def _weights(run_dir, tag=None):
    from bmc_fast.checkpoint.load import load_run

    model, _, model_cfg = load_run(run_dir, tag=tag)
    return model.state_dict(), model_cfg


def _last_per_step(run_dir, key):
    """{step: value} of ``key``; a resumed run's lines replace the killed run's for the same step."""
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r[key] for r in records if key in r}


@pytest.mark.parametrize("loader,accumulation,kill", [("pil", 1, True), ("dali", 2, False)])
def test_a_signal_then_kill_9_and_resume_end_with_the_weights_of_a_run_never_stopped(loader, accumulation, kill,
                                                                                       small_data, tmp_path):
    """Exact resume and the determinism it rests on (2 ranks, ZeRO-2, 7 steps, checkpoints every 3 steps and at the
    end). The same command a second time: its rank 1 alone gets SIGUSR1 as step 5 begins (a preemption notice), so
    both ranks stop after step 5 with a checkpoint there and exit status 75. PIL: resumed with --resume auto, its
    rank 1 is killed by SIGKILL as step 7 begins, and the checkpoint of step 6 equals the uninterrupted run's bit for
    bit; resumed again from step 6 (where DeepSpeed's CPU FusedAdam would drift). DALI (with contrastive
    accumulation, 2 micro batches): resumed from step 5 once. Either way the run ends with the uninterrupted run's
    weights, loss for loss. The PIL runs are under --deterministic (torch's deterministic algorithms), which must
    change none of this."""
    from bmc_fast.errors import EXIT_PREEMPTED
    from bmc_fast.model.clip import BMCLongCLIP

    ds_config = deepspeed_config(tmp_path, 2, steps=7, batch=32, accumulation=accumulation)
    deterministic = ("--deterministic",) if loader == "pil" else ()

    def args(run_dir, *extra, faulty=False):
        arguments = _train_args(small_data, ds_config, run_dir, 2, "--loader", loader, "--max-steps", "7",
                                "--eval-every", "0", "--save-every", "3", *deterministic, *extra)
        if faulty:
            arguments[arguments.index("bmc_fast/train.py")] = "tests/faulty_train.py"
        return arguments

    launch_deepspeed(args(tmp_path / "first"), tmp_path, log="first.log")
    first, model_cfg = _weights(tmp_path / "first")
    torch.manual_seed(1)  # the runs' --seed: the weights they started from
    start = BMCLongCLIP(model_cfg).state_dict()
    moved = [key for key in start if not torch.equal(start[key], first[key])]
    assert len(moved) > 0.9 * len(start), "training changed (almost) no weight: the comparison would be empty"

    stopped = tmp_path / "stopped"
    proc = launch_deepspeed(args(stopped, faulty=True), tmp_path, check=False, env={"BMC_FAST_TEST_SIGNAL": "1:5"},
                            log="signalled.log")
    log = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_PREEMPTED, log[-3000:]
    assert (stopped / "checkpoints" / "latest").read_text() == "step0000005" and not (stopped / "summary.json").exists()
    after_signal = re.search(r"stopped by SIGUSR1 at step 5 \(([0-9.]+) s after the signal\): checkpoint step0000005",
                             log)
    assert after_signal, log[-3000:]
    # from the signal to the exit: the rest of step 5, one all-reduce, the checkpoint and a barrier
    step_5 = 32 / next(r for r in map(json.loads, (stopped / "metrics.jsonl").read_text().splitlines())
                       if r["step"] == 5)["train/samples_per_s"]
    save_5 = float(re.search(r"checkpoint step0000005 saved in ([0-9.]+) s", log).group(1))
    assert float(after_signal.group(1)) <= step_5 + save_5 + 1.0, (after_signal.group(0), step_5, save_5)
    assert "stopped by SIGUSR1 at step 5 (signalled on another rank)" in log  # rank 0 stopped at the same step

    config = json.loads((stopped / "config.json").read_text())
    resumed_from = 5
    if kill:
        proc = launch_deepspeed(args(stopped, "--resume", "auto", faulty=True), tmp_path, check=False,
                                env={"BMC_FAST_TEST_KILL": "1:7"}, log="killed.log")
        assert proc.returncode != 0 and (stopped / "checkpoints" / "latest").read_text() == "step0000006"
        assert not (stopped / "summary.json").exists()
        # determinism: the same command in other process trees, bit for bit at the step both runs saved
        assert_same_tensors(_weights(stopped)[0], _weights(tmp_path / "first", tag="step0000006")[0])
        port = proc.args[proc.args.index("--master_port") + 1]
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):  # a killed rank frees none
            leftover.unlink()
        resumed_from = 6
    proc = launch_deepspeed(args(stopped, "--resume", *(() if kill else ("auto",))), tmp_path, log="resumed.log")
    log = proc.stdout + proc.stderr
    tag = f"step{resumed_from:07d}"
    assert f"resumed from {tag} at step {resumed_from}" in log
    assert f"resumed the data stream, RNG states and skip counts of {tag}" in log
    assert 'optimizer: torch.optim.AdamW, fused, on CPU ("torch_adam": true, "fused": true)' in log
    assert ("deterministic algorithms on" in log) == bool(deterministic)
    assert json.loads((stopped / "config.json").read_text()) == config  # the original set-up is kept
    last_resume = json.loads((stopped / f"config.resume-{2 if kill else 1}.json").read_text())["train"]["resume"]
    assert last_resume == "latest"  # --resume auto, resolved: there was a checkpoint
    steps = [r["step"] for r in map(json.loads, (stopped / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in r]
    assert steps == list(range(1, 8)), steps  # 1-5, the signal; (6, the kill as 7 begins;) 6 or 7 after the resume
    assert (stopped / "checkpoints" / "latest").read_text().strip() == "step0000007"
    assert_same_tensors(_weights(stopped)[0], first)
    assert _last_per_step(stopped, "train/loss") == _last_per_step(tmp_path / "first", "train/loss")


def test_a_diverging_run_stops_and_never_saves_non_finite_weights(small_data, tmp_path):
    """lr 1e30 (ZeRO-2, fp32): the loss turns NaN within a few steps. The run stops with exit status 1 and one
    message naming the step and the last good checkpoint; every checkpoint on disk holds finite weights."""
    import subprocess
    import sys

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    config_path = deepspeed_config(tmp_path, 2, steps=10, batch=32)
    config = json.loads(config_path.read_text())
    config["optimizer"]["params"]["lr"] = 1e30
    config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 1e30, "warmup_max_lr": 1e30,
                                                          "warmup_num_steps": 1}}
    config_path.write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    args = _train_args(small_data, config_path, run_dir, 1, "--loader", "pil", "--max-steps", "10",
                       "--save-every", "1", "--eval-every", "0", "--max-bad-steps", "3")
    launcher = Path(sys.executable).parent / "deepspeed"
    proc = subprocess.run([str(launcher), *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    (tmp_path / "launcher.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode != 0, proc.stdout[-2000:]
    message = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: training diverged")]
    assert len(message) == 1 and "the last good checkpoint is checkpoints/step" in message[0], proc.stderr[-3000:]
    assert not (run_dir / "summary.json").exists()  # a diverged run is never reported as finished
    port = args[args.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # its shared memory is freed
    tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert tags and (run_dir / "checkpoints" / "latest").read_text() == tags[-1]
    assert f"checkpoints/{tags[-1]}" in message[0]
    for tag in tags:
        state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)
        assert all(torch.isfinite(t).all() for t in state.values()), tag
