"""The Transformer Engine switch with TE absent: the clear error, the weight mapping, the wiring.

The wiring runs against tests/reference_te.py (TE's documented semantics in plain torch); TE's own
kernels are not verified here (README: not yet verified on GPU).
"""
import importlib.util

import pytest
import reference_te
import torch

from bmc_fast import create_model
from bmc_fast.te_swap import (
    layernorm_linear_state,
    layernorm_mlp_state,
    swap_to_transformer_engine,
    torch_state_from_layernorm_mlp,
    torch_state_from_te,
)
from helpers import caption_batch

TEXT = {"vocab_size": 300, "pad_token_id": 0, "cls_token_id": 1, "sep_token_id": 2}
EXACT = {"vision": {"act": "quick_gelu"}, "text": {**TEXT, "hidden_activation": "gelu_pytorch_tanh"}}


def test_missing_transformer_engine_is_one_clear_error():
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here; this checks the error without it")
    with pytest.raises(ImportError, match=r"te_precision='fp8' needs NVIDIA Transformer Engine.*"
                                          r"pip install 'transformer-engine\[pytorch\]'"):
        create_model("tiny", te_precision="fp8", text=TEXT)


def test_mlp_mapping_round_trips():
    norm, fc1, fc2 = torch.nn.LayerNorm(8), torch.nn.Linear(8, 32), torch.nn.Linear(16, 8)
    for module in (norm, fc1, fc2):
        for p in module.parameters():
            torch.nn.init.normal_(p)
    back = torch_state_from_layernorm_mlp(layernorm_mlp_state(norm, fc1, fc2))
    want = {f"{name}.{k}": v for name, m in (("norm", norm), ("fc1", fc1), ("fc2", fc2))
            for k, v in m.state_dict().items()}
    assert back.keys() == want.keys()
    for key in want:
        assert torch.equal(back[key], want[key]), key


def test_swapped_state_maps_back_to_the_torch_model():
    """What the evaluate CLI does with a run trained on TE layers: the same weights, in torch names."""
    original = create_model("tiny", **EXACT)
    swapped = create_model("tiny", **EXACT)
    swapped.load_state_dict(original.state_dict())
    swap_to_transformer_engine(swapped, "fp8", te=reference_te.te, te_recipe=reference_te.recipe, device="cpu")
    te_state = {**swapped.state_dict(), "text.transformer.layers.1.attn.Wo._extra_state": torch.zeros(3)}
    back, want = torch_state_from_te(te_state), original.state_dict()
    assert back.keys() == want.keys()
    for key in want:
        assert torch.equal(back[key], want[key]), key


def test_bias_free_norm_maps_to_a_zero_bias():
    norm, linear = torch.nn.LayerNorm(8, bias=False), torch.nn.Linear(8, 24, bias=False)
    state = layernorm_linear_state(norm, linear)
    assert set(state) == {"weight", "layer_norm_weight", "layer_norm_bias"}
    assert torch.equal(state["layer_norm_bias"], torch.zeros(8))


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_swapped_towers_compute_what_the_originals_did(precision):
    original = create_model("tiny", **EXACT).eval()
    swapped = create_model("tiny", **EXACT).eval()
    swapped.load_state_dict(original.state_dict())
    swap_to_transformer_engine(swapped, precision, te=reference_te.te, te_recipe=reference_te.recipe, device="cpu")
    assert type(swapped.visual.transformer.resblocks[0]).__name__ == "TEResidualAttentionBlock"
    layer0, layer1 = swapped.text.transformer.layers[:2]
    assert type(layer0.attn.Wqkv) is reference_te.Linear  # layer 0 has no attention norm
    assert type(layer1.attn.Wqkv) is reference_te.LayerNormLinear
    assert isinstance(layer1.attn_norm, torch.nn.Identity) and isinstance(layer1.mlp_norm, torch.nn.Identity)

    images = torch.randn(16, 3, 64, 64)  # 16 × 17 tokens: a multiple of FP8's 16 rows
    ids, mask = caption_batch([40, 7, 23])
    reference_te.autocast_calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(swapped.encode_image(images), original.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(swapped.encode_text(ids, mask), original.encode_text(ids, mask), rtol=1e-5,
                                   atol=1e-5)
    computed, real = swapped.text.last_token_counts
    if precision == "fp8":
        assert len(reference_te.autocast_calls) == 2
        assert type(reference_te.autocast_calls[0]).__name__ == "DelayedScaling"
        assert computed % 16 == 0 and real == 70 and computed - real < 16
        with pytest.raises(ValueError, match=r"FP8 needs batch × tokens \(3 × 17\) to be a multiple of 16"):
            swapped.encode_image(images[:3])
    else:
        assert not reference_te.autocast_calls and computed == real


def test_exact_gelu_towers_change_only_by_the_tanh_approximation():
    original = create_model("tiny", text=TEXT).eval()  # exact GELU in both towers
    swapped = create_model("tiny", text=TEXT).eval()
    swapped.load_state_dict(original.state_dict())
    swap_to_transformer_engine(swapped, "bf16", te=reference_te.te, te_recipe=reference_te.recipe, device="cpu")
    ids, mask = caption_batch([30, 12])
    with torch.no_grad():
        a, b = original.encode_text(ids, mask), swapped.encode_text(ids, mask)
    assert 0 < (a - b).abs().max() < 1e-2 * a.abs().max()
