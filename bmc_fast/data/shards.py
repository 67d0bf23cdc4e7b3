"""Shard lists: expand WebDataset patterns and check them before anything expensive starts.

A pattern is brace notation (``dir/shard-{000000..000099}.tar``), a glob (``dir/*.tar``) or several of
those joined by ``::`` (open_clip's convention). Local shards must exist and hold at least one sample;
remote URLs (``http(s)://``, ``hf://``, ``s3://``, ``pipe:``; ``bmc_fast.data.shard_fetch`` reads them) are passed
through unchecked.
"""
from __future__ import annotations

import glob
from pathlib import Path

import braceexpand

from bmc_fast.data.shard_fetch import REMOTE_PREFIXES
from bmc_fast.data.tar_samples import read_tar_samples
from bmc_fast.errors import ConfigError


def expand_shards(pattern: str, flag: str) -> list[str]:
    """All shard paths named by ``pattern``; raises ``ConfigError`` naming ``flag`` when one is unusable."""
    urls: list[str] = []
    missing: list[str] = []
    for part in pattern.split("::"):
        for url in braceexpand.braceexpand(part):
            if url.startswith(REMOTE_PREFIXES):
                urls.append(url)
            elif any(ch in url for ch in "*?["):
                urls.extend(sorted(glob.glob(url)))
            elif Path(url).is_file():
                urls.append(url)
            else:
                missing.append(url)
    if missing and urls:  # a range that names shards which are not there: say which, never drop them
        raise ConfigError(f"{flag} {pattern!r}: {len(missing)} named shard(s) do not exist, e.g. {missing[:3]}: "
                          "fix the range, or list only the shards that exist")
    if not urls:
        raise ConfigError(f"{flag} {pattern!r} matches no file: check the directory, or name a shard range "
                          "like 'DIR/shard-{000000..000009}.tar' (python -m bmc_fast.data.synthetic --out DIR "
                          "writes an example)")
    for url in urls:
        if not url.startswith(REMOTE_PREFIXES) and count_samples(url, flag) == 0:
            raise ConfigError(f"{flag}: shard {url!r} is empty (no samples): remove it from the pattern or "
                              "rewrite it")
    return urls


def count_samples(path: str, flag: str = "shard") -> int:
    """Number of samples in a local WebDataset tar as webdataset groups them, reading headers only."""
    if Path(path).stat().st_size == 0:
        return 0
    return sum(1 for _ in read_tar_samples(path, read=False, flag=flag))
