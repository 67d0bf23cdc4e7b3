"""Gathered-negative loss across real gloo processes equals the single-process global-batch loss.

Each rank runs the real tiny BMCLongCLIP in float64 on its slice of one global batch with the trainer's
loss (FusedClipLoss, local_loss + gather_with_grad), then averages parameter gradients over ranks as
DeepSpeed does; the result must equal one process training on the whole batch. Per-rank losses must
also equal open_clip's ClipLoss(local_loss=True, gather_with_grad=True).
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bmc_fast.kernels import FusedClipLoss
from bmc_fast.model.clip import BMCLongCLIP
from bmc_fast.model.config import load_model_config
from helpers import free_port

pytestmark = pytest.mark.slow  # real processes: mp.spawn or the deepspeed launcher

N = 6  # global batch: 3 per rank with 2 ranks, 2 per rank with 3


def _make_inputs(tokenizer, path):
    cfg = load_model_config("tiny", text={"num_hidden_layers": 2}, vision={"layers": 2}).with_tokenizer(tokenizer)
    model = BMCLongCLIP(cfg).double()
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    lengths = torch.tensor([3, 40, 17, 64, 9, 28])  # real randomness in the padding pattern
    mask = (torch.arange(64) < lengths[:, None]).long()
    ids = torch.randint(5, len(tokenizer), (N, 64)) * mask + tokenizer.pad_token_id * (1 - mask)
    pixels = torch.randn(N, 3, cfg.vision.image_size, cfg.vision.image_size, dtype=torch.float64)
    torch.save({"cfg": cfg, "state": model.state_dict(), "pixels": pixels, "ids": ids, "mask": mask}, path)


def _forward_backward(data, rank, world):
    model = BMCLongCLIP(data["cfg"]).double()
    model.load_state_dict(data["state"])
    b = N // world
    rows = slice(rank * b, (rank + 1) * b)
    image, text, scale = model(data["pixels"][rows], data["ids"][rows], data["mask"][rows])
    loss = FusedClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(image, text, scale)
    loss.backward()
    return model, loss, (image.detach(), text.detach(), scale.detach())


def _worker(rank, world, port, inputs, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    data = torch.load(inputs, weights_only=False)
    model, loss, features = _forward_backward(data, rank, world)
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)  # DeepSpeed's gradient averaging
        grads[name] = grad / world

    from open_clip.loss import ClipLoss

    image, text, scale = (t.clone().requires_grad_() for t in features)
    ours_on_features = FusedClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(
        image, text, scale)
    theirs = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(image, text, scale)
    torch.save({"loss": loss.detach(), "grads": grads, "ours": ours_on_features.detach(),
                "open_clip": theirs.detach()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank closes its gloo pairs while another still has a send in flight
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_reproduce_the_global_batch(world, small_data, tmp_path):
    inputs = tmp_path / "inputs.pt"
    _make_inputs(small_data["tokenizer"], inputs)
    mp.spawn(_worker, args=(world, free_port(), str(inputs), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]

    data = torch.load(inputs, weights_only=False)
    model, global_loss, _ = _forward_backward(data, rank=0, world=1)

    rank_losses = torch.stack([r["loss"] for r in results])
    torch.testing.assert_close(rank_losses.mean(), global_loss.detach(), rtol=1e-12, atol=1e-12)
    for r in results:
        torch.testing.assert_close(r["ours"], r["open_clip"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["loss"], r["ours"], rtol=1e-12, atol=1e-12)
    for name, param in model.named_parameters():
        for r in results:  # after averaging, every rank holds the same, global-batch gradient
            torch.testing.assert_close(r["grads"][name], param.grad, rtol=1e-7, atol=1e-10,
                                       msg=lambda m, name=name: f"{name}: {m}")
    assert any(param.grad.abs().max() > 0 for name, param in model.named_parameters() if "text" in name)


def _to_tensor(image) -> torch.Tensor:
    """A PIL image -> (3, H, W) float64 in [0, 1]: the zero-shot images are already at the model's size."""
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1).double() / 255


def _eval_worker(rank, world, port, inputs, out_dir):
    """Both evaluations of the trainer over a gloo group: retrieval features of uneven batches, zero-shot images."""
    from bmc_fast.eval.retrieval import extract_features
    from bmc_fast.eval.zeroshot import bmc_fast_encoder

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    data = torch.load(inputs, weights_only=False)
    model = BMCLongCLIP(data["cfg"]).double()
    model.load_state_dict(data["state"])
    batches = [{"pixels": data["pixels"][rows], "input_ids": data["ids"][rows], "attention_mask": data["mask"][rows]}
               for rows in (slice(0, 5), slice(5, 6), slice(0, 4))]  # 5 rows, 1 row (fewer than ranks), 4 rows
    image, text = extract_features(model, batches, torch.device("cpu"), torch.float64, rank=rank, world_size=world)
    encoder = bmc_fast_encoder(model, None, _to_tensor, dtype=torch.float64, rank=rank, world_size=world)
    zeroshot_images = encoder.encode_images(data["images"], batch_size=2)
    torch.save({"image": image, "text": text, "zeroshot": zeroshot_images}, os.path.join(out_dir, f"eval{rank}.pt"))
    if world > 1:
        dist.barrier()  # no rank closes its gloo pairs while another still has a send in flight
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_split_over_ranks_gathers_what_one_process_computes(world, small_data, tmp_path):
    """Retrieval and zero-shot features during training: each rank encodes its share of every batch (and of the
    zero-shot images) and the gathered features equal one process's, row for row."""
    import io

    import numpy as np
    from PIL import Image

    inputs = tmp_path / "inputs.pt"
    _make_inputs(small_data["tokenizer"], inputs)
    data = torch.load(inputs, weights_only=False)
    size = data["cfg"].vision.image_size
    rng = np.random.default_rng(0)
    images = []
    for _ in range(5):  # 5 images over 2 or 3 ranks: uneven shares
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    torch.save({**data, "images": images}, inputs)
    (tmp_path / "one").mkdir()
    _eval_worker(0, 1, 0, str(inputs), str(tmp_path / "one"))  # one process, in this one
    mp.spawn(_eval_worker, args=(world, free_port(), str(inputs), str(tmp_path)), nprocs=world, join=True)
    want = torch.load(tmp_path / "one" / "eval0.pt")
    assert want["image"].shape[0] == 10 and want["zeroshot"].shape[0] == 5
    for rank in range(world):
        got = torch.load(tmp_path / f"eval{rank}.pt")
        for key in ("image", "text", "zeroshot"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12, msg=f"rank {rank} {key}")
