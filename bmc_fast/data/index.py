"""Scan WebDataset shards once; write DALI index files that list only good samples.

    python -m bmc_fast.data.index 'DIR/shard-{000000..000009}.tar' [--report REPORT.json]

Every sample is checked as the loaders would use it (``bmc_fast.data.samples.check_sample``: one
image that fully decodes, a non-empty UTF-8 caption). Beside each ``shard.tar`` it writes

    shard.idx        DALI's webdataset index (the ``wds2idx`` format, v1.2) of the good samples only,
                     so ``fn.readers.webdataset`` never meets a bad one
    shard.scan.json  {"samples", "good", "skipped": {kind: count}, "shard_bytes"} of that scan

and the report (default ``index_report.json`` beside the first shard) sums them. Index format, one
line per sample after the header ``v1.2 <samples>``: ``<ext> <data offset> <size> <member name>`` for
each of the sample's members.
"""
from __future__ import annotations

import argparse
import json
import logging
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bmc_fast.config import ConfigError
from bmc_fast.data.samples import SKIP_KINDS, SampleError, check_sample
from bmc_fast.data.shards import expand_shards, sample_key

_logger = logging.getLogger(__name__)

INDEX_VERSION = "v1.2"
_TAR_BLOCK = 512


@dataclass
class ShardScan:
    shard: str
    samples: int = 0
    good: int = 0
    skipped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {"shard": self.shard, "samples": self.samples, "good": self.good,
                "skipped": {kind: self.skipped[kind] for kind in SKIP_KINDS if self.skipped[kind]},
                "shard_bytes": Path(self.shard).stat().st_size}


def index_path(shard: str | Path) -> Path:
    """``dir/name.tar`` -> ``dir/name.idx`` (wds2idx's default name)."""
    shard = Path(shard)
    return shard.with_name(shard.name.split(".", 1)[0] + ".idx")


def scan_path(shard: str | Path) -> Path:
    shard = Path(shard)
    return shard.with_name(shard.name.split(".", 1)[0] + ".scan.json")


def iter_members(shard: str | Path):
    """Yield (key, [(extension, data offset, size, member name, bytes)]) per sample, in tar order."""
    try:
        tar = tarfile.open(shard)
    except tarfile.TarError as error:
        raise ConfigError(f"{str(shard)!r} is not a readable tar file ({error}): WebDataset shards are plain tar "
                          "archives (tar cf shard.tar KEY.jpg KEY.txt ...)") from error
    key, members = None, []
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key = sample_key(member.name)
            if member_key != key and members:
                yield key, members
                members = []
            key = member_key
            extension = member.name.rpartition("/")[2].split(".", 1)[1] if "." in member.name else ""
            members.append((extension, member.offset_data, member.size, member.name,
                            tar.extractfile(member).read()))
    if members:
        yield key, members


def scan_shard(shard: str | Path, progress=None) -> ShardScan:
    """Check every sample of ``shard``; write its ``.idx`` (good samples) and ``.scan.json``."""
    scan, lines = ShardScan(str(shard)), []
    for _, members in iter_members(shard):
        scan.samples += 1
        try:
            check_sample({ext: data for ext, _, _, _, data in members})
        except SampleError as error:
            scan.skipped[error.kind] += 1
            _logger.debug("%s: skipping %s (%s)", shard, members[0][3], error)
        else:
            scan.good += 1
            lines.append(" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name, _ in members))
        if progress is not None:
            progress.update(1)
    if scan.good == 0:
        raise ConfigError(f"{str(shard)!r} holds no usable sample ({dict(scan.skipped)}): remove it from the "
                          "shard list")
    index_path(shard).write_text(f"{INDEX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n")
    scan_path(shard).write_text(json.dumps(scan.to_dict(), indent=2))
    return scan


def build_indexes(urls: list[str], report: str | Path | None = None) -> dict:
    """Scan every shard (progress bar); return and optionally write the summed report."""
    from tqdm import tqdm

    scans = []
    with tqdm(desc="scan", unit="sample") as progress:
        for url in urls:
            scans.append(scan_shard(url, progress))
    totals = sum((s.skipped for s in scans), Counter())
    result = {"shards": [s.to_dict() for s in scans], "samples": sum(s.samples for s in scans),
              "good": sum(s.good for s in scans), "skipped": {k: totals[k] for k in SKIP_KINDS if totals[k]}}
    if report is not None:
        Path(report).write_text(json.dumps(result, indent=2))
    return result


def read_index(shard: str | Path, index: str | Path | None = None) -> list[list[tuple[str, int, int, str]]]:
    """Parse ``index`` (default ``index_path(shard)``) and check it against the shard's tar headers.

    Raises ``ConfigError`` naming both files when the index is not a v1.2 index or does not describe
    this shard (another shard's index, or the shard was rewritten after indexing).
    """
    index = Path(index) if index is not None else index_path(shard)

    def mismatch(why: str) -> ConfigError:
        return ConfigError(f"index {str(index)!r} does not match shard {str(shard)!r}: {why}; rebuild it with "
                           f"python -m bmc_fast.data.index {shard}")

    if not index.is_file():
        raise ConfigError(f"shard {str(shard)!r} has no index {str(index)!r}: build it with "
                          f"python -m bmc_fast.data.index {shard}")
    header, *rows = index.read_text().splitlines()
    parts = header.split()
    if len(parts) != 2 or parts[0] != INDEX_VERSION or not parts[1].isdigit() or int(parts[1]) != len(rows):
        raise mismatch(f"header {header!r} is not '{INDEX_VERSION} <samples>' for its {len(rows)} sample line(s)")
    samples = []
    shard_bytes = Path(shard).stat().st_size
    with open(shard, "rb") as tar:
        for line_no, row in enumerate(rows, start=2):
            fields = row.split(" ")
            if not fields or len(fields) % 4:
                raise mismatch(f"line {line_no} is not '<ext> <offset> <size> <name>' groups")
            components = []
            for ext, offset, size, name in zip(*[iter(fields)] * 4):
                offset, size = int(offset), int(size)
                if offset < _TAR_BLOCK or offset + size > shard_bytes:
                    raise mismatch(f"line {line_no}: {name} at {offset}+{size} lies outside the shard")
                tar.seek(offset - _TAR_BLOCK)
                member = tarfile.TarInfo.frombuf(tar.read(_TAR_BLOCK), tarfile.ENCODING, "surrogateescape")
                if member.name != name or member.size != size:
                    raise mismatch(f"line {line_no}: the tar holds {member.name!r} ({member.size} bytes) where "
                                   f"the index says {name!r} ({size} bytes)")
                components.append((ext, offset, size, name))
            samples.append(components)
    return samples


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", help="WebDataset shard pattern (brace notation, glob, '::'-joined)")
    parser.add_argument("--report", help="summary JSON (default: index_report.json beside the first shard)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    urls = expand_shards(args.shards, "shards")
    report = args.report or Path(urls[0]).parent / "index_report.json"
    result = build_indexes(urls, report)
    _logger.info("%d shard(s): %d sample(s), %d good, skipped %s; report %s", len(urls), result["samples"],
                 result["good"], result["skipped"] or "none", report)
    return result


if __name__ == "__main__":
    main()
