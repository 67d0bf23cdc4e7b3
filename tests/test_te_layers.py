"""Transformer Engine layers with TE absent: the clear error, the model built on TE layers, its weight names.

The TE modules are tests/reference_te.py's (TE's documented semantics in plain torch); TE's own kernels are not
verified here (README: not yet verified on GPU).
"""
import dataclasses
import importlib.util

import pytest
import reference_te
import torch

from bmc_fast import create_model
from bmc_fast.model.clip import BMCLongCLIP
from bmc_fast.model.state_dict_adapters import TransformerEngine
from bmc_fast.model.weights import load_torch_state
from helpers import caption_batch

TEXT = {"vocab_size": 300, "pad_token_id": 0, "cls_token_id": 1, "sep_token_id": 2}
EXACT = {"vision": {"act": "quick_gelu"}, "text": {**TEXT, "hidden_activation": "gelu_pytorch_tanh"}}


def test_missing_transformer_engine_is_one_clear_error():
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here; this checks the error without it")
    with pytest.raises(ImportError, match=r"te_precision='fp8' needs NVIDIA Transformer Engine.*"
                                          r"pip install 'transformer-engine\[pytorch\]'"):
        create_model("tiny", te_precision="fp8", text=TEXT)


def _on_te_layers(original, precision):
    """A model of ``original``'s config built on TE layers, holding ``original``'s weights."""
    model = BMCLongCLIP(dataclasses.replace(original.cfg, te_precision=precision), te_layers=reference_te.layers)
    load_torch_state(model, original.state_dict())
    return model.eval()


def test_the_te_model_is_built_on_te_layers_and_names_its_weights_as_te_does():
    model = BMCLongCLIP(dataclasses.replace(create_model("tiny", **EXACT).cfg, te_precision="bf16"),
                        te_layers=reference_te.layers)
    assert type(model.visual.transformer.resblocks[0]).__name__ == "TEResidualAttentionBlock"
    layer0, layer1 = model.text.transformer.layers[:2]
    assert type(layer0.attn.Wqkv) is reference_te.Linear  # layer 0 has no attention norm
    assert type(layer1.attn.Wqkv) is reference_te.LayerNormLinear
    assert isinstance(layer1.attn_norm, torch.nn.Identity) and isinstance(layer1.mlp_norm, torch.nn.Identity)
    # ModernBERT's norms have no bias: TE's is zero and stays so
    assert not layer1.attn.Wqkv.layer_norm_bias.requires_grad and not layer1.attn.Wqkv.layer_norm_bias.any()
    names = set(model.state_dict())
    assert "visual.transformer.resblocks.0.ln_mlp.fc1_weight" in names
    assert "text.transformer.layers.1.mlp.ln_mlp.layer_norm_bias" in names


def test_the_te_state_maps_back_to_the_torch_model():
    """What evaluation and export do with a run trained on TE layers: the same weights, in torch names."""
    original = create_model("tiny", **EXACT)
    te_state = {**_on_te_layers(original, "fp8").state_dict(),
                "text.transformer.layers.1.attn.Wo._extra_state": torch.zeros(3)}
    back, want = TransformerEngine.from_te(te_state), original.state_dict()
    assert back.keys() == want.keys()
    for key in want:
        assert torch.equal(back[key], want[key]), key


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_te_towers_compute_what_the_torch_towers_do(precision):
    original = create_model("tiny", **EXACT).eval()
    model = _on_te_layers(original, precision)
    images = torch.randn(16, 3, 64, 64)  # 16 × 17 tokens: a multiple of FP8's 16 rows
    ids, mask = caption_batch([40, 7, 23])
    reference_te.autocast_calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), original.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(ids, mask), original.encode_text(ids, mask), rtol=1e-5,
                                   atol=1e-5)
    computed, real = model.text.last_token_counts
    if precision == "fp8":
        assert len(reference_te.autocast_calls) == 2
        assert type(reference_te.autocast_calls[0]).__name__ == "DelayedScaling"
        assert computed % 16 == 0 and real == 70 and computed - real < 16
        with pytest.raises(ValueError, match=r"FP8 needs batch × tokens \(3 × 17\) to be a multiple of 16"):
            model.encode_image(images[:3])
    else:
        assert not reference_te.autocast_calls and computed == real


def test_exact_gelu_towers_change_only_by_the_tanh_approximation():
    original = create_model("tiny", text=TEXT).eval()  # exact GELU in both towers
    model = _on_te_layers(original, "bf16")
    ids, mask = caption_batch([30, 12])
    with torch.no_grad():
        a, b = original.encode_text(ids, mask), model.encode_text(ids, mask)
    assert 0 < (a - b).abs().max() < 1e-2 * a.abs().max()


def test_te_layers_start_drawn_like_the_torch_layers():
    """Random init on TE layers follows the torch layers' distributions (nn.Linear's bound, ModernBERT's truncated
    normal): no tower starts at TE's own std 0.023."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(create_model("tiny", text=TEXT).cfg, te_precision="bf16")
    model = BMCLongCLIP(cfg, te_layers=reference_te.layers)
    fc1 = model.visual.transformer.resblocks[0].ln_mlp.fc1_weight  # nn.Linear: U(±1/√fan_in)
    assert fc1.abs().max() <= fc1.shape[1] ** -0.5 and fc1.std() > 0.5 * fc1.shape[1] ** -0.5 / 3 ** 0.5
    wi = model.text.transformer.layers[1].mlp.ln_mlp.fc1_weight  # trunc_normal(0.02, ±2σ)
    assert wi.abs().max() <= 0.04 and 0.012 < wi.std() < 0.02
