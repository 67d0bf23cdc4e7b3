"""Training-loader throughput: DALI (CPU here, mixed on a GPU) vs webdataset + PIL vs open_clip's transform.

    python benchmarks/bench_data.py [--threads 2] [--repeats 3] [--batch 64] [--device cpu|cuda]

Same shards, same thread count (DALI threads vs DataLoader worker processes), the endless train-mode
stream the trainer draws (decode, RandomResizedCrop scale (0.9, 1), bicubic resize to 224, normalise),
captions tokenised with the ModernBERT tokenizer (a trained stand-in when ../shared/data is absent),
whole batch dicts delivered. Datasets: generated 512×512 JPEG shards, and ../shared/data/covid_cxr
(real X-rays, mixed JPEG/PNG, RGB/RGBA/L; skipped with a reason when absent). Each repeat runs the
three loaders back to back; the first 3 batches (worker spawn, pipeline build, shuffle-buffer fill) are
timed apart, then ≥ 1,000 images. A one-thread profile splits each image's cost into decode, resize and
normalise for PIL and DALI on the same images. The remote case streams the same shards over http from a
local server (``python -m http.server`` in its own process) through the PIL loader and ``dali-stream`` (the PIL
stream decoded by DALI), each beside the same loader on the local files, in the same interleaved repeats.
``--device cuda`` runs the DALI graph with mixed decode on GPU 0 (pixels stay on the GPU; the PIL loaders are
unchanged). Writes benchmarks/results/data_<device>.{json,md}.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import report

from bmc_fast.cli import ArgumentParser, positive_int, run_main
from bmc_fast.errors import ConfigError

RESULTS = Path(__file__).parent / "results"
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
IMAGE_SIZE = 224


def generated_shards(out: Path, shards: int = 4, per_shard: int = 128, side: int = 512) -> list[str]:
    """JPEG shards of smooth random 512-px images (photo-like JPEG sizes, ~40–60 kB) with captions."""
    import io
    import tarfile

    from PIL import Image

    rng = np.random.default_rng(0)
    urls = []
    for s in range(shards):
        url = out / f"gen-{s:06d}.tar"
        with tarfile.open(url, "w") as tar:
            for i in range(per_shard):
                coarse = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
                image = Image.fromarray(np.clip(np.asarray(image) + rng.normal(0, 6, (side, side, 3)), 0, 255)
                                        .astype(np.uint8))
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=90)
                caption = f"figure {s}-{i}: axial CT slice, lesion in segment {i % 8}".encode()
                for ext, data in (("jpg", buffer.getvalue()), ("txt", caption)):
                    info = tarfile.TarInfo(f"{s:03d}{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(url))
    return urls


KINDS = ("dali", "pil", "open_clip", "pil_http", "dali_stream", "dali_stream_http")


def make(kind: str, urls: list[str], tokenizer, threads: int, batch: int, device_id: int | None,
         served: str | None = None):
    """The endless training stream the trainer draws from (train mode, no ``epochs`` bound); ``*_http`` kinds read
    the shards from the server at ``served`` (the URL of their folder)."""
    common = dict(context_length=512, image_size=IMAGE_SIZE, batch_size=batch, train=True)
    if kind.endswith("_http"):
        kind, urls = kind.removesuffix("_http"), [f"{served}/{Path(url).name}" for url in urls]
    if kind == "dali_stream":
        from bmc_fast.dali_pipelines.stream_loader import DaliStreamLoader

        return DaliStreamLoader(urls, tokenizer, num_threads=threads, device_id=device_id, **common)
    if kind == "dali":
        from bmc_fast.dali_pipelines.dali_loader import DaliLoader

        return DaliLoader(urls, tokenizer, num_threads=threads, device_id=device_id, **common)
    from bmc_fast.data.pil_loader import make_loader

    transform = None
    if kind == "open_clip":
        import open_clip

        transform = open_clip.image_transform(IMAGE_SIZE, is_train=True)  # its own RandomResizedCrop (0.9, 1)
    return make_loader(urls, tokenizer, workers=threads, transform=transform, **common)


def run_stream(loader, min_images: int, warmup_batches: int = 3) -> dict:
    """Steady-state images/s after ``warmup_batches`` (worker spawn, pipeline build, shuffle-buffer fill)."""
    start = time.perf_counter()
    batches = iter(loader)
    for _ in range(warmup_batches):
        next(batches)
    startup = time.perf_counter() - start
    images, t0 = 0, time.perf_counter()
    while images < min_images:
        images += next(batches)["pixels"].shape[0]
    elapsed = time.perf_counter() - t0
    getattr(batches, "close", lambda: None)()  # the DALI loader's tokeniser thread
    return {"images": images, "startup_s": startup, "images_per_s": images / elapsed}


def bench(urls: list[str], tokenizer, threads: int, batch: int, repeats: int, device_id: int | None,
          min_images: int = 1000) -> dict:
    from bmc_fast.data.index import build_indexes

    build_indexes(urls)
    runs = {kind: [] for kind in KINDS}
    with shard_server(Path(urls[0]).parent) as served:
        for _ in range(repeats):
            for kind in runs:  # side by side, interleaved: drifts in machine load hit every kind alike
                loader = make(kind, urls, tokenizer, threads, batch, device_id, served)
                runs[kind].append(run_stream(loader, min_images))
                del loader
                gc.collect()  # the finished loader's worker processes exit before the next one starts
    out = {kind: {"images_per_s": statistics.median(r["images_per_s"] for r in rs),
                  "startup_s": statistics.median(r["startup_s"] for r in rs), "images": rs[0]["images"]}
           for kind, rs in runs.items()}
    out["dali_over_pil"] = out["dali"]["images_per_s"] / out["pil"]["images_per_s"]
    out["dali_over_open_clip"] = out["dali"]["images_per_s"] / out["open_clip"]["images_per_s"]
    out["pil_http_over_local"] = out["pil_http"]["images_per_s"] / out["pil"]["images_per_s"]
    out["dali_stream_http_over_local"] = out["dali_stream_http"]["images_per_s"] / out["dali_stream"]["images_per_s"]
    out["dali_stream_over_dali"] = out["dali_stream"]["images_per_s"] / out["dali"]["images_per_s"]
    return out


@contextlib.contextmanager
def shard_server(folder: Path):
    """``python -m http.server`` on 127.0.0.1 serving ``folder``, in its own process; yields its URL."""
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):  # until it answers
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait()


def first_images(urls: list[str], count: int) -> list[bytes]:
    """The shards' first ``count`` images that decode (one per sample, as the loaders group them)."""
    from bmc_fast.data.samples import IMAGE_EXTENSIONS, SampleError, decode_image
    from bmc_fast.data.tar_samples import read_tar_samples

    found = []
    for url in urls:
        for sample in read_tar_samples(url):
            for data in (sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample):
                try:
                    decode_image(data)
                except SampleError:
                    continue
                found.append(data)
                if len(found) == count:
                    return found
    return found


