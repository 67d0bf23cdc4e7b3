"""The WebDataset loader: shard splitting, batch contents, tokenisation, transforms."""
import json
import tarfile

import pytest
import torch

from bmc_fast.data.pil_loader import epoch_shards, make_loader
from bmc_fast.data.shards import expand_shards
from bmc_fast.data.transforms import CLIP_MEAN, CLIP_STD, image_transform


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_each_epoch_reads_every_shard_once_across_ranks_and_workers(world, workers):
    urls = [f"shard-{i}.tar" for i in range(12)]
    for epoch in range(3):
        seen = [url for rank in range(world) for worker in range(workers)
                for url in epoch_shards(urls, epoch, rank=rank, world_size=world, worker=worker, workers=workers,
                                        seed=5, shuffle=True)]
        assert sorted(seen) == sorted(urls)


def test_epochs_reshuffle_shards():
    urls = [f"shard-{i}.tar" for i in range(20)]
    first, second = (epoch_shards(urls, epoch, rank=0, world_size=1, worker=0, workers=1, seed=1, shuffle=True)
                     for epoch in (0, 1))
    assert sorted(first) == sorted(second) == sorted(urls)
    assert first != second


def test_eval_loader_yields_every_pair_once_in_order(small_data):
    urls = expand_shards(small_data["eval"], "--eval-data")
    loader = make_loader(urls, small_data["tokenizer"], context_length=512, image_size=64, batch_size=10,
                         train=False, workers=0)
    batches = list(loader)
    assert [b["pixels"].shape[0] for b in batches] == [10, 10, 10, 2]
    with tarfile.open(urls[0]) as tar:
        captions = [tar.extractfile(m).read().decode().strip() for m in tar if m.name.endswith(".txt")]
    ids = torch.cat([torch.nn.functional.pad(b["input_ids"], (0, 512 - b["input_ids"].shape[1]),
                                             value=small_data["tokenizer"].pad_token_id) for b in batches])
    decoded = small_data["tokenizer"].batch_decode(ids, skip_special_tokens=True)
    assert [d.strip() for d in decoded] == captions


@pytest.mark.parametrize("context_length", [77, 512])
def test_train_batches_are_full_and_truncated_to_context(small_data, context_length):
    urls = expand_shards(small_data["train"], "--train-data")
    loader = make_loader(urls, small_data["tokenizer"], context_length=context_length, image_size=64, batch_size=16,
                         train=True, rank=1, world_size=2, workers=1, seed=0)
    batches = iter(loader)
    for _ in range(10):  # more than one epoch of this rank's 128 samples
        batch = next(batches)
        assert batch["pixels"].shape == (16, 3, 64, 64) and batch["pixels"].dtype == torch.float32
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        assert batch["input_ids"].shape[1] <= context_length
        real = batch["attention_mask"].sum(1)
        assert (batch["input_ids"][:, 0] == small_data["tokenizer"].cls_token_id).all()
        last = batch["input_ids"].gather(1, (real - 1)[:, None]).squeeze(1)
        assert (last == small_data["tokenizer"].sep_token_id).all()  # truncation keeps [SEP]
    if context_length == 77:
        assert (real == 77).all()  # every synthetic caption is longer than 77 tokens


