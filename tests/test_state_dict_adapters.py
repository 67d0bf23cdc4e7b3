"""The state-dict adapters (``bmc_fast.model.state_dict_adapters``), each against the library it speaks to.

For every format: ``from_x(to_x(ours))`` gives back our tensors themselves (same keys, no copies), and where the
outside format is lossless, ``to_x(from_x(theirs))`` gives back theirs. Then each format against its library:
timm's ``VisionTransformer`` and Hugging Face's ``ModernBertModel`` load ``to_x(ours)`` strictly and compute what
our towers do; open_clip's ``VisionTransformer`` loads our image tower strictly and its state comes back as ours;
the model on Transformer Engine layers (tests/reference_te.py) loads ``to_te(ours)`` strictly and embeds as the
torch model does. Last, ``create_model(text_weights=...)`` loads the tensors ``ModernBertModel.from_pretrained``
does, from a ``ModernBertModel`` and from a ``ModernBertForMaskedLM`` checkpoint. Every tensor is perturbed with a
seeded generator, so that two swapped LayerNorms or a transposed projection cannot pass.
"""
import dataclasses

import pytest
import reference_te
import torch

from bmc_fast import create_model
from bmc_fast.model.clip import BMCLongCLIP
from bmc_fast.model.config import load_model_config
from bmc_fast.model.state_dict_adapters import ModernBert, OpenClip, Timm, TransformerEngine
from bmc_fast.model.text_tower import masked_mean
from helpers import assert_same_tensors, caption_batch, timm_vit

TEXT = {"vocab_size": 300, "pad_token_id": 0, "cls_token_id": 1, "sep_token_id": 2}
EXACT = {"vision": {"act": "quick_gelu"}, "text": {**TEXT, "hidden_activation": "gelu_pytorch_tanh"}}  # TE's GELU

ADAPTERS = {  # name: (to, from, the part of our state the format holds)
    "open_clip": (OpenClip.to_open_clip, OpenClip.from_open_clip, ""),
    "timm": (Timm.to_timm, Timm.from_timm, "visual."),
    "modernbert": (ModernBert.to_hf, ModernBert.from_hf, "text.transformer."),
    "transformer_engine": (TransformerEngine.to_te, TransformerEngine.from_te, ""),
}


def _perturbed(state, seed=7):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}


def _ours(**overrides):
    """The tiny model (``overrides`` merged into its text/vision overrides), every tensor perturbed; eval mode."""
    model = create_model("tiny", **{"text": TEXT, **overrides})
    model.load_state_dict(_perturbed(model.state_dict()))
    return model.eval()


def _relative_error(ours, reference):
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def _under(state, prefix):
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", ADAPTERS)
def test_ours_round_trips_as_the_same_tensors(name):
    to_x, from_x, scope = ADAPTERS[name]
    state = _ours().state_dict()
    state = {k: v for k, v in state.items() if k.startswith(scope)}
    back = from_x(to_x(state))
    assert_same_tensors(back, state)
    copied = [k for k, v in state.items() if back[k].untyped_storage().data_ptr() != v.untyped_storage().data_ptr()]
    assert not copied, copied  # the module's promise: reshapes are views, nothing is copied


def _open_clip_vit(cfg, text_layers=1):
    """open_clip's own ``CLIP`` with ``cfg``'s image tower (and a small text transformer of its own)."""
    from open_clip.model import CLIP

    v = cfg.vision
    return CLIP(cfg.embed_dim, quick_gelu=v.act == "quick_gelu",
                vision_cfg=dict(image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.layers,
                                head_width=v.width // v.heads, mlp_ratio=v.mlp_ratio),
                text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=text_layers))


def _te_model(cfg):
    return BMCLongCLIP(dataclasses.replace(cfg, te_precision="bf16"), te_layers=reference_te.layers)


