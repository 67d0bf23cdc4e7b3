"""Streamed shards on both loaders, against a local HTTP server that also answers as the Hugging Face Hub: the
batches of the local files, retries, counted skips, one clear error when the server goes away, the bounded cache."""
import dataclasses
import logging
import os
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from bmc_fast.dali_pipelines.stream_loader import DaliStreamLoader
from bmc_fast.data.pil_loader import make_loader
from bmc_fast.data.samples import SampleError, check_encoded
from bmc_fast.data.select_loader import resolve_loader
from bmc_fast.data.shard_fetch import SHARD_SKIP, FetchPolicy, FetchTally, fetched
from bmc_fast.errors import DataError
from helpers import ShardServer

pytestmark = pytest.mark.usefixtures("free_dali_pipelines")  # DALI pipelines: see conftest
FAST = FetchPolicy(retries=2, backoff_s=0.05, timeout_s=10, give_up_after=3)


@pytest.fixture
def server(small_data, monkeypatch, tmp_path):
    """The small dataset served on 127.0.0.1, which is also HF_ENDPOINT; every reader's cache under tmp_path."""
    from huggingface_hub import constants

    served = ShardServer(small_data["root"])
    monkeypatch.setattr(constants, "ENDPOINT", served.url)  # as HF_ENDPOINT sets them when huggingface_hub loads
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        served.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("BMC_FAST_SHARD_CACHE", str(tmp_path / "cache"))
    yield served
    served.close()


def _loader(kind, urls, tokenizer, **kwargs):
    common = dict(context_length=32, image_size=64, batch_size=16, fetch=kwargs.pop("fetch", FAST))
    if kind == "pil":
        return make_loader(urls, tokenizer, workers=kwargs.pop("workers", 2), **common, **kwargs)
    kwargs.pop("workers", None)  # the stream's one feeder process; DALI's threads:
    return DaliStreamLoader(urls, tokenizer, num_threads=2, **common, **kwargs)


def _train(small_data):
    return sorted(str(p) for p in Path(small_data["root"], "train").glob("*.tar"))


def _assert_same_batches(local, remote, n):
    for step, (a, b) in enumerate(zip(local, remote)):
        if step == n:
            break
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["input_ids"], b["input_ids"]), step
        assert [k.split("#")[1] for k in a["keys"]] == [k.split("#")[1] for k in b["keys"]]
        assert a["skipped"] == b["skipped"] == {}


@pytest.mark.parametrize("kind,scheme", [("pil", "http"), ("dali-stream", "hf")])
def test_remote_shards_give_the_batches_of_the_local_files(kind, scheme, server, small_data, monkeypatch):
    """Over http:// (PIL, 2 worker processes) and hf:// (dali-stream, resolved through the Hub's repo-info API at
    HF_ENDPOINT, the user's token sent to the Hub but not on to where it redirects): the training stream is the
    local files' one, bit for bit, past an epoch."""
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    local = _loader(kind, _train(small_data), small_data["tokenizer"], train=True)
    remote = _loader(kind, server.urls(_train(small_data), scheme), small_data["tokenizer"], train=True)
    _assert_same_batches(local, remote, 20)  # 320 samples: the 256 of epoch 0 and some of epoch 1
    shards = {path for path, _ in server.requests if path.endswith(".tar") and "/resolve/" not in path}
    assert len(shards) == 4
    if scheme == "hf":
        assert ("/api/datasets/test/shards", "Bearer hf_test_token") in server.requests  # repo info
        resolve = [(path, token) for path, token in server.requests if "/resolve/" in path]
        assert len(resolve) >= 4 and all(token == "Bearer hf_test_token" for _, token in resolve)
        assert {path.removeprefix("/cdn/") for path in shards} == {f"train/{Path(u).name}" for u in _train(small_data)}
        assert all(token is None for path, token in server.requests if path.startswith("/cdn/"))  # the token stays


