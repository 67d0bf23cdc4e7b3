"""Fused losses across real gloo processes equal open_clip's, rank by rank.

Each rank computes our loss and open_clip's on its slice of one global batch (both backends; Triton in
the interpreter) and saves losses and gradients for image features, text features, the logit scale
and the bias; the parent compares them rank by rank.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from helpers import free_port

B, D = 5, 24  # per-rank batch (odd on purpose) and feature width
CLIP_FLAGS = [(True, True), (False, False), (False, True), (True, False)]  # (local_loss, gather_with_grad)


def _global_batch(world):
    g = torch.Generator().manual_seed(1234)
    image = F.normalize(torch.randn(world * B, D, generator=g), dim=-1)
    text = F.normalize(torch.randn(world * B, D, generator=g) + 0.5 * image, dim=-1)
    return image, text, torch.tensor(17.0), torch.tensor(-4.0)


def _run(loss_fn, leaves):
    loss = loss_fn(*leaves)
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, leaves)]


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from open_clip.loss import ClipLoss, SigLipLoss

    from bmc_fast.kernels import FusedClipLoss, FusedSigLipLoss

    image, text, scale, bias = _global_batch(world)
    rows = slice(rank * B, (rank + 1) * B)

    def leaves(with_bias):
        tensors = [image[rows], text[rows], scale] + ([bias] if with_bias else [])
        return [t.clone().requires_grad_() for t in tensors]

    results = {}
    for backend in ("torch", "triton"):
        for local_loss, gather_with_grad in CLIP_FLAGS:
            flags = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
            results[(backend, "clip", local_loss, gather_with_grad)] = (
                _run(FusedClipLoss(**flags, backend=backend), leaves(False)), _run(ClipLoss(**flags), leaves(False)))
        results[(backend, "siglip")] = (
            _run(FusedSigLipLoss(rank=rank, world_size=world, backend=backend), leaves(True)),
            _run(SigLipLoss(rank=rank, world_size=world), leaves(True)))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def per_rank(request, tmp_path_factory):
    pytest.importorskip("open_clip")
    world = request.param
    out = tmp_path_factory.mktemp(f"world{world}")
    mp.spawn(_worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
    return world, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", [("clip",) + flags for flags in CLIP_FLAGS] + [("siglip",)],
                         ids=lambda k: "-".join(map(str, k)))
def test_every_rank_matches_open_clip(per_rank, backend, kind):
    world, results = per_rank
    for rank, result in enumerate(results):
        (loss, grads), (their_loss, their_grads) = result[(backend,) + kind]
        torch.testing.assert_close(loss, their_loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} loss: {m}")
        for name, g, theirs in zip(("image", "text", "scale", "bias"), grads, their_grads):
            torch.testing.assert_close(g, theirs, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name: f"rank {rank} d{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mean_of_rank_losses_is_the_global_batch_loss(per_rank, backend):
    from bmc_fast.kernels import clip_loss_ref

    world, results = per_rank
    image, text, scale, _ = (t.double() for t in _global_batch(world))
    losses = torch.stack([r[(backend, "clip", True, True)][0][0] for r in results])
    torch.testing.assert_close(losses.double().mean(), clip_loss_ref(image, text, scale), rtol=1e-5, atol=1e-6)
