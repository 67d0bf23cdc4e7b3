"""Reading DeepSpeed checkpoint shards with torch.load(weights_only=True): DeepSpeed's plain-data classes come
back equal, anything that would run code is refused before it runs. (The consolidation itself equals
DeepSpeed's bit for bit: the launcher tests in test_train_e2e.py and test_contrastive_accumulation.py.)"""
import pytest
import torch

from bmc_fast.checkpoint.zero_weights import load_shard
from bmc_fast.errors import ConfigError
from helpers import RunsCode


def test_deepspeed_plain_data_classes_round_trip(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    scaler = DynamicLossScaler(init_scale=2.0**12, scale_window=7, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    state = {"zero_stage": ZeroStageEnum.gradients, "address": fragment_address(numel=12, start=4),
             "static": LossScaler(scale=8.0), "dynamic": scaler, "flat": [torch.arange(6.0)]}
    torch.save(state, tmp_path / "optim_states.pt")
    loaded = load_shard(tmp_path / "optim_states.pt")
    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["address"] == fragment_address(numel=12, start=4)
    assert loaded["static"].cur_scale == 8.0 and loaded["dynamic"].__dict__ == scaler.__dict__
    assert torch.equal(loaded["flat"][0], torch.arange(6.0))


@pytest.mark.parametrize("payload", ["runs-code", "unknown-class"])
def test_a_shard_naming_anything_else_is_refused_before_it_runs(payload, tmp_path):
    import fractions

    marker = tmp_path / "code-ran"
    obj = RunsCode(marker) if payload == "runs-code" else fractions.Fraction(1, 3)  # harmless, not allowed
    torch.save({"optimizer_state_dict": {"x": obj}}, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    name = "builtins.exec" if payload == "runs-code" else "fractions.Fraction"
    with pytest.raises(ConfigError, match=rf"optim_states.pt' is refused: it pickles \['{name}'\]"):
        load_shard(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert not marker.exists()