def stage_profile(urls: list[str], images: int = 256) -> dict:
    """Milliseconds per image of each train-mode stage on one thread: PIL as the loader runs it, DALI's graph.

    Stages on the same images: decode (DALI decodes only the random crop), crop + antialiased bicubic
    resize to 224, then to a normalised CHW float tensor. Each stage is the difference of cumulative
    runs, each the best of 5
    (so a nearly free stage can come out a few hundredths of a millisecond below zero).
    """
    from torchvision import transforms as T

    from bmc_fast.data.samples import decode_image
    from bmc_fast.data.transforms import image_transform

    data = first_images(urls, images)
    crop = T.RandomResizedCrop(IMAGE_SIZE, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    full = image_transform(IMAGE_SIZE, train=True)
    pil_steps = {"decode": decode_image, "resize": lambda b: crop(decode_image(b)),
                 "normalise": lambda b: full(decode_image(b))}

    def per_image_ms(step) -> float:
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - t0)
        return 1e3 * best / len(data)

    pil = {name: per_image_ms(lambda f=f: [f(b) for b in data]) for name, f in pil_steps.items()}
    dali = {name: per_image_ms(lambda p=p: p.run()) for name, p in dali_stage_pipelines(data).items()}
    increments = {}
    for library, cumulative in (("pil", pil), ("dali", dali)):
        values = list(cumulative.values())
        increments[library] = {name: value - (values[i - 1] if i else 0.0)
                               for i, (name, value) in enumerate(cumulative.items())}
    return increments


def dali_stage_pipelines(data: list[bytes]) -> dict:
    """One-thread synchronous CPU pipelines over ``data`` (one batch) that stop after each train stage."""
    from nvidia.dali import fn, pipeline_def

    from bmc_fast.dali_pipelines.augment import clip_augment, decode_train_crop, resize_cubic

    arrays = [np.frombuffer(b, dtype=np.uint8) for b in data]
    stages = {"decode": lambda e: decode_train_crop(e, decoder_device="cpu"),
              "resize": lambda e: resize_cubic(decode_train_crop(e, decoder_device="cpu"), width=IMAGE_SIZE,
                                               height=IMAGE_SIZE),
              "normalise": lambda e: clip_augment(e, image_size=IMAGE_SIZE, train=True, decoder_device="cpu")}
    pipes = {}
    for name, stage in stages.items():
        @pipeline_def(batch_size=len(arrays), num_threads=1, device_id=None, seed=0, prefetch_queue_depth=1,
                      exec_pipelined=False, exec_async=False)
        def pipe():
            return stage(fn.external_source(source=lambda: arrays, batch=True))  # noqa: B023 (built this iteration)

        pipes[name] = pipe()
        pipes[name].build()
        pipes[name].run()  # the first run allocates
    return pipes


