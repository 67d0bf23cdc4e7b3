"""``grad_norm_dtype``: DeepSpeed's ZeRO optimizers take the clipping norm in the chosen dtype, and the norm
still equals a float64 torch reference."""

import pytest
import torch

from bmc_fast.errors import ConfigError
from bmc_fast.trainer.config import TrainConfig
from bmc_fast.trainer.grad_norm import resolve_grad_norm_dtype, set_grad_norm_dtype
from helpers import run_one_rank_script

# One process, one rank over gloo: a ZeRO engine per (stage, choice); each takes a step of the same loss on the
# same weights and reports DeepSpeed's global gradient norm and the dtypes its norms were taken in.
ENGINE_SCRIPT = r"""
import json, os, sys
import torch, deepspeed
from bmc_fast.trainer.grad_norm import set_grad_norm_dtype

seen = []
vector_norm = torch.linalg.vector_norm
def spy(x, *args, **kwargs):
    seen.append(str(x.dtype))
    return vector_norm(x, *args, **kwargs)
torch.linalg.vector_norm = spy

torch.manual_seed(0)
x, y = torch.randn(16, 32), torch.randn(16, 8)
base = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
ref = [p.detach().clone() for p in base.parameters()]
out = {}
for stage, choice in [(1, "float32"), (1, "float64"), (2, "float32"), (3, "float32")]:
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    with torch.no_grad():
        for p, r in zip(model.parameters(), ref):
            p.copy_(r)
    config = {"train_batch_size": 16, "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    chosen = set_grad_norm_dtype(choice, "cpu")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    seen.clear()
    engine.backward((engine(x) - y).pow(2).mean() * 100)
    engine.step()
    out[f"{stage}/{choice}"] = {"norm": float(engine.get_global_grad_norm()), "chosen": str(chosen),
                                "dtypes": sorted(set(seen))}
print(json.dumps(out))
"""


def test_zero_norm_in_the_chosen_dtype_equals_a_float64_reference(tmp_path):
    got, _ = run_one_rank_script(ENGINE_SCRIPT)

    torch.manual_seed(0)  # the same draws as the script, in float64
    x, y = torch.randn(16, 32), torch.randn(16, 8)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).double()
    ((model(x.double()) - y.double()).pow(2).mean() * 100).backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])).item()
    assert expected > 1.0  # clipping is active: the norm is the one DeepSpeed scales by

    for key, r in got.items():
        assert r["norm"] == pytest.approx(expected, rel=1e-5), key
    for key in ("1/float32", "2/float32", "3/float32"):
        assert got[key]["chosen"] == "torch.float32" and got[key]["dtypes"] == ["torch.float32"], key
    assert got["1/float64"]["chosen"] == "torch.float64" and "torch.float64" in got["1/float64"]["dtypes"]


def test_auto_is_float32_on_cpu_and_deepspeeds_own_elsewhere():
    assert resolve_grad_norm_dtype("auto", "cpu") is torch.float32
    assert resolve_grad_norm_dtype("auto", "cuda") is None
    assert resolve_grad_norm_dtype("float32", "cuda") is torch.float32
    assert resolve_grad_norm_dtype("float64", "cpu") is None
    with pytest.raises(ConfigError, match="--grad-norm-dtype 'half'"):
        resolve_grad_norm_dtype("half", "cpu")
    with pytest.raises(ConfigError, match="grad.norm.dtype"):
        TrainConfig(grad_norm_dtype="half")


def test_a_deepspeed_without_get_norm_dtype_refuses_float32_and_keeps_its_own_norm(monkeypatch):
    from deepspeed.runtime.zero import stage_1_and_2

    monkeypatch.delattr(stage_1_and_2, "get_norm_dtype")
    with pytest.raises(ConfigError, match="stage_1_and_2 has no get_norm_dtype.*--grad-norm-dtype float64"):
        set_grad_norm_dtype("float32", "cpu")
    assert set_grad_norm_dtype("float64", "cpu") is torch.float64  # DeepSpeed's own: nothing to replace
    assert not hasattr(stage_1_and_2, "get_norm_dtype")
