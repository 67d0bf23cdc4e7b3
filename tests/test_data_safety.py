"""Messy biomedical shards: every image kind decodes, every broken sample is skipped and counted, and
both loaders (webdataset + PIL, DALI on CPU) deliver each good sample exactly once per epoch over 2 ranks.

The reference for counts and identities is what the test itself wrote into the shards.
"""
import gc
import gzip
import json
import logging
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bmc_fast.dali_pipelines.dali_loader import DaliLoader  # DALI is pinned: a missing one fails
from bmc_fast.data.index import (
    build_indexes,
    index_is_current,
    index_path,
    index_skips,
    read_index,
    scan_path,
    scan_shard,
)
from bmc_fast.data.index import main as index_main
from bmc_fast.data.pil_loader import make_loader
from bmc_fast.data.samples import decode_image
from bmc_fast.data.select_loader import ensure_indexes
from bmc_fast.data.shards import expand_shards
from bmc_fast.data.text_tokenizer import train_tokenizer
from bmc_fast.data.transforms import CLIP_MEAN, CLIP_STD
from bmc_fast.errors import ConfigError, DataError
from helpers import SHARED_DATA, corrupt_samples, encode_image, image_kinds, write_shard

pytestmark = pytest.mark.usefixtures("free_dali_pipelines")  # DALI pipelines: see conftest
COVID = SHARED_DATA / "covid_cxr"


@pytest.fixture(autouse=True)
def free_dali_pipelines():
    """Destroy each test's DALI pipelines (and their threads) before the next test: a DataLoader that
    forks workers while DALI threads run can crash them (later tests in this process fork)."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """Two shards: every image kind as good samples (twice), every corrupt kind (truncated ones twice)."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("messy")
    kinds = image_kinds(rng)
    good_jpeg, good_png = kinds["rgb_jpeg"][1], kinds["gray_png"][1]
    good, broken, shards = [], Counter(), [[], []]
    for copy in range(2):
        for i, (kind, (ext, data)) in enumerate(kinds.items()):
            key = f"good-{copy}-{kind}"
            caption = f"figure {copy} {i}: a {kind.replace('_', ' ')} panel with a lesion"
            shards[(copy + i) % 2].append((key, {ext: data, "txt": caption.encode()}))
            good.append(caption)
    # Good samples whose names webdataset and DALI's index treat specially: upper-case caption
    # extension, a long name and a non-ASCII name (PAX headers), a dotted folder.
    for i, key in enumerate(["upper-TXT", "k" * 120, "fígura-é", "figs.v1/panel"]):
        caption = f"figure extra {i}: named {key[:20]}"
        shards[i % 2].append((key, {"jpg": good_jpeg, "TXT" if i == 0 else "txt": caption.encode()}))
        good.append(caption)
    # Members webdataset skips (no sample, no skip): a macOS AppleDouble file, a README without extension.
    shards[0].insert(3, (None, [("._good-0-rgb_jpeg.jpg", b"\x00\x05\x16\x07"), ("figs.v1/README", b"notes")]))
    for i, (kind, members) in enumerate(corrupt_samples(good_jpeg, good_png)):
        key = f"bad-{i}-{kind}" + (" copy" if kind == "space_in_name" else "")
        shards[i % 2].insert(2 * i % len(shards[i % 2]), (key, members))
        broken[kind] += 1
    urls = [write_shard(out / f"shard-{n:06d}.tar", samples) for n, samples in enumerate(shards)]
    tokenizer = train_tokenizer(good, out / "tokenizer", vocab_size=400)
    return {"urls": urls, "good": sorted(good), "broken": dict(broken), "tokenizer": tokenizer,
            "tokenizer_dir": str(out / "tokenizer"), "kinds": kinds}


