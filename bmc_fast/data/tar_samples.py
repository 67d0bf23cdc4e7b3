"""The one reader of WebDataset tars: members grouped into samples exactly as webdataset groups them.

A sample is the run of consecutive members that share a key (the name up to the first dot of its last
path part): ``{"__key__": key, "__url__": shard, "<ext>": payload, ..., "__members__": [...]}`` with
lower-case extensions. Skipped as webdataset skips them: directories and links, ``__meta__`` files, names
without an extension, and names whose last part starts with a dot (macOS ``._*`` files). One change from
webdataset: a member repeated within a sample marks it ``__duplicate__`` (a skip kind) instead of raising
and ending the stream.

- ``read_tar_samples(path)``: samples of a local tar, each member's data offset and size kept for DALI's
  index; ``read=False`` reads headers only (for counting).
- ``wds_tar_samples(shards)``: the same grouping over webdataset's own tar iterator, from shards opened by
  webdataset (``{"url"}``) or by ``bmc_fast.data.shard_fetch`` (``{"url", "stream"}``); a stage of the PIL loader.
"""
from __future__ import annotations

import itertools
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from bmc_fast.errors import ConfigError

_WEBDATASET_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def member_key(name: str) -> tuple[str, str] | None:
    """(sample key, lower-case extension) of a tar member as webdataset groups it, or None for a member
    webdataset skips: ``__meta__`` files, names without an extension, names whose last part starts with
    a dot. (webdataset's own ``base_plus_ext`` is not imported: ``import webdataset`` imports torch.)"""
    if ("/" not in name and name.startswith("__") and name.endswith("__")) or _WEBDATASET_META.match(name):
        return None
    match = _BASE_PLUS_EXT.match(name)
    return None if match is None else (match.group(1), match.group(2).lower())


def group_samples(files: Iterable[dict]) -> Iterator[dict]:
    """webdataset's ``group_by_keys`` (same keys, same skipped members), except that a member repeated
    within one sample marks the sample ``__duplicate__`` instead of raising and stopping the stream.

    ``files``: ``{"fname", "data", "__url__", ...}`` dicts in tar order, ``{}`` at the end of each shard
    (webdataset's ``tar_file_expander`` stream, or ``tar_members``). Every kept member's dict is listed
    in the sample's ``__members__``, the repeated one included.
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
            sample = {"__key__": key, "__url__": file.get("__url__"), "__members__": []}
        sample["__members__"].append(file)
        if extension in sample:
            sample["__duplicate__"] = True
            continue
        sample[extension] = file["data"]
    if sample:
        yield sample


def tar_members(path: str | Path, *, read: bool = True, plain: bool = False, flag: str = "shard") -> Iterator[dict]:
    """Regular members of the local tar ``path`` as ``group_samples`` takes them, with ``offset`` (of the
    member's data) and ``size``; ``data`` is None unless ``read``. ``plain``: refuse a compressed tar
    (DALI's reader cannot read one). An unreadable file is a ``ConfigError`` naming ``flag``."""
    try:
        tar = tarfile.open(path, "r:" if plain else "r:*")
    except tarfile.TarError as error:
        if plain:
            raise ConfigError(f"{flag}: {str(path)!r} is not a plain tar file ({error}): WebDataset shards for DALI "
                              "are uncompressed tar archives (tar cf shard.tar KEY.jpg KEY.txt ...): decompress it, "
                              "or use --loader pil") from error
        raise ConfigError(f"{flag}: {str(path)!r} is not a readable tar file ({error})") from error
    with tar:
        try:
            for member in tar:
                if member.isfile():
                    yield {"fname": member.name, "data": tar.extractfile(member).read() if read else None,
                           "__url__": str(path), "offset": member.offset_data, "size": member.size}
        except tarfile.TarError as error:
            raise ConfigError(f"{flag}: {str(path)!r} is not a readable tar file ({error})") from error
    yield {}


def read_tar_samples(path: str | Path, *, read: bool = True, plain: bool = False,
                     flag: str = "shard") -> Iterator[dict]:
    """The samples of the local tar ``path`` (see ``group_samples``, ``tar_members``)."""
    return group_samples(tar_members(path, read=read, plain=plain, flag=flag))


def wds_tar_samples(shards: Iterable[dict]) -> Iterator[dict]:
    """Shard dicts -> samples, as ``wds.tarfile_to_samples`` but grouped by ``group_samples`` (a repeated member
    skips one sample, not the run). ``{"url"}`` is opened by webdataset's ``gopen``; ``{"url", "stream"}`` is read
    from the open stream."""
    from webdataset.tariterators import tar_file_expander, url_opener

    shards = iter(shards)
    first = next(shards, None)
    if first is None:
        return iter(())
    shards = itertools.chain([first], shards)
    return group_samples(tar_file_expander(shards if "stream" in first else url_opener(shards)))
