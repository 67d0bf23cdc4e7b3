"""Weighted mixtures (``--train-data 'A::B' --train-data-weights '1::3'``): the observed share of each source
against its expected share, with both loaders; a mixed stream resumes exactly; bad weights are refused."""
import io
import math
import re

import pytest
import torch

from bmc_fast.data.mixture import Mixture, expected_shares, parse_weights
from bmc_fast.data.pil_loader import make_loader
from bmc_fast.data.shards import expand_shards
from bmc_fast.errors import ConfigError

pytestmark = pytest.mark.usefixtures("free_dali_pipelines")  # DALI pipelines: see conftest


def _sources(small_data) -> tuple[list[str], list[str]]:
    urls = expand_shards(small_data["train"], "--train-data")  # 4 shards of 64
    return urls[:2], urls[2:]


def _share_of(batches, source: list[str]) -> tuple[float, int]:
    keys = [key for batch in batches for key in batch["keys"]]
    return sum(key.split("#")[0] in source for key in keys) / len(keys), len(keys)


def _within_3_sigma(observed: float, expected: float, n: int) -> bool:
    return abs(observed - expected) <= 3 * math.sqrt(expected * (1 - expected) / n)


@pytest.mark.parametrize("factors,epoch_size", [((1.0, 3.0), 512), ((1.0, 0.5), 192)])
def test_a_pil_mixture_draws_each_source_by_its_upsampling_factor(small_data, factors, epoch_size):
    """Two epochs of one rank: B's share is factor × samples / Σ factor × samples (3/4 for 1::3, 1/3 for 1::0.5),
    exactly, since each epoch lists the shards the factors give (the fractional one: one of B's two shards, a
    seeded choice that changes with the epoch)."""
    a, b = _sources(small_data)
    mixture = Mixture((tuple(a), tuple(b)), factors)
    expected = expected_shares(mixture, [128, 128])[1]
    kwargs = dict(context_length=16, image_size=32, batch_size=32, train=True, workers=0, seed=5, shuffle_buffer=50,
                  mixture=mixture)
    stream = iter(make_loader(a + b, small_data["tokenizer"], **kwargs))
    batches = [next(stream) for _ in range(2 * epoch_size // 32)]
    observed, n = _share_of(batches, b)
    assert n == 2 * epoch_size and _within_3_sigma(observed, expected, n), (observed, expected)
    assert observed == pytest.approx(expected)
    assert [epoch for batch in batches for epoch in batch["epochs"]] == [0] * epoch_size + [1] * epoch_size
    if factors[1] < 1:  # the half of B each epoch holds is drawn per epoch (and per seed), the same for every rank
        assert {tuple(mixture.epoch_shards(epoch, seed=5)) for epoch in range(8)} == {(*a, b[0]), (*a, b[1])}
        assert {tuple(mixture.epoch_shards(0, seed=seed)) for seed in range(8)} == {(*a, b[0]), (*a, b[1])}


def test_a_dali_mixture_draws_each_source_by_its_upsampling_factor(small_data):
    pytest.importorskip("nvidia.dali")
    from bmc_fast.data.index import build_indexes
    from bmc_fast.data.select_loader import build_loader

    a, b = _sources(small_data)
    build_indexes(a + b)
    mixture = Mixture((tuple(a), tuple(b)), (1.0, 3.0))
    loader = build_loader(a + b, kind="dali", tokenizer=small_data["tokenizer"], train=True, context_length=16,
                          image_size=32, batch_size=40, seed=5, mixture=mixture)
    stream = iter(loader)
    observed, n = _share_of([next(stream) for _ in range(10)], b)
    assert n == 400 and _within_3_sigma(observed, 0.75, n), observed


def test_a_mixed_stream_resumes_with_the_same_batches(small_data):
    a, b = _sources(small_data)
    kwargs = dict(context_length=16, image_size=32, batch_size=16, train=True, workers=0, seed=5, shuffle_buffer=30,
                  mixture=Mixture((tuple(a), tuple(b)), (1.0, 1.5)))
    loader = make_loader(a + b, small_data["tokenizer"], **kwargs)
    stream = iter(loader)
    _ = [next(stream) for _ in range(13)]  # into the second epoch of 128 + 192 samples
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)
    expected = [next(stream) for _ in range(4)]
    buffer.seek(0)
    resumed = make_loader(a + b, small_data["tokenizer"], **kwargs)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    again = iter(resumed)
    got = [next(again) for _ in range(4)]
    assert [g["keys"] for g in got] == [e["keys"] for e in expected]
    assert all(torch.equal(g["pixels"], e["pixels"]) for g, e in zip(got, expected))


@pytest.mark.parametrize("text,message", [
    ("1", r"gives 1 factor\(s\) for 2 --train-data source\(s\)"),
    ("1::x", "every factor must be a number"),
    ("1::0", "every factor must be > 0"),
    ("1::inf", "every factor must be > 0"),
])
def test_bad_weights_are_refused_naming_the_flag(text, message):
    with pytest.raises(ConfigError, match=f"--train-data-weights '{re.escape(text)}'.*{message}"):
        parse_weights(text, 2)