def tokenizer_for_bench(tmp: Path):
    from bmc_fast.data.text_tokenizer import load_tokenizer, train_tokenizer

    if (SHARED / "tokenizers" / "modernbert" / "tokenizer.json").is_file():
        return load_tokenizer(SHARED / "tokenizers" / "modernbert"), "ModernBERT"
    return train_tokenizer(["axial CT slice, lesion in segment"] * 50, tmp / "tok", vocab_size=300), "trained stand-in"


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="DALI threads = PIL / open_clip worker processes")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the DALI graph runs")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA GPU here: pass --device cpu")
    device_id = 0 if args.device == "cuda" else None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer, tokenizer_name = tokenizer_for_bench(tmp)
        datasets = {"generated_512px_jpeg": generated_shards(tmp)}
        covid = sorted((SHARED / "covid_cxr").glob("*.tar"))
        notes = {}
        if covid:
            (tmp / "covid").mkdir()
            datasets["covid_cxr"] = [str(shutil.copy(p, tmp / "covid" / p.name)) for p in covid]  # indexes go beside
        else:
            notes["covid_cxr"] = f"skipped: {SHARED / 'covid_cxr'} absent"
        cases = {}
        for name, urls in datasets.items():
            cases[name] = bench(urls, tokenizer, args.threads, args.batch, args.repeats, device_id)
            cases[name]["ms_per_image_one_thread"] = stage_profile(urls)
            sys.stderr.write(f"{name}: DALI {cases[name]['dali']['images_per_s']:.1f} img/s, PIL "
                             f"{cases[name]['pil']['images_per_s']:.1f}, open_clip "
                             f"{cases[name]['open_clip']['images_per_s']:.1f} (DALI/PIL "
                             f"{cases[name]['dali_over_pil']:.2f}); over http / local: PIL "
                             f"{cases[name]['pil_http_over_local']:.2f}, dali-stream "
                             f"{cases[name]['dali_stream_http_over_local']:.2f}\n")
    import nvidia.dali

    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    machine = {**report.machine(args.device), "device": device,
               "threads": args.threads, "batch": args.batch, "repeats": args.repeats, "tokenizer": tokenizer_name,
               "torch": torch.__version__, "dali": nvidia.dali.__version__}
    result = {"machine": machine, "cases": cases, "notes": notes}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"data_{args.device}.json").write_text(json.dumps(result, indent=2))
    lines = [f"Training streams, train mode at {IMAGE_SIZE} px, {args.threads} threads (DALI) / worker processes "
             f"(PIL, open_clip), batch {args.batch}, median of {args.repeats} interleaved runs of ≥ 1,000 images "
             "after 3 warm-up batches; "
             f"{os.cpu_count()} CPU cores, DALI {nvidia.dali.__version__} on {device}.", "",
             "| shards | images | DALI img/s | PIL img/s | open_clip img/s | DALI / PIL | DALI / open_clip |",
             "|---|---|---|---|---|---|---|"]
    for name, c in cases.items():
        lines.append(f"| {name} | {c['dali']['images']} | {c['dali']['images_per_s']:.1f} | "
                     f"{c['pil']['images_per_s']:.1f} | {c['open_clip']['images_per_s']:.1f} | "
                     f"{c['dali_over_pil']:.2f} | {c['dali_over_open_clip']:.2f} |")
    lines += ["", "CPU milliseconds per image by stage, one thread, same images (DALI decodes only the random crop):",
              "", "| shards | stage | PIL ms | DALI ms |", "|---|---|---|---|"]
    for name, c in cases.items():
        profile = c["ms_per_image_one_thread"]
        for stage in profile["pil"]:
            lines.append(f"| {name} | {stage} | {profile['pil'][stage]:.2f} | {profile['dali'][stage]:.2f} |")
        lines.append(f"| {name} | **total** | {sum(profile['pil'].values()):.2f} | "
                     f"{sum(profile['dali'].values()):.2f} |")
    lines += ["", "Remote shards: the same shards over http from a local server (its own process) against the local "
              "files, same loader, same threads, in the same interleaved runs (dali-stream: the PIL loader's stream, "
              "fetched ahead into a local cache, decoded by DALI):", "",
              "| shards | PIL local img/s | PIL http img/s | http / local | dali-stream local img/s | "
              "dali-stream http img/s | http / local | dali-stream / dali |", "|---|---|---|---|---|---|---|---|"]
    for name, c in cases.items():
        lines.append(f"| {name} | {c['pil']['images_per_s']:.1f} | {c['pil_http']['images_per_s']:.1f} | "
                     f"{c['pil_http_over_local']:.2f} | {c['dali_stream']['images_per_s']:.1f} | "
                     f"{c['dali_stream_http']['images_per_s']:.1f} | {c['dali_stream_http_over_local']:.2f} | "
                     f"{c['dali_stream_over_dali']:.2f} |")
    lines += [f"\n{note}" for note in notes.values()]
    (RESULTS / f"data_{args.device}.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    run_main(main)
