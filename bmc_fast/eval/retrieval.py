"""Zero-shot image-text retrieval, as BMC-LongCLIP reports it.

    python -m bmc_fast.eval.retrieval --checkpoint RUN_DIR --data 'DIR/shard-{000000..000001}.tar'
    python -m bmc_fast.eval.retrieval --checkpoint EXPORT_DIR --data ...   # python -m bmc_fast.export's directory

Recall@k: cosine similarity of L2-normalised embeddings; each text query has exactly one matching
image (its pair) and vice versa. A query scores a hit at k when fewer than k *other* candidates score
at least as high as its match — ties count against the query, so a collapsed model (all embeddings
equal) scores 0, not 100. With fewer than k candidates every query is a hit.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bmc_fast.checkpoint.run_dir import RunDir
from bmc_fast.cli import ArgumentParser, check_output_file, positive_int, run_main
from bmc_fast.data.select_loader import LOADERS
from bmc_fast.errors import ConfigError

_logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10, 100)


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor,
                     ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Recall@k in percent for pairs (image_features[i], text_features[i]), both (N, D).

    Returns ``{"t2i_r1": ..., "t2i_r100": ..., "i2t_r1": ..., "i2t_r100": ...}`` (keys follow ``ks``).
    """
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"image_features and text_features must both be (N, D); got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if image_features.shape[0] < 1:
        raise ValueError("retrieval needs at least one pair, got N = 0")
    image = F.normalize(image_features.double(), dim=-1)
    text = F.normalize(text_features.double(), dim=-1)
    similarity = text @ image.T  # (N texts, N images)
    metrics = {}
    for name, scores in (("t2i", similarity), ("i2t", similarity.T)):
        matched = scores.diagonal().unsqueeze(1)  # (N, 1) score of each query's own pair
        rank = (scores >= matched).sum(dim=1) - 1  # other candidates scoring at least as high
        for k in ks:
            metrics[f"{name}_r{k}"] = 100.0 * (rank < k).double().mean().item()
    return metrics


@torch.no_grad()
def extract_features(model, loader, device: torch.device, dtype: torch.dtype = torch.float32,
                     progress: bool = False, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (image (N, E), text (N, E)) features of every pair in ``loader``, in fp32 on the CPU.

    With ``world_size`` > 1 (every rank of a ``torch.distributed`` group calls it with the same loader) each rank
    encodes its share of every batch (``my_rows``) and the features are gathered: the same pairs in the same
    order as one process computes, the model's work divided by the ranks (every rank still reads every batch, and
    runs as many forwards as the others, as ZeRO-3 needs)."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    images, texts, sizes = [], [], []
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        rows = my_rows(batch["pixels"].shape[0], rank, world_size)
        pixels = batch["pixels"][rows].to(device=device, dtype=dtype)
        images.append(model.encode_image(pixels, normalize=True).float())
        texts.append(model.encode_text(batch["input_ids"][rows].to(device), batch["attention_mask"][rows].to(device),
                                       normalize=True).float())
        sizes.append(batch["pixels"].shape[0])
    model.train(was_training)
    if world_size == 1:
        return torch.cat(images).cpu(), torch.cat(texts).cpu()
    return (torch.cat([gather_rows(x, n, world_size) for x, n in zip(images, sizes)]).cpu(),
            torch.cat([gather_rows(x, n, world_size) for x, n in zip(texts, sizes)]).cpu())