def _captions(batches, tokenizer):
    """Caption texts of every delivered row, by matching token ids, plus the summed skip counts."""
    seen, skipped = [], Counter()
    for batch in batches:
        skipped.update(batch["skipped"])
        assert batch["pixels"].shape[1:] == (3, 64, 64) and torch.isfinite(batch["pixels"]).all()
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            seen.append(tokenizer.decode(ids[mask.bool()], skip_special_tokens=True))
    return seen, skipped


def test_index_scan_counts_every_kind_and_lists_only_good_samples(messy):
    report = build_indexes(messy["urls"])
    assert report["skipped"] == messy["broken"]
    assert report["good"] == len(messy["good"])
    assert report["samples"] == len(messy["good"]) + sum(messy["broken"].values())
    names = [c[3] for url in messy["urls"] for sample in read_index(url) for c in sample]
    assert not [name for name in names if name.startswith(("bad-", "._", "figs.v1/README"))]
    assert len([n for n in names if n.lower().endswith(".txt")]) == len(messy["good"])
    assert index_skips(messy["urls"]) == messy["broken"]


@pytest.mark.parametrize("workers", [0, 1])
def test_pil_loader_two_ranks_skip_and_deliver_each_good_sample_once(messy, workers):
    seen, skipped = [], Counter()
    for rank in range(2):
        loader = make_loader(messy["urls"], messy["tokenizer"], context_length=64, image_size=64, batch_size=4,
                             train=True, rank=rank, world_size=2, workers=workers, seed=1, epochs=1)
        rows, skips = _captions(loader, messy["tokenizer"])
        seen += rows
        skipped += skips
    assert sorted(seen) == messy["good"]
    assert dict(skipped) == messy["broken"]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_dali_loader_two_ranks_deliver_each_good_sample_once(messy, train):
    build_indexes(messy["urls"])
    seen = []
    for rank in range(2):
        loader = DaliLoader(messy["urls"], messy["tokenizer"], context_length=64, image_size=64, batch_size=4,
                            train=train, rank=rank, world_size=2, seed=1, epochs=2)
        rows, _ = _captions(loader, messy["tokenizer"])
        seen += rows
    assert sorted(seen) == sorted(messy["good"] * 2)  # two epochs, each good sample once per epoch
    assert index_skips(messy["urls"]) == messy["broken"]  # the skips the DALI loader reports


