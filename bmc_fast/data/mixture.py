"""Weighted mixtures of shard sources: ``--train-data 'A::B' --train-data-weights '1::3'``.

The weights are **upsampling factors**, as open_clip's ``--train-data-upsampling-factors``: a source's samples are
drawn ``factor`` times as often as its size alone would give (``'1::1'``, the default, is the plain union). open_clip
samples shards with replacement, weighted; bmc-fast keeps epochs, so that a stopped run resumes exactly: each epoch
lists every shard of a source ``floor(factor)`` times, plus a seeded choice of ``round(frac(factor) × shards)`` of
them, before the usual shuffle and split by rank and worker (``pil_loader.epoch_shards``). The expected share of a
source is ``factor × samples / Σ factor × samples``. The DALI reader's file list is fixed for a run: its fractional
choice is drawn once, with the run's seed.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from bmc_fast.errors import ConfigError


@dataclass(frozen=True)
class Mixture:
    sources: tuple[tuple[str, ...], ...]  # each source's shards
    factors: tuple[float, ...]  # each source's upsampling factor

    def epoch_shards(self, epoch: int, seed: int) -> list[str]:
        """The shards of ``epoch``, each as often as its source's factor gives (before any shuffle)."""
        shards: list[str] = []
        for index, (urls, factor) in enumerate(zip(self.sources, self.factors)):
            whole, fraction = divmod(factor, 1.0)
            shards += list(urls) * int(whole)
            if fraction:
                chooser = random.Random(f"{seed}:{epoch}:{index}")  # the same on every rank and worker
                shards += chooser.sample(list(urls), round(fraction * len(urls)))
        return shards


def parse_weights(text: str, n_sources: int, flag: str = "--train-data-weights") -> tuple[float, ...]:
    """``'1::3'`` -> (1.0, 3.0): one positive factor for each ``::`` source of ``--train-data``."""
    parts = text.split("::")
    try:
        factors = tuple(float(part) for part in parts)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: every factor must be a number, e.g. '1::3'") from None
    if len(factors) != n_sources:
        raise ConfigError(f"{flag} {text!r} gives {len(factors)} factor(s) for {n_sources} --train-data source(s) "
                          "(joined by '::'): give one factor for each, in order")
    if not all(math.isfinite(f) and f > 0 for f in factors):
        raise ConfigError(f"{flag} {text!r}: every factor must be > 0 (drop a source from --train-data instead)")
    return factors


def expected_shares(mixture: Mixture, samples: list[int]) -> list[float]:
    """Each source's expected share of the training samples, from its sample count."""
    weighted = [factor * n for factor, n in zip(mixture.factors, samples)]
    return [w / sum(weighted) for w in weighted]
