"""The Triton kernels compiled for real GPUs on this CPU machine (Triton 3.8 to cubin, its ptxas -v): no
shipped 16-bit or TF32 configuration spills or overflows shared memory, and every such tl.dot becomes the
target's tensor-core instruction. Also: every distinct GPU tile shape computes what the torch twin does
(interpreted), and the committed report was made with today's tiles."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bmc_fast.kernels import tiles
from helpers import REPO

REPORT = REPO / "benchmarks" / "results" / "kernel_compile.json"
EXPECTED_OP = {"sm_80": "mma.sync", "sm_90": "wgmma.mma_async", "sm_100": "tcgen05.mma"}


def test_sixteen_bit_and_tf32_builds_neither_spill_nor_miss_the_tensor_cores(tmp_path):
    """bf16 and tf32 on sm_80 and sm_90 for every kernel, fp16 for the sigmoid forward (the one that spilled
    before its tiles were chosen), and one exact-fp32 build to show the FMA path is told apart."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    results = []
    for argv in (["--mode", "bf16", "tf32", "--arch", "sm_80", "sm_90"],
                 ["--kernel", "forward_sigmoid", "--mode", "fp16", "ieee", "--arch", "sm_80"]):
        out = tmp_path / f"report{len(results)}.json"
        proc = subprocess.run([sys.executable, "-m", "bmc_fast.kernels.compile_report", *argv, "--json", str(out)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results += json.loads(out.read_text())["results"]
    assert len(results) == 4 * 2 * 2 + 2
    for r in results:
        name = f"{r['kernel']} {r['mode']} {r['arch']}"
        assert r["registers"] > 0 and r["shared_bytes"] > 0, name  # the ptxas log was read
        assert r["shared_bytes"] <= r["shared_limit"], name
        if r["mode"] == "ieee":
            assert r["tensor_core"] is None, name  # exact fp32 dots stay on the FMA units
        else:
            assert r["spill_bytes"] == 0 and r["tensor_core"] == EXPECTED_OP[r["arch"]], (name, r)
        assert r["problems"] == [], (name, r["problems"])
        assert r["tiles"] == vars(tiles.tiles_for(r["kernel"], r["mode"], r["arch"])), name


def test_the_committed_report_used_the_tiles_the_launchers_pick_and_found_no_problem():
    report = json.loads(REPORT.read_text())
    assert len(report["results"]) == len(tiles.KERNELS) * len(tiles.MODES) * len(tiles.ARCHS)
    for r in report["results"]:
        assert r["tiles"] == vars(tiles.tiles_for(r["kernel"], r["mode"], r["arch"])), r
        assert r["problems"] == [] and r["spill_bytes"] == 0, r  # the exact-fp32 builds too


def _every_gpu_tile_shape():
    shapes = {tiles.tiles_for(k, m, a) for k in tiles.KERNELS for m in tiles.MODES for a in tiles.ARCHS}
    return sorted({(t.block_m, t.block_n, t.block_k) for t in shapes})


@pytest.mark.parametrize("block", _every_gpu_tile_shape(), ids=lambda b: "x".join(map(str, b)))
def test_every_gpu_tile_shape_computes_the_torch_twin(block, monkeypatch):
    """The GPU tiles differ from the interpreter's in their feature slice; run each shape interpreted."""
    from bmc_fast.kernels import contrastive_torch as kp
    from bmc_fast.kernels import contrastive_triton as kt

    m, n, k = block
    monkeypatch.setattr(kt, "tiles_for", lambda *args: tiles.Tiles(m, n, k))
    image, texts = F.normalize(torch.randn(70, 40), dim=-1), F.normalize(torch.randn(90, 40), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-2.0)
    pairs = [(kt.softmax_forward(image, texts, scale, None), kp.softmax_forward(image, texts, scale, None)),
             (kt.sigmoid_forward(image, texts, scale, bias, 3), kp.sigmoid_forward(image, texts, scale, bias, 3))]
    row_lse, _, col_max, col_sum, _ = kp.softmax_forward(image, texts, scale, None)
    softmax = dict(sigmoid=False, a_lse=row_lse, a_coef=torch.rand(70), b_lse=col_max + col_sum.log(),
                   b_coef=torch.rand(90), diag_offset=0, diag_coef=torch.full((1,), 0.3))
    sigmoid = dict(sigmoid=True, a_lse=None, a_coef=torch.full((1,), 0.5), b_lse=None, b_coef=None, diag_offset=3,
                   diag_coef=None)
    for stats, b in ((softmax, None), (sigmoid, bias)):
        pairs.append((kt.backward(image, texts, scale, b, **stats), kp.backward(image, texts, scale, b, **stats)))
    for ours, twin in pairs:
        for got, want in zip(ours, twin):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tiles_for_names_what_it_does_not_know():
    assert tiles.arch_of((8, 6)) == "sm_80" and tiles.arch_of((9, 0)) == "sm_90" and tiles.arch_of((10, 0)) == "sm_100"
    assert tiles.tiles_for("backward_softmax", "bf16", None) == tiles.INTERPRETER
    with pytest.raises(ValueError, match="no tiles for kernel 'forward', mode 'bf16', arch 'sm_75'"):
        tiles.tiles_for("forward", "bf16", "sm_75")
