"""Fused losses across real gloo processes equal open_clip's, rank by rank.

Each rank computes our loss and open_clip's on its slice of one global batch (both backends; Triton in
the interpreter) and saves losses and gradients for image features, text features, the logit scale
and the bias; the parent compares them rank by rank. The text gradients reach their owners by
reduce-scatter over gloo (torch >= 2.2), and, in one world, by the all-reduce fallback of older torch
under a "cpu:gloo" backend string. Every world also runs 65 rows per rank with a logit bias, so the
positive pairs of ranks >= 1 (column = row + 65·rank) cross 64-wide Triton tiles.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from helpers import free_port

pytestmark = pytest.mark.slow  # real processes: mp.spawn or the deepspeed launcher

B, D = 5, 24  # per-rank batch (odd on purpose) and feature width
B_TILE, D_TILE = 65, 8  # rank r's diagonal offset 65·r crosses 64-wide Triton tiles
CLIP_FLAGS = [(True, True), (False, False), (False, True), (True, False)]  # (local_loss, gather_with_grad)
# Flags whose gradients equal open_clip's for unequal per-rank loss weights (all but False, False).
WEIGHTED_FLAGS = [(True, True), (True, False), (False, True)]
# (world, process-group backend string, text-gradient collective); "all_reduce" forces the torch < 2.2 path.
WORLDS = [(2, "gloo", "reduce_scatter"), (3, "gloo", "reduce_scatter"), (2, "cpu:gloo", "all_reduce")]


def _global_batch(world, b=B, d=D):
    g = torch.Generator().manual_seed(1234)
    image = F.normalize(torch.randn(world * b, d, generator=g), dim=-1)
    text = F.normalize(torch.randn(world * b, d, generator=g) + 0.5 * image, dim=-1)
    return image, text, torch.tensor(17.0), torch.tensor(-4.0)


def _run(loss_fn, leaves, weight=1.0):
    """This rank's loss and the gradients of ``weight · loss`` (weight: the rank's upstream gradient)."""
    loss = loss_fn(*leaves)
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss * weight, leaves)]


def _worker(rank, world, port, out_dir, backend_string, collective):
    torch.set_num_threads(1)
    dist.init_process_group(backend_string, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from open_clip.loss import ClipLoss, SigLipLoss

    from bmc_fast.kernels import FusedClipLoss, FusedSigLipLoss, contrastive

    if collective == "all_reduce":
        contrastive._GLOO_HAS_REDUCE_SCATTER = False
    reduce_scatters = []  # our reduce-scatter calls, counted by wrapping the function contrastive looks up
    real_reduce_scatter = dist.reduce_scatter_single
    dist.reduce_scatter_single = lambda *a, **k: reduce_scatters.append(1) or real_reduce_scatter(*a, **k)

    def leaves(b, d, with_bias):
        image, text, scale, bias = _global_batch(world, b, d)
        rows = slice(rank * b, (rank + 1) * b)
        tensors = [image[rows], text[rows], scale] + ([bias] if with_bias else [])
        return [t.clone().requires_grad_() for t in tensors]

    results = {}
    for backend in ("torch", "triton"):
        for local_loss, gather_with_grad in CLIP_FLAGS:
            flags = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
            results[(backend, "clip", local_loss, gather_with_grad)] = (
                _run(FusedClipLoss(**flags, backend=backend), leaves(B, D, False)),
                _run(ClipLoss(**flags), leaves(B, D, False)))
        for local_loss, gather_with_grad in WEIGHTED_FLAGS:
            flags = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
            results[(backend, "clip-weighted", local_loss, gather_with_grad)] = (
                _run(FusedClipLoss(**flags, backend=backend), leaves(B, D, True), weight=rank + 1.0),
                _run(ClipLoss(**flags), leaves(B, D, True), weight=rank + 1.0))
        results[(backend, "siglip")] = (
            _run(FusedSigLipLoss(rank=rank, world_size=world, backend=backend), leaves(B, D, True)),
            _run(SigLipLoss(rank=rank, world_size=world), leaves(B, D, True)))
    # 65 rows per rank, with a logit bias, Triton only (the interpreter is slow)
    for local_loss, gather_with_grad in [(True, True), (False, False)]:
        flags = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
        results[("triton", "clip-tile", local_loss, gather_with_grad)] = (
            _run(FusedClipLoss(**flags, backend="triton"), leaves(B_TILE, D_TILE, True)),
            _run(ClipLoss(**flags), leaves(B_TILE, D_TILE, True)))
    results[("triton", "siglip-tile")] = (
        _run(FusedSigLipLoss(rank=rank, world_size=world, backend="triton"), leaves(B_TILE, D_TILE, True)),
        _run(SigLipLoss(rank=rank, world_size=world), leaves(B_TILE, D_TILE, True)))
    results["reduce_scatter_calls"] = len(reduce_scatters)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank closes its gloo pairs while another still has a send in flight
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w[0]}-{w[2]}")
def per_rank(request, tmp_path_factory):
    world, backend_string, collective = request.param
    out = tmp_path_factory.mktemp(f"world{world}")
    mp.spawn(_worker, args=(world, free_port(), str(out), backend_string, collective), nprocs=world, join=True)
    return world, collective, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _assert_matches_open_clip(results, key):
    for rank, result in enumerate(results):
        (loss, grads), (their_loss, their_grads) = result[key]
        torch.testing.assert_close(loss, their_loss, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, rank=rank: f"rank {rank} loss: {m}")
        for name, g, theirs in zip(("image", "text", "scale", "bias"), grads, their_grads):
            theirs = torch.zeros_like(g) if theirs is None else theirs
            torch.testing.assert_close(g, theirs, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} d{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", [("clip",) + flags for flags in CLIP_FLAGS] + [("siglip",)],
                         ids=lambda k: "-".join(map(str, k)))
def test_every_rank_matches_open_clip(per_rank, backend, kind):
    _assert_matches_open_clip(per_rank[2], (backend,) + kind)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("flags", WEIGHTED_FLAGS, ids=lambda f: f"local{f[0]}-gather{f[1]}")
def test_unequal_rank_weights_match_open_clip(per_rank, backend, flags):
    """Rank r backpropagates (r + 1)·loss: the all-gathered upstream gradients weight each rank's terms."""
    _assert_matches_open_clip(per_rank[2], (backend, "clip-weighted") + flags)


@pytest.mark.parametrize("kind", [("clip-tile", True, True), ("clip-tile", False, False), ("siglip-tile",)],
                         ids=lambda k: "-".join(map(str, k)))
def test_diagonal_crossing_a_triton_tile_matches_open_clip(per_rank, kind):
    _assert_matches_open_clip(per_rank[2], ("triton",) + kind)


def test_text_gradients_travel_by_the_expected_collective(per_rank):
    """reduce-scatter over gloo on this torch (>= 2.2); the forced fallback never calls it."""
    world, collective, results = per_rank
    for rank, result in enumerate(results):
        if collective == "reduce_scatter":
            assert result["reduce_scatter_calls"] > 0, f"rank {rank} never reduce-scattered"
        else:
            assert result["reduce_scatter_calls"] == 0, f"rank {rank} reduce-scattered on the fallback path"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mean_of_rank_losses_is_the_global_batch_loss(per_rank, backend):
    from bmc_fast.kernels import clip_loss_ref

    world, _, results = per_rank
    image, text, scale, _ = (t.double() for t in _global_batch(world))
    losses = torch.stack([r[(backend, "clip", True, True)][0][0] for r in results])
    torch.testing.assert_close(losses.double().mean(), clip_loss_ref(image, text, scale), rtol=1e-5, atol=1e-6)