def _theirs(name):
    """(state, want): a state dict built by the outside format's own library, perturbed, and what
    ``to_x(from_x(state))`` must give back (itself, but for ModernBertForMaskedLM: its encoder, MLM head dropped)."""
    cfg = load_model_config("tiny", text=TEXT)
    if name == "open_clip":
        state = _perturbed(_open_clip_vit(cfg).state_dict())
    elif name == "timm":
        state = {**_perturbed(timm_vit(cfg).state_dict()), "head.bias": torch.zeros(cfg.embed_dim)}
    elif name == "modernbert":
        from transformers import ModernBertConfig, ModernBertModel

        state = _perturbed(ModernBertModel(ModernBertConfig(**cfg.text.to_hf_kwargs())).state_dict())
    elif name == "modernbert_mlm":
        from transformers import ModernBertConfig, ModernBertForMaskedLM

        state = _perturbed(ModernBertForMaskedLM(ModernBertConfig(**cfg.text.to_hf_kwargs())).state_dict())
        assert any(k.startswith(ModernBert.MLM_HEAD) for k in state)
        return state, {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    else:  # the TE model's own state: its layer-norm biases are ModernBERT's zeros, which to_te writes back
        state = _perturbed(_te_model(cfg).state_dict())
        state = {k: torch.zeros_like(v) if k.startswith("text.") and k.endswith("layer_norm_bias") else v
                 for k, v in state.items()}
    return state, state


@pytest.mark.parametrize("name", ["open_clip", "timm", "modernbert", "modernbert_mlm", "transformer_engine"])
def test_theirs_round_trips_where_the_format_is_lossless(name):
    to_x, from_x, _ = ADAPTERS[name.removesuffix("_mlm")]
    state, want = _theirs(name)
    assert_same_tensors(to_x(from_x(state)), want)


def test_a_timm_head_bias_that_is_not_zero_comes_back_for_the_loader_to_refuse():
    state, _ = _theirs("timm")
    assert "visual.head.bias" not in Timm.from_timm(state)  # zero: a CLIP projection
    state["head.bias"] = state["head.bias"] + 1e-3
    assert torch.equal(Timm.from_timm(state)["visual.head.bias"], state["head.bias"])


# ------------------------------------------------------------------------------- against the real libraries
@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_timm_loads_our_image_tower_and_computes_what_it_does(act):
    ours = _ours(vision={"act": act})
    theirs = timm_vit(ours.cfg).eval()
    theirs.load_state_dict(Timm.to_timm(ours.state_dict()), strict=True)
    images = torch.randn(3, 3, ours.cfg.vision.image_size, ours.cfg.vision.image_size)
    with torch.no_grad():
        assert _relative_error(ours.visual(images), theirs(images)) < 1e-5


def test_drop_path_drops_what_timm_drops_on_the_same_rng_stream():
    """Stochastic depth at the paper's 0.1: timm's tower (drop_path_rate 0.1, its per-block ramp) and ours draw the
    same per-sample masks from the same seed in training and embed alike; in eval both are the tower without it.
    The layer alone against ``timm.layers.DropPath`` too: which samples drop, and 1/(1 - p) on the kept ones."""
    from timm.layers import DropPath as TimmDropPath

    from bmc_fast.model.vision_tower import DropPath

    x = torch.randn(64, 5, 7)
    for layer, reference in ((DropPath(0.3), TimmDropPath(0.3)), (DropPath(0.0), TimmDropPath(0.0))):
        torch.manual_seed(3)
        got = layer(x)
        torch.manual_seed(3)
        assert torch.equal(got, reference(x))
        assert torch.equal(layer.eval()(x), x)
    dropped = DropPath(0.3)(x)
    kept = (dropped != 0).flatten(1).all(1)  # (64,): whole samples are kept or dropped
    assert 0 < kept.sum() < 64 and not dropped[~kept].any() and torch.allclose(dropped[kept], x[kept] / 0.7)

    ours = _ours(vision={"drop_path": 0.1})
    theirs = timm_vit(ours.cfg, drop_path_rate=0.1)
    theirs.load_state_dict(Timm.to_timm(ours.state_dict()), strict=True)
    rates = [block.drop_path.p for block in ours.visual.transformer.resblocks]
    assert rates == [getattr(block.drop_path1, "drop_prob", 0.0) for block in theirs.blocks]  # 0: Identity
    assert rates[-1] == pytest.approx(0.1)
    images = torch.randn(16, 3, ours.cfg.vision.image_size, ours.cfg.vision.image_size)
    with torch.no_grad():
        outputs = {}
        for mode in ("train", "eval"):
            for name, model in (("ours", ours.visual), ("timm", theirs)):
                torch.manual_seed(7)
                outputs[name, mode] = getattr(model, mode)()(images)
    assert _relative_error(outputs["ours", "train"], outputs["timm", "train"]) < 1e-5
    assert _relative_error(outputs["ours", "eval"], outputs["timm", "eval"]) < 1e-5
    assert _relative_error(outputs["ours", "train"], outputs["ours", "eval"]) > 1e-3  # paths were dropped


def test_hf_modernbert_loads_our_text_transformer_and_computes_what_it_does():
    from transformers import ModernBertConfig, ModernBertModel

    ours = _ours()
    hf = ModernBertModel(ModernBertConfig(**ours.cfg.text.to_hf_kwargs(), attn_implementation="sdpa")).eval()
    hf.load_state_dict(ModernBert.to_hf(ours.state_dict()), strict=True)
    ids, mask = caption_batch([1, 9, 70, 131])  # 131: past the 64-token half window of local layers
    with torch.no_grad():
        want = masked_mean(hf(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        got = ours.encode_text(ids, mask, project=False)
    assert _relative_error(got, want) < 1e-5


def test_open_clip_holds_our_image_tower_under_the_same_names():
    ours = _ours()
    state = ours.state_dict()
    theirs = OpenClip.to_open_clip(state)
    assert theirs["logit_scale"].shape == () and theirs["logit_scale"] == state["logit_scale"][0]
    assert all(theirs[k] is v for k, v in state.items() if k != "logit_scale")  # the same names and tensors
    tower = _open_clip_vit(ours.cfg).visual
    tower.load_state_dict(_under(theirs, "visual."), strict=True)
    # an image tower alone (``conv1.weight`` at the top), as open_clip names it, comes back under ``visual.``
    assert_same_tensors(OpenClip.from_open_clip(tower.state_dict()),
                        {k: v for k, v in state.items() if k.startswith("visual.")})


def test_the_model_on_te_layers_loads_our_state_and_embeds_as_we_do():
    ours = _ours(**EXACT)
    te_model = _te_model(ours.cfg).eval()
    te_model.load_state_dict(TransformerEngine.to_te(ours.state_dict()), strict=True)
    images = torch.randn(3, 3, 64, 64)
    ids, mask = caption_batch([40, 7, 23])
    with torch.no_grad():
        torch.testing.assert_close(te_model.encode_image(images), ours.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(te_model.encode_text(ids, mask), ours.encode_text(ids, mask), rtol=1e-5,
                                   atol=1e-5)
    assert_same_tensors(TransformerEngine.from_te(te_model.state_dict()), ours.state_dict())


# ------------------------------------------------------------------------ the loader against the library's own
@pytest.mark.parametrize("hf_class", ["ModernBertModel", "ModernBertForMaskedLM"])
def test_text_weights_load_as_hf_from_pretrained_loads_them(hf_class, tmp_path):
    import transformers

    cfg = load_model_config("tiny", text=TEXT)
    saved = getattr(transformers, hf_class)(transformers.ModernBertConfig(**cfg.text.to_hf_kwargs()))
    saved.load_state_dict(_perturbed(saved.state_dict()))
    saved.save_pretrained(tmp_path)
    ours = create_model("tiny", text_weights=tmp_path, text=TEXT)
    want = transformers.ModernBertModel.from_pretrained(tmp_path).state_dict()
    assert_same_tensors(ours.text.transformer.state_dict(), want)
