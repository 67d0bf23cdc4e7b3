"""Analytic FLOPs against torch's FlopCounterMode on the real towers (padded path, attention included).

FlopCounterMode has no formula for SDPA's CPU kernel, so the towers run with eager attention here,
whose matmuls it does count.
"""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bmc_fast import create_model
from bmc_fast.model.flops import peak_flops, text_forward_flops, train_step_flops, vision_forward_flops, window_pairs

TOKENS = {"pad_token_id": 0, "cls_token_id": 1, "sep_token_id": 2}


@pytest.mark.parametrize("preset,text", [("tiny", {"vocab_size": 300, **TOKENS}), ("bmc-longclip-l14-512", TOKENS)])
def test_forward_flops_match_flop_counter(preset, text):
    with torch.device("meta"):  # FLOPs depend on shapes only: the weights are left uninitialised
        model = create_model(preset, text_unpad=False, attn_backend="eager", text=text)
    model = model.to_empty(device="cpu").eval()
    cfg = model.cfg
    images = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    lengths = [cfg.context_length]
    ids = torch.randint(3, 200, (1, cfg.context_length))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(images)
    assert counter.get_total_flops() == pytest.approx(vision_forward_flops(cfg.vision, cfg.embed_dim), rel=0.05)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_text(ids, torch.ones_like(ids))
    analytic = text_forward_flops(cfg.text, cfg.embed_dim, lengths, padded_to=cfg.context_length)
    assert counter.get_total_flops() == pytest.approx(analytic, rel=0.05)


def test_l14_magnitudes():
    from bmc_fast.model.config import load_model_config

    cfg = load_model_config("bmc-longclip-l14-512")
    assert vision_forward_flops(cfg.vision, cfg.embed_dim) / 1e9 == pytest.approx(162, rel=0.01)
    padded = text_forward_flops(cfg.text, cfg.embed_dim, [127], padded_to=512)
    unpadded = text_forward_flops(cfg.text, cfg.embed_dim, [127])
    assert unpadded < padded / 4  # a 127-token caption padded to 512 wastes three quarters and more


@pytest.mark.parametrize("length,half", [(1, 64), (10, 64), (65, 64), (200, 64), (512, 64), (7, 2)])
def test_window_pairs_by_enumeration(length, half):
    brute = sum(1 for i in range(length) for j in range(length) if abs(i - j) <= half)
    assert window_pairs(length, half) == brute


def test_local_layers_count_windowed_pairs():
    from bmc_fast.model.config import load_model_config

    text = load_model_config("tiny").text  # layers g, l, l with a 128-token window
    h = text.hidden_size
    short, long = (text_forward_flops(text, 128, [n]) for n in (60, 400))
    dense = text_forward_flops(text, 128, [400], padded_to=400)
    assert dense - long == 2 * 4 * h * (400 * 400 - window_pairs(400, 64))  # two local layers
    assert short == text_forward_flops(text, 128, [60], padded_to=60)  # within the window: no saving


def test_train_step_is_three_forwards():
    from bmc_fast.model.config import load_model_config

    cfg = load_model_config("tiny")
    forward = (2 * vision_forward_flops(cfg.vision, cfg.embed_dim)
               + text_forward_flops(cfg.text, cfg.embed_dim, [30, 90]))
    assert train_step_flops(cfg, 2, [30, 90]) == 3 * forward


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA GeForce RTX 4090", None)])
def test_peak_flops_by_device_name(name, peak):
    assert peak_flops(name) == peak
