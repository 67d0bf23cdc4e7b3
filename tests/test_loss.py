"""ContrastiveLoss (single process) against open_clip's ClipLoss and a float64 reference."""
import pytest
import torch
import torch.nn.functional as F

from bmc_fast.loss import ContrastiveLoss

open_clip_loss = pytest.importorskip("open_clip.loss")


def reference_loss(image, text, scale):
    """Symmetric InfoNCE written out in float64."""
    logits = scale.double() * image.double() @ text.double().T
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("b,d", [(1, 3), (7, 64), (33, 200)])
@pytest.mark.parametrize("scale_value", [1.0, 14.3, 100.0])
def test_loss_and_grads_match_open_clip_and_fp64(b, d, scale_value):
    image = F.normalize(torch.randn(b, d), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(b, d), dim=-1).requires_grad_()
    scale = torch.tensor(scale_value, requires_grad=True)
    ours = ContrastiveLoss()(image, text, scale)
    grads = torch.autograd.grad(ours, (image, text, scale))

    theirs = open_clip_loss.ClipLoss()(image, text, scale)
    their_grads = torch.autograd.grad(theirs, (image, text, scale))
    leaves64 = [t.detach().double().requires_grad_() for t in (image, text, scale)]
    ref = reference_loss(*leaves64)
    ref_grads = torch.autograd.grad(ref, leaves64)

    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for g, g_oc, g_ref in zip(grads, their_grads, ref_grads):
        torch.testing.assert_close(g, g_oc, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)


def test_bf16_features_are_upcast():
    image = F.normalize(torch.randn(16, 32), dim=-1)
    text = F.normalize(torch.randn(16, 32), dim=-1)
    scale = torch.tensor(20.0)
    loss = ContrastiveLoss()(image.bfloat16(), text.bfloat16(), scale)
    assert loss.dtype == torch.float32
    ref = reference_loss(image.bfloat16().float(), text.bfloat16().float(), scale)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_non_finite_features_give_a_non_finite_loss():
    image = torch.randn(4, 8)
    image[2, 3] = float("nan")
    assert not torch.isfinite(ContrastiveLoss()(image, torch.randn(4, 8), torch.tensor(10.0)))


@pytest.mark.parametrize("image,text", [(torch.randn(4, 8), torch.randn(5, 8)), (torch.randn(8), torch.randn(8))])
def test_bad_shapes(image, text):
    with pytest.raises(ValueError, match="image and text features must both be"):
        ContrastiveLoss()(image, text, torch.tensor(1.0))


def test_bad_rank():
    with pytest.raises(ValueError, match="rank must be in"):
        ContrastiveLoss(rank=2, world_size=2)