def test_eval_transform_is_resize_centre_crop_normalise():
    from PIL import Image

    image = Image.new("RGB", (80, 80), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 40, 80))  # left half blue: a flip would move it
    out = image_transform(64, train=False)(image)
    assert out.shape == (3, 64, 64)
    blue = (torch.tensor([0.0, 0.0, 1.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[:, 32, 5], blue, atol=1e-3, rtol=0)
    torch.testing.assert_close(out[:, 32, 58], red, atol=1e-3, rtol=0)


def test_train_transform_never_flips():
    from PIL import Image

    image = Image.new("RGB", (80, 80), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 40, 80))
    transform = image_transform(64, train=True)
    for _ in range(30):
        out = transform(image)
        assert out[2, 32, 2] > out[0, 32, 2]  # left edge stays blue
        assert out[0, 32, 61] > out[2, 32, 61]  # right edge stays red


def test_grayscale_and_rgba_become_rgb():
    from PIL import Image

    for mode in ("L", "RGBA", "LA"):
        out = image_transform(64, train=False)(Image.new(mode, (70, 90)))
        assert out.shape == (3, 64, 64)


def test_synthetic_json_describes_the_caption(small_data):
    urls = expand_shards(small_data["train"], "--train-data")
    with tarfile.open(urls[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    key = sorted(members)[0].split(".")[0]
    meta = json.loads(members[f"{key}.json"])
    caption = members[f"{key}.txt"].decode()
    assert caption[meta["findings_start_char"]:].startswith("Findings:")


def test_token_waste_leaves_out_remote_shards_with_a_log_line(small_data, caplog):
    """The trainer's start-up statistic must not stop a run that streams some shards (pipe:, http)."""
    import logging

    from bmc_fast.data.token_stats import shard_waste
    from bmc_fast.errors import ConfigError

    local = expand_shards(small_data["eval"], "--eval-data")
    remote = ["pipe:curl -s https://example.org/shard-000000.tar", "https://example.org/shard-000001.tar"]
    with caplog.at_level(logging.INFO, logger="bmc_fast.data.token_stats"):
        mixed = shard_waste(remote + local, small_data["tokenizer"], [77], max_texts=8)
    assert mixed == shard_waste(local, small_data["tokenizer"], [77], max_texts=8)
    assert "leaving out 2 remote shard(s)" in caplog.text
    with pytest.raises(ConfigError, match="every shard is remote"):
        shard_waste(remote, small_data["tokenizer"], [77])


def _same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x["pixels"], y["pixels"]) and x["skipped"] == y["skipped"]
                                    and torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_stream_continues_with_the_same_batches_bit_for_bit(small_data, workers):
    """The loader's state after 5 batches (into the second epoch of this rank's 128 samples with 2 workers)
    restores into a new loader that yields the same next batches, crops included, as the first one."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    urls = expand_shards(small_data["train"], "--train-data")
    kwargs = dict(context_length=64, image_size=32, batch_size=24, train=True, rank=1, world_size=2, workers=workers,
                  seed=4, shuffle_buffer=40)
    loader = make_loader(urls, small_data["tokenizer"], **kwargs)
    assert isinstance(loader, StatefulDataLoader)
    stream = iter(loader)
    _ = [next(stream) for _ in range(5)]
    state = loader.state_dict()
    expected = [next(stream) for _ in range(4)]
    state = torch.load(_saved(state), weights_only=True)  # what a checkpoint holds, loaded the safe way
    resumed = make_loader(urls, small_data["tokenizer"], **kwargs)
    resumed.load_state_dict(state)
    again = iter(resumed)
    assert _same_batches([next(again) for _ in range(4)], expected)
    fresh = iter(make_loader(urls, small_data["tokenizer"], **kwargs))
    assert not _same_batches([next(fresh) for _ in range(4)], expected)  # a restart would not pass


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_a_stream_state_refuses_another_split(small_data):
    from bmc_fast.errors import ConfigError

    urls = expand_shards(small_data["train"], "--train-data")
    kwargs = dict(context_length=64, image_size=32, batch_size=8, train=True, world_size=2, workers=0, seed=4)
    loader = make_loader(urls, small_data["tokenizer"], rank=0, **kwargs)
    stream = iter(loader)
    next(stream)
    other = make_loader(urls, small_data["tokenizer"], rank=1, **kwargs)
    other.load_state_dict(loader.state_dict())
    with pytest.raises(ConfigError, match=r"'rank': 0.*cannot continue as .*'rank': 1.*same ranks and --workers"):
        next(iter(other))


def _epoch_keys(batches, epoch: int) -> list[str]:
    return [key for batch in batches for key, e in zip(batch["keys"], batch["epochs"]) if e == epoch]


def _places(loaders, world_size: int, workers: int) -> list[dict]:
    """Every worker's place in these loaders (one a rank), through a checkpoint's save and safe load."""
    from bmc_fast.data.stream_places import loader_places

    return [place for rank, loader in enumerate(loaders) for place in
            loader_places(torch.load(_saved(loader.state_dict()), weights_only=True), rank, world_size, workers)]


def test_a_stream_cut_anew_twice_reads_every_sample_of_its_epoch_once(small_data):
    """2 ranks read part of epoch 0 (4 shards of 64 samples, batches of 8); the stream is re-cut over 3 ranks,
    which read a little (still finishing the old streams), then over 1 rank with 2 worker processes, which reads
    on into epoch 1. Over the three cuts every sample of epoch 0 is read exactly once, and each cut's sample ids
    are the shards' own."""
    from bmc_fast.data.tar_samples import read_tar_samples

    urls = expand_shards(small_data["train"], "--train-data")
    every = sorted(f"{url}#{sample['__key__']}" for url in urls for sample in read_tar_samples(url, read=False))
    kwargs = dict(context_length=16, image_size=32, batch_size=8, train=True, seed=4, shuffle_buffer=20)
    read: list[dict] = []

    def take(loaders, batches_each):
        streams = [iter(loader) for loader in loaders]
        for _ in range(batches_each):
            read.extend(next(stream) for stream in streams)

    first = [make_loader(urls, small_data["tokenizer"], rank=r, world_size=2, workers=0, **kwargs) for r in range(2)]
    take(first, 5)  # 80 of 256
    second = [make_loader(urls, small_data["tokenizer"], rank=r, world_size=3, workers=0,
                          resplit_from=_places(first, 2, 0), **kwargs) for r in range(3)]
    take(second, 2)  # 48 more, all from the old streams
    assert not _epoch_keys(read, 1)
    third = make_loader(urls, small_data["tokenizer"], rank=0, world_size=1, workers=2,
                        resplit_from=_places(second, 3, 0), **kwargs)
    take([third], 24)  # the 128 left of epoch 0, then 64 of epoch 1
    assert sorted(_epoch_keys(read, 0)) == every
    assert len(_epoch_keys(read, 1)) == 64 and len(set(_epoch_keys(read, 1))) == 64