def test_s3_goes_through_the_aws_cli(small_data, tmp_path, monkeypatch):
    """s3://BUCKET/KEY is read as `aws s3 cp s3://BUCKET/KEY -` (a stand-in aws on PATH serves the local files)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "aws").write_text(f'#!/bin/sh\n[ "$1 $2 $4" = "s3 cp -" ] || exit 2\n'
                                 f'cat "{small_data["root"]}/${{3#s3://bucket/}}"\n')
    (bin_dir / "aws").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("BMC_FAST_SHARD_CACHE", str(tmp_path / "cache"))
    eval_shard = str(next(Path(small_data["root"], "eval").glob("*.tar")))
    local = _loader("pil", [eval_shard], small_data["tokenizer"], train=False, workers=0)
    remote = _loader("pil", [f"s3://bucket/eval/{Path(eval_shard).name}"], small_data["tokenizer"], train=False,
                     workers=0)
    _assert_same_batches(local, remote, 10)
    tally = FetchTally()  # a key the CLI cannot copy: a failed pipe, retried, then skipped and counted
    assert list(fetched(["s3://bucket/eval/missing.tar"], FAST, tally)) == [] and tally.skipped == {SHARD_SKIP: 1}


def test_transient_errors_are_retried_and_a_shard_that_still_fails_is_counted(server, small_data, caplog):
    """A 503 and a 429 are retried and cost nothing; a 404 is not retried: that shard is skipped and counted. The
    cache holds at most `ahead + 1` shards and is removed at the end."""
    urls = server.urls(_train(small_data))
    paths = [url.removeprefix(server.url) for url in urls]
    server.fail.update({paths[0]: [503, 429], paths[2]: [404]})
    cache = Path(os.environ["BMC_FAST_SHARD_CACHE"])
    seen_in_cache = []
    with caplog.at_level(logging.INFO, logger="bmc_fast.data.shard_fetch"):
        batches = []
        for batch in _loader("pil", urls, small_data["tokenizer"], train=False, workers=0):
            batches.append(batch)
            seen_in_cache.append(len(list(cache.rglob("*.tar"))))
    keys = [key for batch in batches for key in batch["keys"]]
    assert len(keys) == len(set(keys)) == 3 * 64 and not any(paths[2] in key for key in keys)
    assert sum((Counter(batch["skipped"]) for batch in batches), Counter()) == {SHARD_SKIP: 1}
    assert [path for path, _ in server.requests].count(paths[0]) == 3  # two retries
    assert [path for path, _ in server.requests].count(paths[2]) == 1  # a 404 is not retried
    assert "HTTP 503" in caplog.text and "retry 1 of 2" in caplog.text
    assert f"skipping shard {urls[2]}: {urls[2]}: HTTP 404" in caplog.text
    assert max(seen_in_cache) <= FAST.ahead + 1
    assert not list(cache.iterdir())  # the reader's folder is gone


@pytest.mark.parametrize("kind", ["pil", "dali-stream"])
def test_a_server_that_goes_away_ends_the_stream_with_one_clear_error(kind, server, small_data):
    """The endless training stream, the server stopped after a few batches: the shards already fetched are read,
    then every connection is closed unanswered and, give_up_after shards in a row later (more than one epoch has),
    one DataError names the URL (no hang)."""
    urls = server.urls(_train(small_data))
    patient = dataclasses.replace(FAST, give_up_after=6)  # more than an epoch's 4 shards: counted across epochs
    batches = iter(_loader(kind, urls, small_data["tokenizer"], train=True, workers=0, fetch=patient))
    for _ in range(3):
        next(batches)
    server.stop()
    start = time.monotonic()
    with pytest.raises(DataError, match=r"6 shards in a row could not be fetched; the last, http://127\.0\.0\.1:\d+/"
                                        r"train/shard-\d+\.tar: .*Remote end closed connection"):
        for _ in range(1000):
            next(batches)
    assert time.monotonic() - start < 120


def test_dali_stream_resumes_exactly(server, small_data):
    """dali-stream's state is the stream's place as of the last batch handed out (DALI prefetches past it)."""
    urls = server.urls(_train(small_data))
    loader = _loader("dali-stream", urls, small_data["tokenizer"], train=True)
    batches = iter(loader)
    for _ in range(5):
        next(batches)
    state = loader.state_dict()
    expected = [next(batches) for _ in range(3)]
    resumed = _loader("dali-stream", urls, small_data["tokenizer"], train=True)
    resumed.load_state_dict(state)
    _assert_same_batches(expected, resumed, 3)


def test_the_dali_loader_reads_remote_shards_through_the_stream(server, small_data, caplog):
    urls = server.urls(_train(small_data))
    with caplog.at_level(logging.INFO):
        assert resolve_loader("dali", urls) == "dali-stream"
        assert resolve_loader("auto", urls) == "dali-stream"
    assert f"DALI's reader reads local shards only and {urls[0]!r} is remote" in caplog.text


def test_check_encoded_finds_cut_images_without_decoding_them(small_data):
    """The dali-stream check: a JPEG or PNG cut short is a truncated_image; the full ones pass with their size."""
    import io

    import numpy as np
    from PIL import Image

    for fmt in ("JPEG", "PNG"):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buffer, fmt)
        data = buffer.getvalue()
        sample = {"__members__": [{"fname": "a.jpg"}, {"fname": "a.txt"}], "jpg": data, "txt": b"a caption"}
        assert check_encoded(sample) == (data, "a caption", (50, 40))
        with pytest.raises(SampleError, match="truncated_image"):
            check_encoded({**sample, "jpg": data[:len(data) * 2 // 3]})
