"""``make gpu-check`` and ``make gpu-wheelhouse`` on this CPU machine: the refusal, the dry run, the wheelhouse.

The check itself needs a GPU; what can rot without one is tested here: it must say "no CUDA device" and exit 2
at once, ``--dry-run`` must list steps a-g with commands that name real files and flags, the steps' evaluation
code must read the files real runs write, and the wheelhouse must install with ``--no-index`` into a fresh
environment holding only what a CUDA torch environment holds.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check
import gpu_steps


def _make(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={k: v for k, v in os.environ.items() if not k.startswith("MAKE")})


def test_gpu_check_without_cuda_exits_2_at_once_with_the_reason():
    start = time.perf_counter()
    proc = _make("gpu-check")
    assert time.perf_counter() - start < 60
    assert proc.returncode == 2, proc.stderr
    assert "gpu-check: no CUDA device" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_dry_run_lists_steps_a_to_g_with_commands_that_exist():
    proc = _make("gpu-check", "ARGS=--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for key in ("data", "a", "b", "c", "d", "e", "f"):
        assert f"\n{key}: " in out, (key, out)
    assert "g: planned vs measured peak" in out
    # every step at its limit still ends inside one 10-minute call of the device tool
    assert sum(step.timeout_s for step in gpu_check.plan_steps(Path("/tmp/w"), sys.executable)) <= 540
    commands = [shlex.split(line.strip().removeprefix("runs: ")) for line in out.splitlines()
                if line.startswith("  ") and "<" not in line and not line.strip().startswith("#")]
    steps = set(gpu_steps.STEPS)
    for words in commands:
        for word in words:
            if word.startswith(str(REPO)):
                assert Path(word).exists(), word
        if "gpu_steps.py" in " ".join(words[:2]):
            assert words[2] in steps, words
    train = next(w for w in commands if "bmc_fast/train.py" in " ".join(w))
    flags = {w for w in train[train.index(str(REPO / "bmc_fast" / "train.py")):] if w.startswith("--")}
    help_text = subprocess.run([sys.executable, str(REPO / "bmc_fast" / "train.py"), "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert all(flag in help_text for flag in flags), flags


def test_compare_runs_wants_a_falling_loss_and_a_bit_identical_rerun(tmp_path, monkeypatch):
    """Step e's verdict on run directories as the trainer writes them (its MetricsWriter's metrics.jsonl); the
    consolidated weights (``bmc_fast.checkpoint.zero_weights``, tested on real runs elsewhere) stand in as tensors."""
    import torch

    from bmc_fast.checkpoint.run_dir import RunDir
    from bmc_fast.trainer.metrics import MetricsWriter

    weights = {}
    for name, bump in (("a", 0.0), ("b", 0.0), ("c", 1e-3)):
        run = RunDir(tmp_path / name)
        run.path.mkdir()
        writer = MetricsWriter(run, enabled=True)
        for step in range(1, 4):
            writer.write(step, {"loss": 3.0 - step / 10, "samples_per_s": 9.0})
        writer.close()
        weights[str(run.path)] = {"w": torch.ones(3) + bump}
    monkeypatch.setattr(gpu_steps, "_weights", lambda run: weights[str(run)])
    same = gpu_steps.step_compare_runs(_args(inputs=[str(tmp_path / "a"), str(tmp_path / "b")]))
    differ = gpu_steps.step_compare_runs(_args(inputs=[str(tmp_path / "a"), str(tmp_path / "c")]))
    assert [line["status"] for line in same["lines"]] == ["pass", "pass"] and same["status"] == "pass"
    assert same["lines"][0]["figure"] == "loss 2.9000 -> 2.7000 over 3 logged steps"
    assert [line["status"] for line in differ["lines"]] == ["pass", "fail"] and differ["status"] == "fail"
    assert "largest weight difference 0.001" in differ["lines"][1]["figure"]


def _args(**values):
    import argparse

    return argparse.Namespace(**values)


def test_results_files_name_the_gpu_and_every_line(tmp_path, monkeypatch):
    results = {"a": {"status": "pass", "figure": "f", "lines": [{"name": "a. triton loss, fp32", "status": "pass",
                                                                "figure": "max error 1e-07"}]},
               "c": {"status": "skipped", "figure": "skipped", "lines": [{"name": "c. DALI", "status": "skipped",
                                                                         "figure": "skipped: DALI not installed"}]},
               "e": {"status": "fail", "figure": "exit 1: python -m deepspeed ... (see the log)", "lines": []}}
    path = gpu_check.write_results(("NVIDIA H200", "?"), results, tmp_path)  # "?": no CUDA query here
    assert path.name == "gpu_nvidia_h200.json"
    record = json.loads(path.read_text())
    assert record["gpu"] == "NVIDIA H200" and record["steps"] == results
    assert {"torch", "triton"} <= set(record["machine"]["versions"])
    table = path.with_suffix(".md").read_text()
    assert "| a | a. triton loss, fp32 | pass | max error 1e-07 |" in table
    assert "| c | c. DALI | skipped | skipped: DALI not installed |" in table
    assert "| e | e | fail | exit 1" in table


# Distributions a CUDA torch environment holds (gpu_wheelhouse.HELD) and what they import at start-up.
def _held_site(target: Path) -> Path:
    """A site folder of links to this environment's held distributions only: the 'fresh venv that has torch'."""
    import gpu_wheelhouse

    target.mkdir()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"].lower().replace("_", "-")
        if not gpu_wheelhouse.HELD.match(name) or name.startswith("nvidia-dali") or not dist.files:  # DALI: c skips
            continue
        tops = {Path(str(f)).parts[0] for f in dist.files if not str(f).startswith("..")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (target / top).exists():
                (target / top).symlink_to(source)
    return target


@pytest.mark.slow
def test_wheelhouse_fits_and_installs_without_an_index_beside_torch(tmp_path):
    """make gpu-wheelhouse's builder (the package index reached here, as CI's install does) stays under 50 MiB,
    and its wheels install with --no-index --no-deps into a fresh venv that has only torch and its kin; there
    DeepSpeed, open_clip, webdataset, torchdata and transformers 5.25 import, and pip finds no missing
    requirement."""
    wheelhouse = tmp_path / "wheelhouse"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_wheelhouse.py"), "--out", str(wheelhouse)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and "NewConnectionError" in proc.stderr:
        pytest.skip("the package index is not reachable from here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((wheelhouse / "manifest.json").read_text())
    assert manifest["bytes"] <= 50 * 2**20 and "3.12" in manifest["pythons"], manifest
    assert {"deepspeed", "open-clip-torch", "webdataset", "torchdata", "transformers", "kernels"} <= set(
        manifest["packages"])
    assert not {"torch", "numpy", "triton"} & set(manifest["packages"])

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    held = _held_site(tmp_path / "held")
    (site / "held.pth").write_text(f"{held}\n")
    [install, _] = gpu_check.install_from_wheelhouse(sys.executable, site, wheelhouse)  # the check's own command
    proc = subprocess.run(install, timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    python = str(venv / "bin" / "python")
    script = ("import deepspeed, open_clip, webdataset, torchdata, braceexpand, transformers, torch\n"
              "print(transformers.__version__, deepspeed.__version__, torch.__file__)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    transformers_version, _, torch_file = proc.stdout.strip().splitlines()[-1].split()  # after any warning
    assert transformers_version == "5.25.0" and torch_file.startswith(str(held)), proc.stdout
    proc = subprocess.run([python, "-c", _UNMET], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


# pip check's question, asked of the fresh venv (which has no pip): every requirement of every installed
# distribution of the wheelhouse (no extras) is met by an installed version.
_UNMET = """
import importlib.metadata as md
from packaging.requirements import Requirement
installed = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in md.distributions()}
unmet = []
for dist in md.distributions():
    for text in dist.requires or ():
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have = installed.get(req.name.lower().replace("_", "-"))
        if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
            unmet.append(f"{dist.metadata['Name']} needs {text}, has {have}")
print(sorted(set(unmet)))
"""


def test_step_a_runs_here_small(tmp_path):
    """Step a's code on this CPU at N=48, D=32 (Triton in the interpreter): every parity line passes."""
    result = gpu_steps.step_loss(_args(n=48, d=32, device="cpu", repeats=1))
    names = [line["name"] for line in result["lines"]]
    assert names[:2] == ["a. triton loss, fp32, N=48 D=32", "a. twin loss, fp32, N=48 D=32"] and len(names) == 9
    assert result["status"] == "pass", [line for line in result["lines"] if line["status"] != "pass"]
    assert all(e <= a for line in result["lines"] if "errors" in line
               for e, a in zip(line["errors"], line["allowances"]))


def test_step_b_runs_here_on_the_varlen_stand_ins(monkeypatch):
    """Step b's code on this CPU with the `tiny` text tower: the padded line, the packed torch_flash line through
    torch's varlen_attn (its ops' CPU stand-ins, tests/varlen_cpu.py), FA4 skipped with its reason."""
    import varlen_cpu
    from bmc_fast.model import attn_backend

    varlen_cpu.register()
    monkeypatch.setattr(attn_backend, "attention_support",
                        lambda device: attn_backend.AttentionSupport("cuda", (9, 0), torch_varlen=True))
    result = gpu_steps.step_text(_args(device="cpu", preset="tiny", batch=6, repeats=1))
    by_name = {line["name"]: line for line in result["lines"]}
    assert by_name["b. padded SDPA"]["status"] == "pass"
    packed = by_name["b. packed torch_flash (varlen_attn)"]
    assert packed["status"] == "pass" and packed["output_error"] < 2e-2, packed
    assert by_name["b. packed fa4"]["status"] == "skipped" and "flash-attn-4 is not installed" in by_name[
        "b. packed fa4"]["figure"]


@pytest.mark.usefixtures("free_dali_pipelines")
def test_steps_data_and_c_run_here_on_the_cpu_graph_twice(tmp_path):
    """The data step (small embedded set, indexes) and step c's code, whose GPU side is the CPU graph here:
    two passes of the evaluation graph agree exactly, every image read once."""
    pytest.importorskip("nvidia.dali")
    data = gpu_steps.step_data(_args(cache=str(tmp_path / "cache")))
    (tmp_path / "data.json").write_text(json.dumps(data))
    assert data["status"] == "pass" and "shards" in data["lines"][0]["figure"]
    result = gpu_steps.step_dali(_args(data=str(tmp_path / "data.json")))
    [entry] = result["lines"]
    assert entry["status"] == "pass" and entry["difference"] == 0.0, entry
    good = int(data["lines"][0]["figure"].split(", ")[1].split()[0])
    assert f"{good} images" in entry["figure"]
