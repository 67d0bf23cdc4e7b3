"""Contrastive accumulation: K micro batches give the gradients of one big batch (float64, 1 and 2 ranks)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from bmc_fast.kernels import FusedClipLoss, FusedSigLipLoss
from bmc_fast.model.clip import BMCLongCLIP
from bmc_fast.model.config import load_model_config
from bmc_fast.trainer.contrastive_accumulation import contrastive_accumulation_step
from helpers import free_port

N, K = 8, 4  # global batch; micro batches per rank and step


def _inputs(tokenizer, n=N, **overrides):
    cfg = load_model_config("tiny", text={"num_hidden_layers": 2}, vision={"layers": 2},
                            **overrides).with_tokenizer(tokenizer)
    model = BMCLongCLIP(cfg).double()
    lengths = torch.randint(3, 48, (n,))  # every micro batch pads to its own longest caption
    mask = (torch.arange(48) < lengths[:, None]).long()
    ids = torch.randint(5, len(tokenizer), (n, 48)) * mask + tokenizer.pad_token_id * (1 - mask)
    pixels = torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size, dtype=torch.float64)
    return model, pixels, ids, mask


def _micro_batches(pixels, ids, mask, rows, k):
    """``k`` micro batches of ``rows``, each trimmed to its own longest caption, as a loader yields them."""
    out = []
    for part in torch.tensor(rows).chunk(k):
        longest = int(mask[part].sum(1).max())
        out.append((pixels[part], ids[part, :longest], mask[part, :longest]))
    return out


def _accumulated_grads(model, batches, loss_fn):
    model.zero_grad()
    loss, _ = contrastive_accumulation_step(lambda b: model(*b), batches, loss_fn, lambda s: s.backward(),
                                            torch.device("cpu"))
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _big_batch_grads(model, pixels, ids, mask, loss_fn):
    model.zero_grad()
    loss = loss_fn(*model(pixels, ids, mask))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ours, reference):
    for name, grad in reference.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-9, atol=1e-12 * grad.abs().max().item(), msg=name)


def test_one_rank_k_micro_batches_equal_one_big_batch(small_data):
    model, pixels, ids, mask = _inputs(small_data["tokenizer"])
    loss_fn = FusedClipLoss()
    loss, grads = _accumulated_grads(model, _micro_batches(pixels, ids, mask, list(range(N)), K), loss_fn)
    big_loss, big_grads = _big_batch_grads(model, pixels, ids, mask, loss_fn)
    torch.testing.assert_close(loss, big_loss, rtol=1e-12, atol=0)
    _assert_same(grads, big_grads)
    assert loss.item() > 0.1 and any(g.abs().max() > 0 for g in grads.values())


def test_the_sigmoid_loss_and_its_bias_accumulate_to_one_big_batch(small_data):
    """--loss siglip: the bias is a fourth model output, its gradient shared out over the K re-forwards as the
    scale's is; the image tower half locked, as --lock-image-unlocked-groups leaves it."""
    model, pixels, ids, mask = _inputs(small_data["tokenizer"], init_logit_bias=-10.0, init_logit_scale=2.3)
    model.lock_image(2)
    loss, grads = _accumulated_grads(model, _micro_batches(pixels, ids, mask, list(range(N)), K), FusedSigLipLoss())
    big_loss, big_grads = _big_batch_grads(model, pixels, ids, mask, FusedSigLipLoss())
    torch.testing.assert_close(loss, big_loss, rtol=1e-12, atol=0)
    _assert_same(grads, big_grads)
    assert big_grads["logit_bias"].abs().item() > 0 and big_grads["visual.proj"].abs().max() > 0
    assert set(grads) == set(big_grads) and "visual.conv1.weight" not in grads  # locked: no gradient at all


def test_one_rank_k_micro_batches_on_the_triton_kernels_equal_one_big_batch(small_data):
    """The same in float32 with the loss on the Triton kernels (interpreted here), the big batch on torch's."""
    model, pixels, ids, mask = _inputs(small_data["tokenizer"])
    model, pixels = model.float(), pixels.float()
    loss, grads = _accumulated_grads(model, _micro_batches(pixels, ids, mask, list(range(N)), K),
                                     FusedClipLoss(backend="triton"))
    big_loss, big_grads = _big_batch_grads(model, pixels, ids, mask, FusedClipLoss(backend="torch"))
    torch.testing.assert_close(loss, big_loss, rtol=1e-5, atol=0)
    for name, grad in big_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-5 * grad.abs().max().item(), msg=name)


def test_each_micro_batch_replays_its_own_randomness():
    """With dropout, the re-forward must draw the masks of the first forward, not new ones."""
    torch.manual_seed(0)
    tower = torch.nn.Linear(6, 4).double()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)

    def forward(rows):
        image = F.normalize(F.dropout(tower(x[rows]), p=0.5, training=True), dim=-1)
        return image, F.normalize(y[rows], dim=-1), scale * 1

    batches = [slice(0, 2), slice(2, 5), slice(5, 8)]
    torch.manual_seed(1)
    loss, _ = contrastive_accumulation_step(forward, batches, FusedClipLoss(), lambda s: s.backward(),
                                            torch.device("cpu"))
    ours = [tower.weight.grad.clone(), scale.grad.clone()]
    tower.zero_grad()
    scale.grad = None
    torch.manual_seed(1)  # reference: every micro batch with its graph kept, one backward (the same masks)
    outs = [forward(rows) for rows in batches]
    reference = FusedClipLoss()(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), outs[0][2])
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(ours[0], tower.weight.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ours[1], scale.grad, rtol=1e-10, atol=1e-14)


def _worker(rank, world, port, path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    data = torch.load(path, weights_only=False)
    model = BMCLongCLIP(data["cfg"]).double()
    model.load_state_dict(data["state"])
    rows = list(range(rank * N // world, (rank + 1) * N // world))
    loss_fn = FusedClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    loss, grads = _accumulated_grads(model, _micro_batches(data["pixels"], data["ids"], data["mask"], rows, K // world),
                                     loss_fn)
    for grad in grads.values():
        dist.all_reduce(grad)  # DeepSpeed's gradient averaging
        grad /= world
    torch.save({"loss": loss, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank closes its gloo pairs while another still has a send in flight
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_k_micro_batches_equal_one_big_batch(small_data, tmp_path):
    model, pixels, ids, mask = _inputs(small_data["tokenizer"])
    path = tmp_path / "inputs.pt"
    torch.save({"cfg": model.cfg, "state": model.state_dict(), "pixels": pixels, "ids": ids, "mask": mask}, path)
    mp.spawn(_worker, args=(2, free_port(), str(path), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    big_loss, big_grads = _big_batch_grads(model, pixels, ids, mask, FusedClipLoss())
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), big_loss, rtol=1e-12, atol=0)
    for r in results:
        _assert_same(r["grads"], big_grads)
