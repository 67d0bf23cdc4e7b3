"""Real-weight import and the unpadded text path, against open_clip, timm and Hugging Face themselves.

Checkpoints are random-init models of the real classes with every tensor perturbed (so that a swapped
LayerNorm or a transposed projection cannot pass), saved to disk as users would have them.
"""
import pytest
import torch

from bmc_fast import create_model
from bmc_fast.errors import ConfigError
from bmc_fast.model.caption_layout import GroupedCaptions, caption_buckets
from bmc_fast.model.config import load_model_config
from bmc_fast.model.text_tower import masked_mean, varlen_sdpa_attention

PRESET = "bmc-longclip-l14-512"
ONE_TEXT_LAYER = {"num_hidden_layers": 1}  # the image-weight tests: ModernBERT-base's random init alone takes ~10 s
# The real towers' widths, heads and names at a fraction of their depth: a block's keys and shapes are the same at
# any index, and 24 ViT-L blocks or 22 ModernBERT layers cost the suite a minute. Four text layers keep global
# and local (windowed) attention both.
VIT_L_BLOCKS = 2
TEXT_LAYERS = 4
VIT_L = {"act": "gelu", "layers": VIT_L_BLOCKS}  # as open_clip's ViT-L-14 and timm's builds (GELU)


def _perturbed(state):
    g = torch.Generator().manual_seed(7)
    return {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}


def _relative_error(ours, reference):
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def open_clip_vit(tmp_path_factory):
    import open_clip

    config = open_clip.get_model_config("ViT-L-14")
    config["vision_cfg"]["layers"] = VIT_L_BLOCKS
    model = open_clip.model.CLIP(**config)  # open_clip's ViT-L-14 config, random init (no hub), GELU
    model.load_state_dict(_perturbed(model.state_dict()))
    path = tmp_path_factory.mktemp("open_clip") / "vit-l-14.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_open_clip_vit_l14_loads_and_matches(open_clip_vit):
    reference, path = open_clip_vit
    ours = create_model(PRESET, image_weights=path, vision=VIT_L, text=ONE_TEXT_LAYER).eval()  # strict load
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = reference.encode_image(images)
        got = ours.encode_image(images)
    assert got.shape == (2, 768)
    assert _relative_error(got, want) < 1e-5


def test_timm_names_load_and_match(tmp_path):
    import timm

    model = timm.create_model("vit_large_patch14_clip_224", pretrained=False, num_classes=768,
                              depth=VIT_L_BLOCKS).eval()
    state = _perturbed(model.state_dict())
    state["head.bias"] = torch.zeros(768)  # CLIP projections carry no bias
    model.load_state_dict(state)
    torch.save(state, tmp_path / "timm.pt")
    ours = create_model(PRESET, image_weights=tmp_path / "timm.pt", vision=VIT_L, text=ONE_TEXT_LAYER)
    ours = ours.visual.eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert _relative_error(ours(images), model(images)) < 1e-5


def test_image_proj_linear_keeps_a_fresh_projection(open_clip_vit):
    reference, path = open_clip_vit
    ours = create_model(PRESET, image_weights=path, image_proj="linear", vision=VIT_L, text=ONE_TEXT_LAYER)
    assert not torch.equal(ours.visual.proj, reference.visual.proj)
    torch.testing.assert_close(ours.visual.ln_post.weight, reference.visual.ln_post.weight)


