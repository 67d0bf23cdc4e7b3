"""BMCLongCLIP against Hugging Face's own ModernBertModel forward and plain-torch definitions."""
import math

import pytest
import torch

from bmc_fast.model.clip import BMCLongCLIP
from bmc_fast.model.config import load_model_config
from bmc_fast.model.text_tower import masked_mean
from bmc_fast.trainer.param_groups import param_groups


@pytest.fixture
def model(small_data):
    cfg = load_model_config("tiny").with_tokenizer(small_data["tokenizer"])
    return BMCLongCLIP(cfg).eval()


def _batch(tokenizer, texts, context_length=512):
    return tokenizer(texts, padding="longest", truncation=True, max_length=context_length, return_tensors="pt")


def test_text_tower_is_hf_modernbert_with_masked_mean(model, small_data):
    from transformers import ModernBertModel

    tokenizer = small_data["tokenizer"]
    assert type(model.text.transformer) is ModernBertModel
    tokens = _batch(tokenizer, ["short caption", "a much longer caption " * 20, "mid length caption " * 5])
    with torch.no_grad():
        ours = model.encode_text(tokens["input_ids"], tokens["attention_mask"], project=False)
        # Reference: each caption alone, unpadded, through HF's own SDPA forward; plain mean over its tokens.
        model.text.transformer.set_attn_implementation("sdpa")
        for i in range(3):
            n = int(tokens["attention_mask"][i].sum())
            alone = model.text.transformer(input_ids=tokens["input_ids"][i:i + 1, :n]).last_hidden_state
            torch.testing.assert_close(ours[i], alone[0].mean(0), rtol=1e-4, atol=1e-5)


def test_text_embedding_ignores_padding(model, small_data):
    tokens = _batch(small_data["tokenizer"], ["a caption", "another caption that is a bit longer"])
    pad = small_data["tokenizer"].pad_token_id
    ids = torch.cat([tokens["input_ids"], torch.full((2, 9), pad)], dim=1)
    mask = torch.cat([tokens["attention_mask"], torch.zeros(2, 9, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        b = model.encode_text(ids, mask)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_masked_mean_matches_loop():
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    want = torch.stack([hidden[i, : int(mask[i].sum())].mean(0) for i in range(3)])
    torch.testing.assert_close(masked_mean(hidden, mask), want)


def test_encode_image_matches_manual_vit(model):
    """The ViT written out with nn.MultiheadAttention on the same weights (open_clip's formulation)."""
    visual = model.visual
    pixels = torch.randn(2, 3, visual.cfg.image_size, visual.cfg.image_size)
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], 1) + visual.positional_embedding
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks:
        mha = torch.nn.MultiheadAttention(visual.cfg.width, visual.cfg.heads, batch_first=True)
        mha.load_state_dict(block.attn.state_dict())
        h = block.ln_1(x)
        x = x + mha(h, h, h, need_weights=False)[0]
        x = x + block.mlp(block.ln_2(x))
    want = visual.ln_post(x[:, 0]) @ visual.proj
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), want, rtol=1e-4, atol=1e-5)
        out = model.encode_image(pixels, normalize=True)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


def test_forward_normalises_and_clamps_scale(model, small_data):
    tokens = _batch(small_data["tokenizer"], ["one", "two"])
    pixels = torch.randn(2, 3, 64, 64)
    image, text, scale = model(pixels, tokens["input_ids"], tokens["attention_mask"])
    assert image.shape == text.shape == (2, model.cfg.embed_dim)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert scale.shape == () and scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0, rel=1e-5)


def test_text_longer_than_context_is_rejected(small_data):
    cfg = load_model_config("tiny", context_length=77).with_tokenizer(small_data["tokenizer"])
    model = BMCLongCLIP(cfg)
    ids = torch.ones(1, 78, dtype=torch.long)
    with pytest.raises(ValueError, match="length 78 exceeds context_length 77"):
        model.encode_text(ids, torch.ones_like(ids))


def test_bad_image_shape(model):
    with pytest.raises(ValueError, match=r"pixels must have shape \(batch, 3, 64, 64\)"):
        model.encode_image(torch.randn(1, 3, 32, 32))


def test_param_groups_follow_open_clip_weight_decay_rule(model):
    decay, no_decay = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" not in decayed
    assert not any("bias" in n or "ln_" in n or "norm" in n for n in decayed)
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" in decayed
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_logit_scale_init_is_clip():
    assert load_model_config("tiny").init_logit_scale == pytest.approx(math.log(1 / 0.07))


def test_the_package_front_door_is_the_functions_themselves():
    """``bmc_fast.create_model`` / ``load_model`` are the real functions (signatures included), loaded on first use."""
    import inspect

    import bmc_fast
    from bmc_fast.checkpoint.load import load_model
    from bmc_fast.model.clip import create_model

    assert bmc_fast.create_model is create_model and bmc_fast.load_model is load_model
    assert list(inspect.signature(bmc_fast.create_model).parameters)[:3] == ["preset_or_json", "image_weights",
                                                                             "text_weights"]
    with pytest.raises(AttributeError, match="has no attribute 'train_model'"):
        bmc_fast.train_model  # noqa: B018
