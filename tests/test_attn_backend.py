"""The attention backends: which one runs where (a table), and torch's varlen_attn plumbing on CPU.

The CUDA kernels behind ``varlen_attn`` cannot run here; ``tests/varlen_cpu.py`` registers float64 CPU kernels
with the ops' own signatures, so everything above them (``varlen_attn``, its autograd, our HF attention
function, the packed text tower) runs for real and is compared with padded SDPA.
"""
from __future__ import annotations

import pytest
import torch

import varlen_cpu
from bmc_fast import create_model
from bmc_fast.errors import ConfigError
from bmc_fast.model import attn_backend, text_tower
from bmc_fast.model.attn_backend import AttentionSupport, choose_attention
from bmc_fast.model.caption_layout import GroupedCaptions
from helpers import caption_batch

BF16, FP32 = torch.bfloat16, torch.float32
CPU = AttentionSupport("cpu")


def cuda(capability, fa4=False, flash_attn=False, torch_varlen=True):
    return AttentionSupport("cuda", capability, fa4=fa4, flash_attn=flash_attn, torch_varlen=torch_varlen)


@pytest.mark.parametrize("dtype, support, expected", [
    (FP32, CPU, "sdpa"),
    (BF16, CPU, "sdpa"),
    (FP32, cuda((9, 0), fa4=True, flash_attn=True), "sdpa"),  # every flash kernel takes fp16/bf16 only
    (BF16, cuda((9, 0), fa4=True, flash_attn=True), "fa4"),
    (torch.float16, cuda((10, 0), fa4=True), "fa4"),
    (BF16, cuda((8, 0), fa4=True, flash_attn=True), "flash"),  # FA4 is Hopper/Blackwell only
    (BF16, cuda((8, 0), fa4=True), "torch_flash"),
    (BF16, cuda((12, 0), fa4=True), "torch_flash"),  # consumer Blackwell: not FA4's 10.x
    (BF16, cuda((9, 0), flash_attn=True), "flash"),
    (BF16, cuda((9, 0)), "torch_flash"),
    (BF16, cuda((9, 0), torch_varlen=False), "sdpa"),  # torch older than 2.10: no window_size
    (BF16, cuda((7, 5)), "sdpa"),  # Turing: no FlashAttention-2
], ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, AttentionSupport) else
    f"{v.device_type}{v.capability or ''}{'+fa4' if v.fa4 else ''}{'+fa2' if v.flash_attn else ''}"
    f"{'' if v.torch_varlen else '-varlen'}")
def test_auto_picks_the_best_backend_that_can_run(dtype, support, expected):
    assert choose_attention("auto", dtype, support) == expected


@pytest.mark.parametrize("requested, dtype, support, reason", [
    ("fa4", BF16, CPU, "CUDA only, not cpu"),
    ("fa4", BF16, cuda((8, 0), fa4=True), "compute capability 9.x or 10.x, this GPU is 8.0"),
    ("fa4", BF16, cuda((9, 0)), "flash-attn-4 is not installed"),
    ("fa4", FP32, cuda((9, 0), fa4=True), r"fp16/bf16 activations, not torch\.float32"),
    ("torch_flash", BF16, cuda((7, 5)), r"sm80\+, this GPU is sm75"),
    ("torch_flash", BF16, cuda((9, 0), torch_varlen=False), "no varlen_attn with window_size"),
    ("flash", BF16, cuda((9, 0)), "flash-attn 2 is not installed"),
    ("flash", FP32, CPU, "CUDA only"),
    ("mystery", FP32, CPU, "must be one of"),
])
def test_an_explicit_backend_that_cannot_run_is_refused_with_the_reason(requested, dtype, support, reason):
    with pytest.raises(ConfigError, match=reason):
        choose_attention(requested, dtype, support)


@pytest.mark.parametrize("requested", ["sdpa", "eager"])
def test_sdpa_and_eager_run_everywhere(requested):
    for support in (CPU, cuda((7, 0)), cuda((9, 0), fa4=True)):
        assert choose_attention(requested, FP32, support) == requested


def test_this_torch_has_varlen_attn_with_a_window_and_cpu_support_asks_no_cuda():
    assert attn_backend.torch_varlen_available()  # torch 2.14 (the pins)
    assert attn_backend.attention_support(torch.device("cpu")) == CPU


# ------------------------------------------------------------------------------------- varlen_attn on CPU
@pytest.fixture(scope="module", autouse=True)
def _cpu_varlen_kernels():
    varlen_cpu.register()


LENGTHS = [1, 512, 2, 63, 64, 65, 129, 300, 7]