def test_checkpoint_with_wrong_keys_lists_them(open_clip_vit, tmp_path):
    _, path = open_clip_vit
    state = torch.load(path, weights_only=True)
    del state["visual.ln_pre.bias"]
    state["visual.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(ConfigError, match=r"missing \['ln_pre.bias'\], unexpected \['extra.weight'\]"):
        create_model(PRESET, image_weights=bad, vision=VIT_L, text=ONE_TEXT_LAYER)


# --------------------------------------------------------------------------------------------------- text
@pytest.fixture(scope="module")
def bioclinical_dir(tmp_path_factory):
    from transformers import ModernBertConfig, ModernBertModel

    text = load_model_config(PRESET, text={"num_hidden_layers": TEXT_LAYERS}).text
    config = ModernBertConfig(**{**text.to_hf_kwargs(), "pad_token_id": 50283, "cls_token_id": 50281,
                                 "sep_token_id": 50282, "bos_token_id": 50281, "eos_token_id": 50282})
    model = ModernBertModel(config)
    model.load_state_dict(_perturbed(model.state_dict()))
    directory = tmp_path_factory.mktemp("bioclinical")
    model.save_pretrained(directory)
    return directory


SMALL_VISION = {"width": 64, "layers": 1, "heads": 2}  # the text-weight tests: the image tower plays no part


def _text_tower(weights, unpad=True, **text):
    """The text tower of the preset (``text`` overrides), built and then loaded from ``weights``."""
    text = {"num_hidden_layers": TEXT_LAYERS, **text}
    return create_model(PRESET, text_weights=weights, text_unpad=unpad, vision=SMALL_VISION, text=text).text


def _caption_batch(lengths, context=512, vocab=50368, pad=50283):
    ids = torch.full((len(lengths), max(lengths)), pad)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(0, 50280, (n,))
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
def test_bioclinical_modernbert_matches_hf_padded_sdpa(bioclinical_dir, unpad):
    from transformers import ModernBertModel

    ours = _text_tower(bioclinical_dir, unpad).eval()
    reference = ModernBertModel.from_pretrained(bioclinical_dir, attn_implementation="sdpa").eval()
    ids, mask = _caption_batch([1, 7, 128, 129, 300, 512])  # crosses the 128-token local window
    with torch.no_grad():
        want = masked_mean(reference(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        got = ours(ids, mask, project=False)
    assert _relative_error(got, want) < 1e-5
    computed, real = ours.last_token_counts
    assert real == int(mask.sum())
    assert computed / real <= (1.05 if unpad else 512 * 6 / real)


def test_text_weights_with_a_missing_tensor(bioclinical_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(bioclinical_dir, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(weights)
    del state["layers.3.mlp.Wo.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"missing keys \['layers.3.mlp.Wo.weight'\]"):
        _text_tower(tmp_path / "ckpt")


@pytest.mark.parametrize("override, message", [
    ({"num_hidden_layers": 12}, rf"'num_hidden_layers': \({TEXT_LAYERS}, 12\)"),
    ({"hidden_activation": "silu"}, r"'hidden_activation': \('gelu', 'silu'\)"),
    ({"global_attn_every_n_layers": 1}, r"'layer_types': \(\['full_attention', 'sliding_attention'"),
])
def test_text_weights_of_another_architecture(bioclinical_dir, override, message):
    """Every attribute that shapes the network must match: evaluation rebuilds the tower from the preset."""
    with pytest.raises(ConfigError, match=message):
        _text_tower(bioclinical_dir, **override)


def test_context_length_above_max_positions():
    with pytest.raises(ConfigError, match="context_length 9000 > text.max_position_embeddings 8192"):
        load_model_config(PRESET, context_length=9000)


def test_token_id_outside_vocabulary_is_named():
    model = create_model("tiny", text={"vocab_size": 100, "pad_token_id": 0, "cls_token_id": 1, "sep_token_id": 2})
    ids = torch.tensor([[1, 5, 250, 2]])
    with pytest.raises(ValueError, match=r"token id 250 is outside the text tower's vocabulary \[0, 100\)"):
        model.encode_text(ids, torch.ones_like(ids))


# --------------------------------------------------------------------------------------------------- switches
TINY_TEXT = {"vocab_size": 300, "pad_token_id": 0, "cls_token_id": 1, "sep_token_id": 2}


def test_attention_backends_agree():
    eager = create_model("tiny", attn_backend="eager", text=TINY_TEXT).eval()
    sdpa = create_model("tiny", attn_backend="sdpa", text=TINY_TEXT).eval()
    sdpa.load_state_dict(eager.state_dict())
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(eager.encode_image(images), sdpa.encode_image(images), rtol=1e-5, atol=1e-6)
    flash = create_model("tiny", attn_backend="flash", text=TINY_TEXT)
    with pytest.raises(ValueError, match="attn_backend='flash' cannot run here: it runs on CUDA only"):
        flash.encode_image(images)


@pytest.mark.parametrize("dtype, autocast, installed, expected", [
    (torch.float32, False, {"flash_attn": True}, "bmc_varlen_sdpa"),  # flash kernels take fp16/bf16 only
    (torch.bfloat16, False, {"flash_attn": True}, "flash_attention_2"),
    (torch.float32, True, {"flash_attn": True}, "flash_attention_2"),  # autocast's dtype is what attention sees
    (torch.bfloat16, False, {}, "bmc_varlen_torch"),  # torch's built-in FlashAttention-2
    (torch.bfloat16, False, {"fa4": True, "flash_attn": True}, "bmc_varlen_torch"),  # FA4 inside varlen_attn
])
def test_unpadded_path_picks_its_attention_function_by_dtype_and_installed_set(monkeypatch, dtype, autocast,
                                                                               installed, expected):
    from bmc_fast.model import attn_backend

    tower = create_model("tiny", text=TINY_TEXT).text.to(dtype)
    support = attn_backend.AttentionSupport("cuda", (9, 0), torch_varlen=True, **installed)
    monkeypatch.setattr(attn_backend, "attention_support", lambda device: support)
    monkeypatch.setattr(attn_backend, "activate_fa4", lambda: None)  # no FA4 here to switch to
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: autocast)
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: torch.bfloat16)
    assert tower._varlen_attention(torch.device("cuda")) == expected  # only the device is read, no CUDA call


def test_unpadded_and_padded_tiny_towers_agree_with_windows():
    """Local window 16 on captions up to 60 tokens: packing, RoPE restarts and windows all matter."""
    text = {**TINY_TEXT, "local_attention": 16}
    unpadded = create_model("tiny", text=text).eval()
    padded = create_model("tiny", text_unpad=False, text=text).eval()
    padded.load_state_dict(unpadded.state_dict())
    ids, mask = _caption_batch([60, 3, 17, 44], vocab=300, pad=0)
    ids = ids.clamp(max=299)
    with torch.no_grad():
        torch.testing.assert_close(unpadded.encode_text(ids, mask), padded.encode_text(ids, mask), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_activation_checkpointing_keeps_gradients(tower):
    plain = create_model("tiny", text=TINY_TEXT)
    overrides = {"text": TINY_TEXT, tower: {**(TINY_TEXT if tower == "text" else {}), "grad_checkpointing": True}}
    checkpointed = create_model("tiny", **overrides)
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 64, 64)
    ids, mask = _caption_batch([20, 9], vocab=300, pad=0)
    ids = ids.clamp(max=299)
    grads, block_calls = [], []
    for model in (plain, checkpointed):
        model.train()
        # HF checkpoints a layer's forward, not its __call__: count a module inside the text layer
        block = model.visual.transformer.resblocks[0] if tower == "vision" else model.text.transformer.layers[0].attn
        calls = []
        # the recompute may stop before the block ends
        block.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        image, text, scale = model(images, ids, mask)
        (image @ text.T * scale).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        block_calls.append(len(calls))
    assert block_calls == [1, 2]  # checkpointing recomputes the block during backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_caption_buckets_bound_padding_and_cover_every_caption():
    lengths = [512, 500, 300, 129, 128, 130, 7, 1, 6]
    buckets = caption_buckets(lengths, slack=1.25)
    assert sorted(i for group in buckets for i in group) == list(range(len(lengths)))
    for group in buckets:
        longest = max(lengths[i] for i in group)
        assert lengths[group[0]] == longest
        assert len(group) * longest ** 2 <= 1.25 * sum(lengths[i] ** 2 for i in group)
    assert [128, 129, 130] in [sorted(lengths[i] for i in g) for g in buckets]  # similar lengths share a call


@pytest.mark.parametrize(("window", "lengths"), [
    (None, [31, 30, 29, 30, 3, 1, 2, 17, 16]), (9, [31, 30, 29, 30, 3, 1, 2, 17, 16]),
    (5, [90, 7, 100]),  # 90 and 100 share a call: the 90's padded rows 95..99 see no key of the window
], ids=["global", "local", "local-padded-rows-outside-the-window"])
def test_varlen_sdpa_equals_caption_by_caption_float64(window, lengths):
    """Grouped, masked SDPA on views of the GroupedCaptions sequence against plain per-caption attention in
    float64, values and gradients (padding's outputs weigh nothing, and nothing flows into padding)."""
    g = torch.Generator().manual_seed(0)
    layout = GroupedCaptions(lengths, torch.device("cpu"))
    assert layout.total > layout.real == sum(lengths)  # some groups hold padding
    q, k, v = (torch.randn(1, 2, layout.total, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    got, _ = varlen_sdpa_attention(None, q, k, v, layout, scaling=0.3, sliding_window=window)
    assert got.shape == (1, layout.total, 2, 8)
    want = torch.zeros_like(got)
    for i, n in enumerate(lengths):
        at = (layout.caption_of == i).nonzero()[:, 0]  # the caption's positions, in order
        assert at.numel() == n and torch.equal(layout.positions[at], torch.arange(n))
        scores = q[0][:, at] @ k[0][:, at].transpose(-1, -2) * 0.3  # (heads, n, n)
        if window is not None:
            pos = torch.arange(n)
            scores = scores.masked_fill((pos[:, None] - pos[None, :]).abs() > window - 1, float("-inf"))
        want[0, at] = (scores.softmax(-1) @ v[0][:, at]).transpose(0, 1)  # (n, heads, d)
    real = (layout.caption_of < len(lengths))[None, :, None, None]
    torch.testing.assert_close(got * real, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64) * real
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    for ours, theirs in zip(got_grads, want_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