def my_rows(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices of the rows of an ``n``-row batch that ``rank`` encodes: a contiguous ceil(n / world_size) of them,
    padded with row 0 to that count (every rank encodes as many; ``gather_rows`` drops the padding)."""
    per = -(-n // world_size)
    mine = torch.arange(min(rank * per, n), min((rank + 1) * per, n))
    return torch.cat([mine, torch.zeros(per - len(mine), dtype=torch.long)])


def gather_rows(local: torch.Tensor, n: int, world_size: int) -> torch.Tensor:
    """Every rank's ``my_rows`` features (per, E) -> the batch's (n, E), in row order (one all-gather)."""
    parts = [torch.empty_like(local) for _ in range(world_size)]
    torch.distributed.all_gather(parts, local.contiguous())
    return torch.cat(parts)[:n]  # only the last ranks' chunks are short: their padding lands after row n - 1


def eval_shards(data: str, flag: str = "--data") -> list[str]:
    """The shards named by ``data``, checked: they exist and hold at least 2 samples between them."""
    from bmc_fast.data.shards import REMOTE_PREFIXES, count_samples, expand_shards

    urls = expand_shards(data, flag)
    if any(url.startswith(REMOTE_PREFIXES) for url in urls):  # counted as they are read
        return urls
    n = sum(count_samples(u, flag) for u in urls)
    if n < 2:
        raise ConfigError(f"{flag} {data!r} holds {n} sample(s); retrieval needs at least 2")
    return urls


def evaluate_shards(model, tokenizer, model_cfg, data: str | list[str], batch_size: int = 64, workers: int = 1,
                    flag: str = "--data", loader: str = "auto") -> dict:
    """Retrieval metrics of ``model`` on every (good) pair of the shards named by ``data`` (a pattern, or the
    list ``eval_shards`` made of one)."""
    from bmc_fast.data.select_loader import build_loader, resolve_loader

    urls = eval_shards(data, flag) if isinstance(data, str) else data
    batches = build_loader(urls, kind=resolve_loader(loader, urls), tokenizer=tokenizer, train=False,
                           context_length=model_cfg.context_length, image_size=model_cfg.vision.image_size,
                           batch_size=batch_size, workers=workers)
    image, text = extract_features(model, batches, torch.device("cpu"), progress=True)
    return {"n": image.shape[0], **retrieval_recall(image, text)}


def format_table(rows: dict[str, dict], ks: tuple[int, ...] = DEFAULT_KS) -> str:
    """Markdown table: one row per named result, T2I then I2T recall columns."""
    header = ["run", "N"] + [f"T2I R@{k}" for k in ks] + [f"I2T R@{k}" for k in ks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in rows.items():
        cells = ([name, str(m.get("n", ""))] + [f"{m[f't2i_r{k}']:.1f}" for k in ks]
                 + [f"{m[f'i2t_r{k}']:.1f}" for k in ks])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from bmc_fast.checkpoint.load import CONFIG_NAME, check_run, load_export, load_run

    parser = ArgumentParser(description="Image-text retrieval Recall@k of a bmc-fast training run or export.")
    parser.add_argument("--checkpoint", required=True, help="run directory written by bmc_fast/train.py, or an "
                        "export directory (python -m bmc_fast.export)")
    parser.add_argument("--data", required=True, help="WebDataset shards, e.g. 'DIR/shard-{000000..000001}.tar'")
    parser.add_argument("--json", default=None, help="output JSON (default RUN_DIR/eval.json)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="loader processes (pil) or threads (dali)")
    parser.add_argument("--loader", default="auto", choices=LOADERS,
                        help="image decoding: DALI (auto, when installed) or webdataset + PIL, as in training")
    args = parser.parse_args(argv)
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0 (0: load in this process), got {args.workers}")
    out = (check_output_file(args.json, "--json", example_name="eval.json") if args.json
           else RunDir(args.checkpoint).eval)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    export = (Path(args.checkpoint) / CONFIG_NAME).is_file()
    if export and args.tag is not None:
        raise ConfigError(f"--tag {args.tag!r}: --checkpoint {args.checkpoint!r} is an export, which holds one model")
    if not export:
        check_run(args.checkpoint, args.tag, flag="--checkpoint")  # the cheap checks first: the run, then the data
    urls = eval_shards(args.data)
    if export:
        model, tokenizer = load_export(Path(args.checkpoint))
        model_cfg = model.cfg
    else:
        model, tokenizer, model_cfg = load_run(args.checkpoint, args.tag, flag="--checkpoint")
    metrics = evaluate_shards(model, tokenizer, model_cfg, urls, args.batch_size, args.workers, loader=args.loader)
    out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "data": args.data, **metrics}, indent=2))
    sys.stdout.write(format_table({Path(args.checkpoint).name: metrics}) + f"\n\nwrote {out}\n")
    return metrics


if __name__ == "__main__":
    run_main(main)