@pytest.mark.parametrize("sliding_window", [None, 65, 9], ids=["global", "local128", "local16"])
def test_varlen_torch_attention_equals_per_caption_attention_and_bucketed_sdpa(sliding_window):
    """Outputs and gradients of bmc_varlen_torch (through torch's varlen_attn) = the float64 reference = the
    bucketed SDPA path, lengths 1-512, with and without ModernBERT's window (HF's sliding_window = w/2 + 1)."""
    torch.manual_seed(0)
    heads, d = 2, 16
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    qkv = [torch.randn(1, heads, total, d, requires_grad=True) for _ in range(3)]
    window = -1 if sliding_window is None else sliding_window - 1
    want = varlen_cpu.reference(*(t[0].transpose(0, 1) for t in qkv), cu, (window, window))  # (T, H, D) float64
    packed, _ = text_tower.varlen_torch_attention(None, *qkv, None, scaling=d ** -0.5, sliding_window=sliding_window,
                                                  cu_seq_lens_q=cu.clone(), max_length_q=max(LENGTHS))
    layout = GroupedCaptions(LENGTHS, torch.device("cpu"))  # the same tokens, grouped, padded inside groups
    grouped_qkv = [t.new_zeros(1, heads, layout.total, d).index_copy(2, layout.slots, t) for t in qkv]
    grouped, _ = text_tower.varlen_sdpa_attention(None, *grouped_qkv, layout, scaling=d ** -0.5,
                                                  sliding_window=sliding_window)
    grads = []
    for out in (packed, grouped[:, layout.slots]):
        assert out.shape == (1, total, heads, d)
        torch.testing.assert_close(out[0].double(), want, rtol=1e-5, atol=1e-6)
        weight = torch.linspace(-1, 1, out.numel()).view_as(out)
        grads.append(torch.autograd.grad((out * weight).sum(), qkv))
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_varlen_torch_attention_refuses_dropout_and_missing_boundaries():
    q = torch.randn(1, 2, 5, 8)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="needs cu_seq_lens_q and max_length_q"):
        text_tower.varlen_torch_attention(None, q, q, q, None)
    with pytest.raises(ValueError, match="no attention dropout"):
        text_tower.varlen_torch_attention(None, q, q, q, None, dropout=0.1, cu_seq_lens_q=cu, max_length_q=5)


TEXT = {"vocab_size": 300, "pad_token_id": 0, "cls_token_id": 1, "sep_token_id": 2, "local_attention": 16}


def test_packed_text_tower_on_torch_varlen_equals_padded_sdpa(monkeypatch):
    """The whole tower on the torch_flash path (varlen_attn with windows of 16 on local layers) against HF's
    padded SDPA forward: embeddings and every parameter's gradient, captions of 1 to 512 tokens."""
    monkeypatch.setattr(text_tower, "resolve_attention", lambda requested, device, dtype, where: "torch_flash")
    calls = []
    real = text_tower.varlen_torch_attention
    monkeypatch.setattr(text_tower, "varlen_torch_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    text_tower._register_attention()  # the patched function under its registered name
    packed = create_model("tiny", attn_backend="torch_flash", text=TEXT).text
    padded = create_model("tiny", text_unpad=False, text=TEXT).text
    padded.load_state_dict(packed.state_dict())
    ids, mask = caption_batch([512, 1, 40, 17, 200])
    results = []
    for tower in (packed, padded):
        out = tower(ids, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out, {n: p.grad for n, p in tower.named_parameters()}))
    assert packed.transformer.config._attn_implementation == text_tower.VARLEN_TORCH
    assert len(calls) == packed.cfg.num_hidden_layers  # every layer went through varlen_attn
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    text_tower._register_attention()  # the real function again


def test_image_tower_on_torch_flash_runs_sdpa_flash_kernel(monkeypatch):
    """torch_flash in the image tower is SDPA held to its flash kernel (torch has one for CPU bf16 too): same
    embeddings as eager; on this CPU an explicit request without the monkeypatch is refused."""
    monkeypatch.setattr(attn_backend, "attention_support", lambda device: cuda((9, 0)))
    eager = create_model("tiny", attn_backend="eager", text=TEXT).visual.to(BF16).eval()
    flash = create_model("tiny", attn_backend="torch_flash", text=TEXT).visual.to(BF16).eval()
    flash.load_state_dict(eager.state_dict())
    images = torch.randn(3, 3, 64, 64, dtype=BF16)
    with torch.no_grad():
        torch.testing.assert_close(flash(images).float(), eager(images).float(), rtol=2e-2, atol=2e-2)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="attn_backend='torch_flash' cannot run here: it runs on CUDA only"):
        flash(images)
