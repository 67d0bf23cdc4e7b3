"""Shard lists: expand WebDataset patterns and check them before anything expensive starts.

A pattern is brace notation (``dir/shard-{000000..000099}.tar``), a glob (``dir/*.tar``) or several of
those joined by ``::`` (open_clip's convention). Local shards must exist and hold at least one sample;
remote URLs (``pipe:``, ``s3://``, ``http(s)://``) are passed through unchecked.
"""
from __future__ import annotations

import glob
import re
import tarfile
from pathlib import Path

import braceexpand

from bmc_fast.config import ConfigError

REMOTE_PREFIXES = ("pipe:", "s3://", "gs://", "http://", "https://")


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
    """Number of samples (distinct keys) in a local WebDataset tar, reading headers only."""
    if Path(path).stat().st_size == 0:
        return 0
    try:
        with tarfile.open(path) as tar:
            keys = {found[0] for m in tar if m.isfile() and (found := member_key(m.name)) is not None}
    except tarfile.TarError as error:
        raise ConfigError(f"{flag}: {path!r} is not a readable tar file ({error})") from error
    return len(keys)


_WEBDATASET_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these


def member_key(name: str) -> tuple[str, str] | None:
    """(sample key, lower-case extension) of a tar member as webdataset groups it, or None for a member
    webdataset skips: ``__meta__`` files, names without an extension, and names whose file part starts
    with a dot (macOS ``._*`` AppleDouble files)."""
    from webdataset.tariterators import base_plus_ext

    if ("/" not in name and name.startswith("__") and name.endswith("__")) or _WEBDATASET_META.match(name):
        return None
    key, extension = base_plus_ext(name)
    return None if key is None else (key, extension.lower())



def group_samples(files):
    """webdataset's ``group_by_keys`` (same keys, same skipped members), except that a member repeated
    within one sample marks the sample ``__duplicate__`` instead of raising and stopping the stream.

    ``files``: webdataset's ``tar_file_expander`` stream of ``{"fname", "data", "__url__"}`` dicts, with
    ``{}`` at the end of each shard.
    """
    sample = None
    for file in files:
        if not file:  # the end of a shard
            if sample:
                yield sample
            sample = None
            continue
        found = member_key(file["fname"])
        if found is None:  # skipped, as webdataset skips it (the current sample goes on)
            continue
        key, extension = found
        if sample is None or key != sample["__key__"]:
            if sample:
                yield sample
            sample = {"__key__": key, "__url__": file.get("__url__")}
        if extension in sample:
            sample["__duplicate__"] = True
            continue
        sample[extension] = file["data"]
    if sample:
        yield sample