def test_endless_dali_train_stream_keeps_epochs_whole(messy, caplog):
    """FILL policy: batches run across epoch ends; any window of whole epochs holds every sample equally.

    The stream never asks DALI to reset mid-epoch (DALI ignores such a reset with a warning per epoch).
    """
    build_indexes(messy["urls"])
    loader = DaliLoader(messy["urls"], messy["tokenizer"], context_length=64, image_size=64, batch_size=4,
                        train=True, seed=2)
    stream = iter(loader)
    n = len(messy["good"])
    assert n % 4 and 2 * n % 4 == 0, "the first epoch must end inside a batch, the second at a batch's end"
    with caplog.at_level(logging.WARNING):
        rows, _ = _captions((next(stream) for _ in range(2 * n // 4)), messy["tokenizer"])  # exactly two epochs
    assert Counter(rows) == Counter({caption: 2 for caption in messy["good"]})
    assert not [r.getMessage() for r in caplog.records if "reset" in r.getMessage()]


def test_every_image_kind_decodes_to_rgb_like_dali(messy, tmp_path):
    """PIL path (samples.decode_image) vs DALI's CPU decoder, pixel for pixel, on every kind."""
    from nvidia.dali import fn, pipeline_def

    from bmc_fast.dali_pipelines.augment import decode_whole

    kinds = messy["kinds"]
    url = write_shard(tmp_path / "kinds.tar", [(k, {ext: data, "txt": k.encode()}) for k, (ext, data) in kinds.items()])
    build_indexes([url])

    @pipeline_def(batch_size=len(kinds), num_threads=1, device_id=None)
    def decode():
        encoded, caption = fn.readers.webdataset(paths=[url], index_paths=[str(index_path(url))],
                                                 ext=["jpg;png", "txt"])
        return decode_whole(encoded, decoder_device="cpu"), caption  # the eval graph's decoder

    pipe = decode()
    pipe.build()
    images, captions = pipe.run()
    for i in range(len(kinds)):
        kind = bytes(np.array(captions[i])).decode()
        ours = np.asarray(decode_image(kinds[kind][1]))
        theirs = np.array(images[i])
        assert ours.shape == theirs.shape and ours.shape[2] == 3, kind
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1, kind


def _eval_pixel_errors(urls, tokenizer) -> torch.Tensor:
    """Per-image mean |DALI − PIL| of the eval pixels over ``urls`` (same captions, same sample ids, same order)."""
    build_indexes(urls)
    kwargs = dict(context_length=512, image_size=224, batch_size=16, train=False)
    dali_batches = list(DaliLoader(urls, tokenizer, **kwargs))
    pil_batches = list(make_loader(urls, tokenizer, workers=0, **kwargs))
    assert [b["input_ids"].tolist() for b in dali_batches] == [b["input_ids"].tolist() for b in pil_batches]
    assert [b["keys"] for b in dali_batches] == [b["keys"] for b in pil_batches]  # one sample id for both loaders
    dali_pixels = torch.cat([b["pixels"] for b in dali_batches])  # (N, 3, 224, 224), shard order
    pil_pixels = torch.cat([b["pixels"] for b in pil_batches])
    return (dali_pixels - pil_pixels).abs().mean(dim=(1, 2, 3))


@pytest.mark.skipif(not COVID.is_dir(), reason=f"{COVID} absent (it comes with ../shared/data); "
                                              "test_dali_eval_matches_pil_on_generated_images runs without it")
def test_dali_eval_matches_pil_resize_centre_crop_on_covid_cxr(tmp_path, modernbert_tokenizer):
    """Mixed JPEG/PNG, RGB/RGBA/L X-rays: DALI eval pixels vs torchvision's PIL transform, row by row.

    Decoding is identical (test above) and the resized size and crop anchor follow torchvision's
    integer rules, so what differs is the antialiased bicubic kernel itself (PIL's Keys a=-0.5 vs
    DALI's cubic): measured here ≤ 0.0034 mean |Δ| per image in normalised units (≈ 0.25/255 of
    intensity). The bound is 0.01: a crop one pixel off already gives ≥ 0.05 on these X-rays, and a
    wrong channel order or normalisation far more.
    """
    for shard in sorted(COVID.glob("*.tar")):
        shutil.copy(shard, tmp_path / shard.name)
    errors = _eval_pixel_errors(sorted(str(p) for p in tmp_path.glob("*.tar")), modernbert_tokenizer)
    assert len(errors) == 196
    assert errors.max() < 0.01, errors.max()


def test_dali_eval_matches_pil_on_generated_images(tmp_path, messy):
    """The same comparison without ../shared/data: smooth JPEG/PNG images, RGB/RGBA/L, sizes whose resize
    and centre crop hit torchvision's rounding cases (odd slack, portrait and landscape, upscaling)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    samples = []
    for i, (height, width) in enumerate([(300, 401), (513, 257), (224, 225), (150, 97), (640, 480), (333, 333)]):
        coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        fmt, mode = [("JPEG", None), ("PNG", "RGBA"), ("PNG", "L")][i % 3]
        samples.append((f"gen-{i}", {"jpg" if fmt == "JPEG" else "png": encode_image(smooth, fmt, mode),
                                     "txt": messy["good"][i].encode()}))
    errors = _eval_pixel_errors([write_shard(tmp_path / "gen-000000.tar", samples)], messy["tokenizer"])
    assert len(errors) == len(samples)
    assert errors.max() < 0.01, errors


def _gradient_image() -> bytes:
    """256×256 PNG with red = x and green = y, so a crop's pixels tell where it came from."""
    x, y = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    return encode_image(np.dstack([x, y, np.zeros_like(x)]), "PNG")


@pytest.mark.parametrize("loader", ["pil", "dali"])
def test_train_crops_respect_scale_and_ratio(tmp_path, loader):
    """Crop area within open_clip's scale (0.9, 1.0) and aspect ratio within (3/4, 4/3), read off the pixels."""
    captions = [f"gradient sample {i}" for i in range(48)]
    url = write_shard(tmp_path / "grad.tar", [(f"g{i:03d}", {"png": _gradient_image(), "txt": c.encode()})
                                              for i, c in enumerate(captions)])
    tokenizer = train_tokenizer(captions, tmp_path / "tok", vocab_size=300)
    if loader == "dali":
        build_indexes([url])
        batches = DaliLoader([url], tokenizer, context_length=16, image_size=64, batch_size=8, train=True, epochs=1)
    else:
        batches = make_loader([url], tokenizer, context_length=16, image_size=64, batch_size=8, train=True,
                              workers=0, epochs=1)
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    areas = []
    for batch in batches:
        for pixels in batch["pixels"]:
            rgb = (pixels.float() * std + mean) * 255  # (3, 64, 64) back to 0..255
            # The crop spans 64 output pixels: extrapolate the edge-pixel centres half a pixel outwards.
            x0, x1 = rgb[0, 32, 1].item(), rgb[0, 32, -2].item()
            y0, y1 = rgb[1, 1, 32].item(), rgb[1, -2, 32].item()
            width, height = (x1 - x0) * 64 / 61, (y1 - y0) * 64 / 61
            areas.append(width * height / 256 ** 2)
            assert 0.9 * 0.95 <= width * height / 256 ** 2 <= 1.0 * 1.03
            assert 3 / 4 * 0.97 <= width / height <= 4 / 3 * 1.03
    assert len(areas) == 48 and np.std(areas) > 0.005  # crops are random, not one fixed crop


def test_not_a_tar_and_mismatched_index_are_named(messy, tmp_path):
    fake = tmp_path / "shard-000009.tar"
    fake.write_bytes(b"this is a jpeg, not a tar" * 40)
    with pytest.raises(ConfigError, match="shard-000009.tar.*not a readable tar"):
        index_main([str(fake)])
    build_indexes(messy["urls"])
    swapped = tmp_path / "shard-000000.tar"
    shutil.copy(messy["urls"][0], swapped)
    shutil.copy(scan_path(messy["urls"][0]), scan_path(swapped))  # its own scan, but ...
    shutil.copy(index_path(messy["urls"][1]), index_path(swapped))  # ... the other shard's index

    def dali_loader():
        return DaliLoader([str(swapped)], messy["tokenizer"], context_length=16, image_size=64, batch_size=4,
                          train=False)

    with pytest.raises(ConfigError, match=r"index .*shard-000000.idx.* does not match shard .*shard-000000.tar.*"
                                          r"at offset \d+ the tar holds"):
        dali_loader()
    for text, why in (("", "header ''"), ("v1.2 1\njpg x 5 a.jpg", "line 2 is not '<ext> <offset>"),
                      ("v1.2 1\njpg 512 5", "line 2 is not '<ext> <offset>")):
        index_path(swapped).write_text(text)
        with pytest.raises(ConfigError, match=f"shard-000000.idx.*shard-000000.tar.*{why}.*python -m bmc_fast"):
            dali_loader()
    scan_path(swapped).unlink()  # an index with no scan of ours, as DALI's wds2idx writes (bad samples too)
    with pytest.raises(ConfigError, match="no scan of the shard as it is now .*wds2idx.*rebuild it"):
        dali_loader()
    index_path(swapped).unlink()
    with pytest.raises(ConfigError, match="has no index.*python -m bmc_fast.data.index"):
        dali_loader()


def test_index_of_another_tool_is_replaced_by_a_scan(messy, tmp_path):
    """ensure_indexes trusts only an index whose scan matches the shard; any other is rebuilt."""
    shard = tmp_path / "shard-000000.tar"
    shutil.copy(messy["urls"][0], shard)
    with tarfile.open(shard) as tar:  # every member listed, bad samples included, as wds2idx would
        lines = [f"{m.name.rsplit('.', 1)[1]} {m.offset_data} {m.size} {m.name}" for m in tar if m.isfile()]
    index_path(shard).write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
    ensure_indexes([str(shard)])
    assert scan_path(shard).is_file() and len(read_index(shard)) < len(lines)
    scan = json.loads(scan_path(shard).read_text())
    scan_path(shard).write_text(json.dumps({**scan, "dali_checked": False}))  # scanned where DALI was missing
    assert not index_is_current(shard)  # DALI is here now: its decoder must check the images once
    ensure_indexes([str(shard)])
    assert json.loads(scan_path(shard).read_text())["dali_checked"]


def test_shards_with_dots_in_their_names_keep_their_own_index(messy, tmp_path):
    dotted = [str(shutil.copy(url, tmp_path / f"biomedica.v1-{i:06d}.tar")) for i, url in enumerate(messy["urls"])]
    build_indexes(dotted)
    assert [index_path(u).name for u in dotted] == ["biomedica.v1-000000.idx", "biomedica.v1-000001.idx"]
    loader = DaliLoader(dotted, messy["tokenizer"], context_length=64, image_size=64, batch_size=4, train=False)
    rows, _ = _captions(loader, messy["tokenizer"])
    assert sorted(rows) == messy["good"]


def test_compressed_shard_is_refused_for_dali(messy, tmp_path):
    packed = tmp_path / "shard-000000.tar.gz"
    with gzip.open(packed, "wb") as out:
        out.write(Path(messy["urls"][0]).read_bytes())
    with pytest.raises(ConfigError, match="not a plain tar file.*decompress it, or use --loader pil"):
        build_indexes([str(packed)])


def test_missing_shards_in_a_range_are_named(messy):
    directory = Path(messy["urls"][0]).parent
    with pytest.raises(ConfigError, match=r"--train-data .*: 4 named shard\(s\) do not exist, e.g. .*shard-000002"):
        expand_shards(str(directory / "shard-{000000..000005}.tar"), "--train-data")


def test_dali_decode_check_names_what_it_cannot_decode_and_recovers(messy):
    from bmc_fast.dali_pipelines.decode_check import DaliDecodeCheck

    png = messy["kinds"]["gray_png"][1]
    idat = png.index(b"IDAT") + 8
    check = DaliDecodeCheck()
    assert check(png) is None
    assert "Failed to decode" in check(png[:idat] + bytes([png[idat] ^ 0xFF]) + png[idat + 1:])
    assert check(png) is None  # a new pipeline after the failure


def test_scan_skips_images_dali_rejects_though_pil_reads_them(messy, tmp_path):
    """The scan's DALI check (a stub rejecting the CMYK JPEG) drops the sample and counts it."""
    shard = str(shutil.copy(messy["urls"][0], tmp_path / "shard-000000.tar"))
    cmyk = messy["kinds"]["cmyk_jpeg"][1]
    scan = scan_shard(shard, dali_check=lambda data: "stub: rejected" if data == cmyk else None)
    plain = scan_shard(str(shutil.copy(messy["urls"][0], tmp_path / "other-000000.tar")), dali_check=lambda d: None)
    rejected = plain.good - scan.good
    assert rejected >= 1 and scan.skipped["truncated_image"] == plain.skipped["truncated_image"] + rejected


def test_scan_report_is_written(messy, tmp_path):
    report = tmp_path / "report.json"
    result = index_main(["::".join(messy["urls"]), "--report", str(report)])
    assert json.loads(report.read_text()) == result
    assert result["skipped"] == messy["broken"] and all(shard["dali_checked"] for shard in result["shards"])


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["pil", "dali"])
def test_trainer_runs_on_messy_shards_and_reports_skips(messy, tmp_path, loader):
    """The real launcher, 1 rank, 4 steps (over one epoch) on the messy shards: no crash, skips in summary.json.

    DALI reports the index scan's counts, exactly; the PIL loader counts what its workers have read,
    which depends on how far the shuffle buffer and prefetching ran (exact per-epoch counts: above).
    """
    from helpers import deepspeed_config, free_port, launch_deepspeed

    urls = []
    for url in messy["urls"]:  # a private copy: no index yet, so the DALI run must scan first
        urls.append(str(shutil.copy(url, tmp_path / Path(url).name)))
    run_dir = tmp_path / "run"
    proc = launch_deepspeed(["--num_gpus", "1", "--master_port", str(free_port()), "bmc_fast/train.py",
                             "--ds_config", str(deepspeed_config(tmp_path, 2, steps=4, batch=6)),
                             "--train-data", "::".join(urls), "--eval-data", "::".join(urls),
                             "--tokenizer", messy["tokenizer_dir"], "--max-steps", "4",
                             "--eval-every", "0", "--output-dir", str(run_dir), "--workers", "1",
                             "--loader", loader], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    if loader == "dali":
        assert summary["skipped"] == messy["broken"]
    else:
        assert set(summary["skipped"]) <= set(messy["broken"]) and sum(summary["skipped"].values()) > 0
    assert f"skipped samples ({loader} loader, all ranks)" in proc.stdout + proc.stderr
    assert summary["n_eval"] == len(messy["good"])  # the final evaluation covers the good pairs only
    assert f"(N={len(messy['good'])})" in proc.stdout + proc.stderr
    assert "caption tokens: mean" in proc.stdout + proc.stderr


def test_image_over_the_decompression_bomb_limit_is_skipped_not_raised(monkeypatch):
    """PIL refuses images over 2 × MAX_IMAGE_PIXELS with an exception; that must be one skipped sample."""
    from PIL import Image

    from bmc_fast.data.samples import SampleError

    data = encode_image(np.zeros((100, 100, 3), dtype=np.uint8), "PNG")
    assert decode_image(data).size == (100, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels > 2 × 1,000
    with pytest.raises(SampleError) as error:
        decode_image(data)
    assert error.value.kind == "too_large_image"


def test_pil_train_stream_over_shards_with_no_good_sample_stops_after_one_pass(messy, tmp_path):
    """An endless stream that never finds a good sample would wait forever; after one full pass over the
    shards it stops, naming them and the skip counts."""
    bad = [write_shard(tmp_path / f"bad-{n:06d}.tar", [(f"k{i}", {"jpg": b"", "txt": b"x"}) for i in range(3)])
           for n in range(2)]
    loader = make_loader(bad, messy["tokenizer"], context_length=16, image_size=64, batch_size=2, train=True,
                         workers=0, shuffle_buffer=4)
    with pytest.raises(DataError, match=r"all 6 sample\(s\) of a full pass over 2 shard\(s\) \[.*bad-000000.tar', "
                                          r".*bad-000001.tar'\] were skipped.*'empty_file': \d+.*index SHARDS"):
        next(iter(loader))


def test_pil_train_stream_with_one_good_sample_among_many_bad_keeps_going(messy, tmp_path):
    bad = write_shard(tmp_path / "bad-000000.tar", [(f"k{i}", {"jpg": b"", "txt": b"x"}) for i in range(20)])
    good = write_shard(tmp_path / "good-000000.tar", [("g", {"jpg": messy["kinds"]["rgb_jpeg"][1],
                                                              "txt": messy["good"][0].encode()})])
    loader = make_loader([bad, good], messy["tokenizer"], context_length=16, image_size=64, batch_size=1,
                         train=True, workers=0, shuffle_buffer=50)
    stream = iter(loader)
    batches = [next(stream) for _ in range(3)]  # the good sample of three passes, many skips between them
    assert all(batch["pixels"].shape == (1, 3, 64, 64) for batch in batches)
    assert sum(batch["skipped"].get("empty_file", 0) for batch in batches) > 0


def test_pil_train_stream_over_a_shard_with_a_repeated_key_still_stops_after_one_pass(messy, tmp_path):
    """The pass is counted in samples read, not distinct keys: a key repeated apart in one shard cannot keep
    the rule from completing."""
    bad = write_shard(tmp_path / "bad-000000.tar", [(k, {"jpg": b"", "txt": b"x"}) for k in ("a", "b", "a")])
    loader = make_loader([bad], messy["tokenizer"], context_length=16, image_size=64, batch_size=2, train=True,
                         workers=0)
    with pytest.raises(DataError, match=r"all 3 sample\(s\) of a full pass over 1 shard\(s\).*'empty_file': 3.*index"):
        next(iter(loader))


def test_a_restored_dali_stream_continues_with_the_same_batches_bit_for_bit(small_data):
    """DALI's own checkpoint, taken as of the last batch handed out (the tokeniser thread has fetched one
    more) and saved the safe way, rebuilds a pipeline whose next batches (crops, shuffle, the epoch turn
    of this rank's 128 samples) equal the uninterrupted stream's."""
    import io

    urls = expand_shards(small_data["train"], "--train-data")
    build_indexes(urls)
    kwargs = dict(context_length=64, image_size=32, batch_size=24, train=True, rank=1, world_size=2, seed=4)
    loader = DaliLoader(urls, small_data["tokenizer"], **kwargs)
    stream = iter(loader)
    _ = [next(stream) for _ in range(4)]
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)
    expected = [{k: v.clone() if torch.is_tensor(v) else v for k, v in next(stream).items()} for _ in range(4)]
    del stream, loader
    gc.collect()
    buffer.seek(0)
    resumed = DaliLoader(urls, small_data["tokenizer"], **kwargs)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    again = iter(resumed)
    got = [next(again) for _ in range(4)]
    assert all(torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["input_ids"], b["input_ids"])
               and a["keys"] == b["keys"] for a, b in zip(got, expected))
    fresh = next(iter(DaliLoader(urls, small_data["tokenizer"], **kwargs)))
    assert not torch.equal(fresh["pixels"], expected[0]["pixels"])  # a restart would not pass


def test_a_dali_stream_state_refuses_another_split(small_data):
    from bmc_fast.errors import ConfigError

    urls = expand_shards(small_data["train"], "--train-data")
    build_indexes(urls)
    kwargs = dict(context_length=64, image_size=32, batch_size=8, train=True, world_size=2, seed=4)
    state = DaliLoader(urls, small_data["tokenizer"], rank=0, **kwargs).state_dict()
    with pytest.raises(ConfigError, match=r"'rank': 0.*cannot continue as .*'rank': 1.*same ranks"):
        DaliLoader(urls, small_data["tokenizer"], rank=1, **kwargs).load_state_dict(state)


@pytest.mark.parametrize("kind", ["dali", "dali-stream"])
def test_a_dropped_dali_loader_frees_its_pipeline_without_the_garbage_collector(kind, small_data, monkeypatch):
    """A loader left in a reference cycle keeps its DALI pipeline until the collector runs; a DataLoader worker forked
    meanwhile that collects its copy aborts (SIGABRT: DALI's threads do not exist there). Dropping the loader and its
    iterator must free the pipeline at once."""
    import weakref

    from bmc_fast.dali_pipelines import dali_loader, stream_loader
    from bmc_fast.data.select_loader import build_loader

    module, name = (dali_loader, "build_pipeline") if kind == "dali" else (stream_loader, "build_stream_pipeline")
    built, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    urls = expand_shards(small_data["train"], "--train-data")
    ensure_indexes(urls)
    loader = build_loader(urls, kind=kind, tokenizer=small_data["tokenizer"], train=True, context_length=16,
                          image_size=32, batch_size=8)
    batches = iter(loader)
    next(batches)
    pipeline = weakref.ref(built.pop())
    gc.disable()
    try:
        del batches, loader
        assert pipeline() is None
    finally:
        gc.enable()
