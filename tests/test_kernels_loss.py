"""Fused contrastive losses, one process: both backends against float64 and open_clip.

The Triton kernels run in the interpreter (TRITON_INTERPRET=1, set in conftest.py) on CPU tensors.
"""
import logging

import open_clip.loss as open_clip_loss
import pytest
import torch
import torch.nn.functional as F

from bmc_fast.kernels import FusedClipLoss, FusedSigLipLoss, clip_loss, clip_loss_ref, siglip_loss, siglip_loss_ref

BACKENDS = ["torch", "triton"]
LOSSES = {"clip": (clip_loss, clip_loss_ref), "siglip": (siglip_loss, siglip_loss_ref)}


def _inputs(b, d, scale, bias, dtype=torch.float32, normalize=True):
    image, text = torch.randn(b, d), torch.randn(b, d)
    text[: b // 2] += image[: b // 2]  # some pairs correlate, like a trained model's
    if normalize:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    tensors = [image, text, torch.tensor(scale)] + ([torch.tensor(bias)] if bias is not None else [])
    return [t.to(dtype).requires_grad_() for t in tensors]


FP32_RTOL = 8 * torch.finfo(torch.float32).eps  # ~1e-6: a few roundings of fp32 accumulation


def _loss_and_grads(fn, leaves, **kwargs):
    loss = fn(*leaves, **kwargs)
    return loss, torch.autograd.grad(loss, leaves)


def _assert_close_to_reference(out, out_pt, out_ref, rtol, floor=1.0):
    """flash-attention's rule: our error vs float64 is at most 2× torch's own error in the working dtype,
    plus ``rtol`` of the magnitude the output is computed from: max(|reference|, ``floor``). Rounding grows
    with the values (at logit scale 100 the loss is ~11, and 2e-7 of it is 2e-6), an absolute allowance
    does not. ``floor`` covers outputs that cancel to ~0 (one pair: lse(x) − x): the loss passes the logits'
    magnitude; a gradient keeps 1, the size of ∂logit/∂scale, ∂logit/∂bias and a normalised feature."""
    err = (out.double() - out_ref).abs().max().item()
    err_pt = (out_pt.double() - out_ref).abs().max().item()
    magnitude = max(out_ref.abs().max().item(), floor)
    assert err <= 2 * err_pt + rtol * magnitude, (err, err_pt, magnitude)


def _logit_magnitude(image, text, scale, bias=None):
    """max |scale · image·textᵀ + bias| in float64: the size of the terms a loss is summed from."""
    logits = scale.detach().double() * image.detach().double() @ text.detach().double().T
    return (logits + (0 if bias is None else bias.detach().double())).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("b,d", [(1, 3), (7, 64), (333, 200)])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_loss_and_every_gradient_match_float64(backend, kind, b, d, scale):
    fn, ref = LOSSES[kind]
    bias = -10.0 if kind == "siglip" else 2.0
    leaves = _inputs(b, d, scale, bias)
    loss, grads = _loss_and_grads(fn, leaves, backend=backend)
    loss_pt, grads_pt = _loss_and_grads(ref, leaves)  # plain torch in fp32
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    loss_ref, grads_ref = _loss_and_grads(ref, leaves64)
    assert loss.dtype == torch.float32
    _assert_close_to_reference(loss, loss_pt, loss_ref, rtol=FP32_RTOL, floor=_logit_magnitude(*leaves))
    for g, g_pt, g_ref in zip(grads, grads_pt, grads_ref):
        assert g.dtype == torch.float32 and g.shape == g_ref.shape
        _assert_close_to_reference(g, g_pt, g_ref, rtol=FP32_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_matches_open_clip(backend):
    leaves = _inputs(50, 32, 20.0, None)
    ours = FusedClipLoss(backend=backend)(*leaves, output_dict=True)
    assert set(ours) == {"contrastive_loss"}
    theirs = open_clip_loss.ClipLoss()(*leaves)
    torch.testing.assert_close(ours["contrastive_loss"], theirs, rtol=1e-5, atol=1e-6)
    ours_grads = torch.autograd.grad(ours["contrastive_loss"], leaves)
    their_grads = torch.autograd.grad(theirs, leaves)
    for a, b in zip(ours_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_matches_open_clip(backend):
    leaves = _inputs(40, 24, 10.0, -10.0)
    ours = FusedSigLipLoss(backend=backend)(*leaves)
    theirs = open_clip_loss.SigLipLoss()(*leaves)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours, leaves), torch.autograd.grad(theirs, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_bf16_features_on_the_torch_path(kind):
    fn, ref = LOSSES[kind]
    leaves = _inputs(37, 48, 30.0, -5.0, dtype=torch.bfloat16)
    loss, grads = _loss_and_grads(fn, leaves, backend="torch")
    assert loss.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.bfloat16] * 4
    # Reference: the same bf16-rounded inputs in float64. Losses accumulate in fp32, so only the final
    # bf16 rounding of the gradients separates us from it.
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    loss_ref, grads_ref = _loss_and_grads(ref, leaves64)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unnormalised_and_large_logits_stay_exact(backend):
    """Logits of several hundred: the online max keeps every exp finite."""
    leaves = _inputs(20, 16, 50.0, None, normalize=False)
    loss, grads = _loss_and_grads(clip_loss, leaves, backend=backend)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    loss_ref, grads_ref = _loss_and_grads(clip_loss_ref, leaves64)
    assert torch.isfinite(loss) and loss.item() > 10
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_give_a_non_finite_loss(backend, kind, bad):
    image, text, scale, bias = _inputs(9, 8, 10.0, -1.0)
    image = image.detach().clone()
    image[4, 2] = bad
    loss = LOSSES[kind][0](image, text, scale, bias, backend=backend)
    assert not torch.isfinite(loss)


def test_auto_backend_is_torch_on_cpu_and_logged_once(caplog):
    from bmc_fast.kernels import contrastive

    contrastive._logged_choices.clear()
    leaves = _inputs(4, 8, 10.0, None)
    with caplog.at_level(logging.INFO, logger="bmc_fast.kernels.contrastive"):
        clip_loss(*leaves)
        clip_loss(*leaves)
    messages = [r.getMessage() for r in caplog.records if "backend=" in r.getMessage()]
    assert messages == ["fused contrastive loss: backend=torch (requested auto) on cpu"]


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        clip_loss(*_inputs(4, 8, 10.0, None), backend="triton")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_small_ragged_tiles_give_the_same_answer(monkeypatch, kind):
    """Force 4×5 (forward) and 4×7 (backward) tiles on 23 pairs: tiling must not change the result."""
    from bmc_fast.kernels import contrastive_torch

    fn = LOSSES[kind][0]
    leaves = _inputs(23, 16, 14.0, -2.0)
    loss, grads = _loss_and_grads(fn, leaves, backend="torch")
    monkeypatch.setattr(contrastive_torch, "MIN_TILE_ROWS", 4)
    monkeypatch.setattr(contrastive_torch, "DEFAULT_CHUNK_BYTES", 3 * 4 * 4 * 5)
    assert contrastive_torch.tile_shape(23, 23, 3) == (4, 5)
    assert contrastive_torch.tile_shape(23, 23, 2) == (4, 7)
    tiled, tiled_grads = _loss_and_grads(fn, leaves, backend="torch")
    torch.testing.assert_close(tiled, loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(tiled_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tiles_keep_enough_rows_for_efficient_gemms():
    from bmc_fast.kernels import contrastive_torch

    rows, cols = contrastive_torch.tile_shape(262144, 262144, 3)
    assert rows == contrastive_torch.MIN_TILE_ROWS and 3 * 4 * rows * cols <= contrastive_torch.DEFAULT_CHUNK_BYTES
    assert contrastive_torch.tile_shape(1000, 1000, 3) == (1000, 1000)  # small problems: one tile


def _bad(**changes):
    image, text, scale = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(10.0)
    args = {"image_features": image, "text_features": text, "logit_scale": scale, **changes}
    return args


@pytest.mark.parametrize("args,error,match", [
    (_bad(text_features=torch.randn(5, 8)), ValueError, r"image_features \(4, 8\) and text_features \(5, 8\)"),
    (_bad(image_features=torch.randn(4, 8, 1)), ValueError, "must be 2-D"),
    (_bad(image_features=torch.randn(0, 8), text_features=torch.randn(0, 8)), ValueError, "is empty"),
    (_bad(text_features=torch.randn(4, 8).double()), TypeError, "image_features is torch.float32 but text_features"),
    (_bad(image_features=torch.ones(4, 8, dtype=torch.long), text_features=torch.ones(4, 8, dtype=torch.long)),
     TypeError, "floating dtype"),
    (_bad(logit_scale=torch.ones(2)), ValueError, r"logit_scale must be a scalar tensor .* got shape \(2,\)"),
    (_bad(logit_scale=14.3), TypeError, "logit_scale must be a torch.Tensor"),
    (_bad(logit_bias=torch.ones(3)), ValueError, "logit_bias must be a scalar tensor"),
    (_bad(text_features=torch.randn(4, 8, device="meta")), ValueError, "text_features is on meta"),
])
def test_bad_input_names_the_argument(args, error, match):
    for fn in (clip_loss, siglip_loss):
        with pytest.raises(error, match=match):
            fn(**args)


def test_bad_backend_and_float64_triton():
    with pytest.raises(ValueError, match="backend must be one of"):
        clip_loss(**_bad(), backend="cuda")
    with pytest.raises(TypeError, match="backend='triton' takes float16, bfloat16 or float32"):
        clip_loss(**_bad(image_features=torch.randn(4, 8).double(), text_features=torch.randn(4, 8).double(),
                         logit_scale=torch.tensor(1.0).double()), backend="triton")


def test_module_arguments_are_checked():
    with pytest.raises(ValueError, match="use_horovod=True is not supported"):
        FusedClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        FusedClipLoss(rank=0, world_size=2)
    with pytest.raises(ValueError, match="dist_impl must be"):
        FusedSigLipLoss(dist_impl="ring")


@pytest.mark.parametrize("siglip", [False, True])
def test_one_line_swap_into_open_clip_create_loss(monkeypatch, siglip):
    """The README's swap: patch open_clip.factory's loss classes, then open_clip builds ours."""
    import argparse

    import open_clip.factory

    args = argparse.Namespace(distill=False, model="ViT-B-32", siglip=siglip, horovod=False, local_loss=False,
                              gather_with_grad=False, rank=0, world_size=1, loss_dist_impl=None)
    original = open_clip.factory.create_loss(args)
    monkeypatch.setattr(open_clip.factory, "ClipLoss", FusedClipLoss)  # the swap, as the README shows it
    monkeypatch.setattr(open_clip.factory, "SigLipLoss", FusedSigLipLoss)
    fused = open_clip.factory.create_loss(args)
    assert type(fused) is (FusedSigLipLoss if siglip else FusedClipLoss)
    leaves = _inputs(12, 16, 10.0, -10.0)
    torch.testing.assert_close(fused(*leaves), original(*leaves), rtol=1e-5, atol=1e-6)


def test_triton_launchers_check_their_inputs():
    from bmc_fast.kernels import contrastive_triton as kt

    image, texts, scale = torch.randn(4, 8), torch.randn(6, 8), torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"image and texts must be 2-D with one width; got image \(4, 8\) and "
                                         r"texts \(6, 7\)"):
        kt.softmax_forward(image, torch.randn(6, 7), scale, None)
    with pytest.raises(TypeError, match="image and texts must share a dtype"):
        kt.sigmoid_forward(image, texts.double(), scale, None, 0)
    with pytest.raises(ValueError, match="scale must be a one-element floating tensor"):
        kt.softmax_forward(image, texts, torch.ones(2), None)
    with pytest.raises(ValueError, match="a and b_mat must be 2-D"):
        kt.backward(image, torch.randn(6, 7), scale, None, **_softmax_stats(4, 6))
    with pytest.raises(ValueError, match="max_groups must be a positive int, got 0"):
        kt.softmax_forward(image, texts, scale, None, max_groups=0)


def _softmax_stats(n_a, n_b, **changes):
    """Well-formed statistic vectors for ``contrastive_triton.backward`` (softmax), with ``changes``."""
    stats = dict(sigmoid=False, a_lse=torch.zeros(n_a), a_coef=torch.ones(n_a), b_lse=torch.zeros(n_b),
                 b_coef=torch.ones(n_b), diag_offset=0, diag_coef=torch.ones(1))
    return {**stats, **changes}


@pytest.mark.parametrize("changes,match", [
    (dict(a_coef=torch.rand(12)[::2]), r"a_coef must be contiguous: expected stride \(1,\), got stride \(2,\)"),
    (dict(a_coef=torch.rand(3)), r"a_coef must have shape \(6,\), got shape \(3,\)"),
    (dict(a_lse=torch.zeros(6, 1)), r"a_lse must have shape \(6,\), got shape \(6, 1\)"),
    (dict(a_lse=torch.zeros(6).double()), "a_lse must be float32 .* got torch.float64"),
    (dict(b_lse=torch.zeros(14)[::2]), r"b_lse must be contiguous: expected stride \(1,\), got stride \(2,\)"),
    (dict(b_coef=torch.ones(6)), r"b_coef must have shape \(7,\), got shape \(6,\)"),
    (dict(b_coef=torch.ones(7, device="meta")), "b_coef is on meta but the features are on cpu"),
    (dict(diag_coef=torch.ones(2)), r"diag_coef must have shape \(\) or \(1,\), got shape \(2,\)"),
    (dict(b_lse=None, b_coef=None), "b_lse and b_coef must be given together, and are required when want_b=True"),
    (dict(b_lse=None), "b_lse and b_coef must be given together"),
    (dict(a_lse=None), "a_lse must be a float32 tensor, got NoneType"),
    (dict(sigmoid=True, a_coef=torch.ones(6)), r"a_coef must have shape \(\) or \(1,\), got shape \(6,\)"),
])
def test_triton_backward_checks_its_statistic_vectors(changes, match):
    """A strided, short, wrongly typed or misplaced statistic would silently give wrong gradients."""
    from bmc_fast.kernels import contrastive_triton as kt

    a, b_mat, scale = torch.randn(6, 8), torch.randn(7, 8), torch.tensor(10.0)
    with pytest.raises(ValueError, match=match):
        kt.backward(a, b_mat, scale, None, **_softmax_stats(6, 7, **changes))


def test_triton_backward_accepts_what_the_loss_passes():
    """The checks do not reject the local-loss call (no B term, want_b=False) or a 0-d diag_coef."""
    from bmc_fast.kernels import contrastive_triton as kt

    a, b_mat, scale = torch.randn(6, 8), torch.randn(7, 8), torch.tensor(10.0)
    d_a, d_b = kt.backward(a, b_mat, scale, None, want_b=False,
                           **_softmax_stats(6, 7, b_lse=None, b_coef=None, diag_coef=torch.tensor(0.5)))
    assert d_a.shape == (6, 8) and d_b is None
    d_a, d_b = kt.backward(a, b_mat, scale, None, sigmoid=True, a_lse=None, a_coef=torch.ones(1), b_lse=None,
                           b_coef=None, diag_offset=0, diag_coef=None)
    assert d_a.shape == (6, 8) and d_b.shape == (7, 8)


@pytest.fixture
def restore_fp32_precision():
    """_dot_mode's test sets torch's global TF32 switches; put them back (through the new API only,
    since mixing it with the legacy allow_tf32 makes reading either raise)."""
    matmul = torch.backends.cuda.matmul
    saved = torch.backends.fp32_precision, matmul.fp32_precision
    yield
    torch.backends.fp32_precision = saved[0]
    matmul.fp32_precision = saved[1]


@pytest.mark.parametrize("matmul, backends, allowed", [
    ({"fp32_precision": "tf32"}, {"fp32_precision": "ieee"}, True),
    ({"fp32_precision": "ieee"}, {"fp32_precision": "tf32"}, False),
    ({"fp32_precision": "none"}, {"fp32_precision": "tf32"}, True),  # "none" inherits the global switch
    ({"fp32_precision": "none"}, {}, False),
    ({"allow_tf32": True}, {}, True),  # torch before fp32_precision: the legacy flag
    ({"allow_tf32": False}, {}, False),
], ids=["matmul-tf32", "matmul-ieee", "inherit-tf32", "inherit-unset", "legacy-on", "legacy-off"])
def test_tf32_setting_is_read_from_the_api_the_torch_has(monkeypatch, matmul, backends, allowed):
    """Both branches of the TF32 read, including the legacy one the pinned torch never takes."""
    import types

    from bmc_fast.kernels import contrastive_triton as kt

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(matmul=types.SimpleNamespace(**matmul)), **backends)
    monkeypatch.setattr(kt.torch, "backends", fake)
    assert kt._tf32_matmul_allowed() is allowed


@pytest.mark.parametrize("switch", ["cuda.matmul", "global"])
def test_dot_mode_reads_the_new_tf32_api(monkeypatch, restore_fp32_precision, switch):
    """torch >= 2.9: TF32 set through fp32_precision (where reading allow_tf32 raises) reaches the kernels."""
    from bmc_fast.kernels import contrastive_triton as kt

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a GPU machine; _mode reads it per call
    matmul = torch.backends.cuda.matmul
    assert kt._mode(torch.float32) == "ieee"
    if switch == "global":
        matmul.fp32_precision = "none"  # defers to the global switch
        torch.backends.fp32_precision = "tf32"
        matmul.fp32_precision = "none"
    else:
        matmul.fp32_precision = "tf32"
    assert kt._mode(torch.float32) == "tf32" and kt._dot_args("tf32") == {"UPCAST": True, "INPUT_PRECISION": "tf32"}
    assert kt._mode(torch.bfloat16) == "bf16" and kt._mode(torch.float16) == "fp16"
    assert kt._dot_args("bf16") == {"UPCAST": False, "INPUT_PRECISION": "ieee"}  # 16-bit dots are native
    matmul.fp32_precision = "ieee"
    assert kt._mode(torch.float32) == "ieee"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter has no TF32, and upcasts 16-bit tiles
    matmul.fp32_precision = "tf32"
    assert kt._mode(torch.float32) == kt._mode(torch.bfloat16) == "ieee"
    assert kt._dot_args("bf16")["UPCAST"] and kt._arch(torch.device("cpu")) is None


@pytest.mark.parametrize("n_rows,n_cols", [(333, 200), (300, 70)])
def test_triton_row_tile_groups_merge_exactly(n_rows, n_cols):
    """max_groups=2 puts 3 row tiles in each program: at 333 rows the last tile is part rows, part past
    the end; at 300 rows (5 tiles) the second group's last tile lies wholly past the rows."""
    from bmc_fast.kernels import contrastive_torch as kp
    from bmc_fast.kernels import contrastive_triton as kt

    image, texts = F.normalize(torch.randn(n_rows, 40), dim=-1), F.normalize(torch.randn(n_cols, 40), dim=-1)
    scale, bias = torch.tensor(20.0), torch.tensor(1.5)
    grouped = kt.softmax_forward(image, texts, scale, bias, max_groups=2)
    ref = kp.softmax_forward(image.double(), texts.double(), scale.double(), bias.double())

    def merged(stats):  # row lse, row Σsoftmax·X, column lse, column Σsoftmax·X
        row_lse, row_ex, col_max, col_sum, col_wx = (t.double() for t in stats)
        return row_lse, row_ex, col_max + col_sum.log(), col_wx / col_sum

    for name, ours, theirs in zip(("row_lse", "row_ex", "col_lse", "col_ex"), merged(grouped), merged(ref)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_features_match_float64(backend, kind, dtype):
    """fp16/bf16 features (fp32 scale and bias): STYLE's rule against plain torch in the same dtype."""
    fn, ref = LOSSES[kind]
    image, text, scale, bias = _inputs(37, 48, 30.0, -5.0)
    leaves = [image.detach().to(dtype).requires_grad_(), text.detach().to(dtype).requires_grad_(), scale, bias]
    loss, grads = _loss_and_grads(fn, leaves, backend=backend)
    assert loss.dtype == torch.float32  # accumulated and returned in fp32
    assert [g.dtype for g in grads] == [dtype, dtype, torch.float32, torch.float32]
    loss_pt, grads_pt = _loss_and_grads(ref, leaves)  # plain torch: the logits in the half dtype
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    loss_ref, grads_ref = _loss_and_grads(ref, leaves64)
    _assert_close_to_reference(loss, loss_pt, loss_ref, rtol=FP32_RTOL, floor=_logit_magnitude(*leaves))
    for g, g_pt, g_ref in zip(grads, grads_pt, grads_ref):
        _assert_close_to_reference(g, g_pt, g_ref, rtol=FP32_RTOL)


def test_module_backend_and_flags_are_checked():
    with pytest.raises(ValueError, match=r"FusedClipLoss: backend must be one of \('auto', 'triton', 'torch'\), "
                                         "got 'cuda'"):
        FusedClipLoss(backend="cuda")
    with pytest.raises(ValueError, match="FusedSigLipLoss: backend must be one of"):
        FusedSigLipLoss(backend=None)
    with pytest.raises(TypeError, match=r"FusedClipLoss: local_loss must be True or False, got 'yes' \(str\)"):
        FusedClipLoss(local_loss="yes")
    with pytest.raises(TypeError, match=r"FusedClipLoss: gather_with_grad must be True or False, got 1 \(int\)"):
        FusedClipLoss(gather_with_grad=1)


def test_triton_backend_without_triton_says_what_to_install(monkeypatch):
    """``import triton`` fails (sys.modules entry None); monkeypatch restores the real module afterwards."""
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)
    for build in (lambda: FusedClipLoss(backend="triton"), lambda: FusedSigLipLoss(backend="triton"),
                  lambda: clip_loss(**_bad(), backend="triton")):
        with pytest.raises(ImportError, match=r"backend='triton' needs the triton package.*pip install triton.*"
                                              r"backend='torch'"):
            build()
    FusedClipLoss(backend="auto")  # auto and torch never need triton
    assert torch.isfinite(clip_loss(**_bad(), backend="auto"))
