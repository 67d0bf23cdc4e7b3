"""Scan WebDataset shards once; write DALI index files that list only good samples.

    python -m bmc_fast.data.index 'DIR/shard-{000000..000009}.tar' [--report REPORT.json]

Members are grouped into samples exactly as webdataset groups them (``bmc_fast.data.tar_samples``). Every
sample is checked as the loaders would use it (``bmc_fast.data.samples.check_sample``: one JPEG, PNG
or WebP image that fully decodes, a non-empty UTF-8 caption) and, when DALI is installed, its image is
also decoded by DALI's own CPU decoder, so the index never lists one that would stop a DALI run.
Beside each ``shard.tar`` it writes

    shard.idx        DALI's webdataset index (the ``wds2idx`` format, v1.2) of the good samples only,
                     so ``fn.readers.webdataset`` never meets a bad one
    shard.scan.json  {"samples", "good", "skipped": {kind: count}, "shard_bytes"} of that scan; an
                     index without a matching scan (e.g. one DALI's wds2idx wrote, which lists bad
                     samples too) is not trusted

and the report (default ``index_report.json`` beside the first shard) sums them. Index format, one
line per sample after the header ``v1.2 <samples>``: ``<ext> <data offset> <size> <member name>`` for
each of the sample's members.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bmc_fast.cli import ArgumentParser, check_output_file, run_main
from bmc_fast.data.samples import IMAGE_EXTENSIONS, SKIP_KINDS, SampleError, check_sample
from bmc_fast.data.shards import expand_shards
from bmc_fast.data.tar_samples import member_key, read_tar_samples, tar_members
from bmc_fast.errors import ConfigError
from bmc_fast.optional import dali_installed

_logger = logging.getLogger(__name__)

INDEX_VERSION = "v1.2"


@dataclass
class ShardScan:
    shard: str
    samples: int = 0
    good: int = 0
    skipped: Counter = field(default_factory=Counter)
    dali_checked: bool = False  # every good image was also decoded by DALI's CPU decoder

    def to_dict(self) -> dict:
        return {"shard": self.shard, "samples": self.samples, "good": self.good,
                "skipped": {kind: self.skipped[kind] for kind in SKIP_KINDS if self.skipped[kind]},
                "shard_bytes": Path(self.shard).stat().st_size, "dali_checked": self.dali_checked}


def _stem(shard: Path) -> str:
    """The shard's name without its final ``.tar`` only: ``biomedica.v1-000000.tar`` keeps its dots."""
    return shard.name[:-len(".tar")] if shard.name.endswith(".tar") else shard.name


def index_path(shard: str | Path) -> Path:
    """``dir/name.tar`` -> ``dir/name.idx`` (wds2idx's default name)."""
    return Path(shard).with_name(_stem(Path(shard)) + ".idx")


def scan_path(shard: str | Path) -> Path:
    return Path(shard).with_name(_stem(Path(shard)) + ".scan.json")


def index_is_current(shard: str | Path) -> bool:
    """Whether ``shard`` has an index from our scan of the shard as it is now (its scan records its size)
    that DALI's decoder also checked, unless DALI is not installed here."""
    if not index_path(shard).is_file() or not scan_path(shard).is_file():
        return False
    try:
        scan = json.loads(scan_path(shard).read_text())
        recorded, dali_checked = scan.get("shard_bytes"), scan.get("dali_checked", False)
    except (ValueError, AttributeError):
        return False
    return recorded == Path(shard).stat().st_size and (dali_checked or not dali_installed())


def check_members(sample: dict, dali_check=None) -> None:
    """Raise ``SampleError`` unless the grouped sample makes one good (image, caption) pair."""
    image, _ = check_sample(sample)
    image.close()
    if dali_check is not None:  # PIL read it; would DALI's decoder, which the index serves?
        encoded = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
        if (error := dali_check(encoded)) is not None:
            raise SampleError("truncated_image", f"DALI's decoder: {error}")


def scan_shard(shard: str | Path, progress=None, dali_check=None) -> ShardScan:
    """Check every sample of ``shard``; write its ``.idx`` (good samples) and ``.scan.json``.

    ``dali_check``: bytes -> error text or None (``DaliDecodeCheck``); made here when DALI is installed.
    """
    if dali_check is None:
        dali_check = _dali_check()
    scan, lines = ShardScan(str(shard), dali_checked=dali_check is not None), []
    if dali_check is None:
        _logger.warning("%s: DALI is not installed, so images are checked with PIL only; the DALI loader "
                        "rescans the shard once DALI is installed", shard)
    for sample in read_tar_samples(shard, plain=True, flag="index scan"):  # DALI reads plain tars only
        scan.samples += 1
        try:
            check_members(sample, dali_check)
        except SampleError as error:
            scan.skipped[error.kind] += 1
            _logger.debug("%s: skipping %s (%s)", shard, sample["__key__"], error)
        else:
            scan.good += 1
            lines.append(" ".join(f"{member_key(m['fname'])[1]} {m['offset']} {m['size']} {m['fname']}"
                                  for m in sample["__members__"]))
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

    scans, dali_check = [], _dali_check()
    with tqdm(desc="scan", unit="sample") as progress:
        for url in urls:
            scans.append(scan_shard(url, progress, dali_check))
    totals = sum((s.skipped for s in scans), Counter())
    result = {"shards": [s.to_dict() for s in scans], "samples": sum(s.samples for s in scans),
              "good": sum(s.good for s in scans), "skipped": {k: totals[k] for k in SKIP_KINDS if totals[k]}}
    if report is not None:
        Path(report).write_text(json.dumps(result, indent=2))
    return result


def read_index(shard: str | Path) -> list[list[tuple[str, int, int, str]]]:
    """Parse the shard's index (``index_path``) and check it against the shard's tar headers.

    Raises ``ConfigError`` naming both files when the index is missing, was not written by our scan of
    this shard as it is now, is not a v1.2 index, or does not describe this shard.
    """
    index = index_path(shard)
    rebuild = f"rebuild it with python -m bmc_fast.data.index {shard}"

    def mismatch(why: str) -> ConfigError:
        return ConfigError(f"index {str(index)!r} does not match shard {str(shard)!r}: {why}; {rebuild}")

    if not index.is_file():
        raise ConfigError(f"shard {str(shard)!r} has no index {str(index)!r}: build it with "
                          f"python -m bmc_fast.data.index {shard}")
    if not index_is_current(shard):
        raise mismatch(f"no scan of the shard as it is now ({str(scan_path(shard))!r} is missing or records "
                       "another size), so bad samples may be listed (e.g. an index from DALI's wds2idx)")
    header, *rows = index.read_text().splitlines() or [""]
    parts = header.split()
    if len(parts) != 2 or parts[0] != INDEX_VERSION or not parts[1].isdigit() or int(parts[1]) != len(rows):
        raise mismatch(f"header {header!r} is not '{INDEX_VERSION} <samples>' for its {len(rows)} sample line(s)")
    # headers only: offset of each member's data -> (name, size)
    members = {m["offset"]: (m["fname"], m["size"]) for m in tar_members(shard, read=False, plain=True) if m}
    samples = []
    for line_no, row in enumerate(rows, start=2):
        fields = row.split(" ")
        if len(fields) % 4 or not all(f.isdigit() for f in fields[1::4] + fields[2::4]):
            raise mismatch(f"line {line_no} is not '<ext> <offset> <size> <name>' groups")
        components = []
        for ext, offset, size, name in zip(*[iter(fields)] * 4):
            offset, size = int(offset), int(size)
            held = members.get(offset)
            if held != (name, size):
                found = f"{held[0]!r} ({held[1]} bytes)" if held else "no member"
                raise mismatch(f"line {line_no}: at offset {offset} the tar holds {found} where the index says "
                               f"{name!r} ({size} bytes)")
            components.append((ext, offset, size, name))
        samples.append(components)
    return samples


def index_skips(shards: list[str]) -> dict[str, int]:
    """Skip counts by kind that the index scan recorded for ``shards`` (what the DALI loader never meets)."""
    total = Counter()
    for shard in shards:  # every DALI shard has its scan: read_index refuses one without
        total.update(json.loads(scan_path(shard).read_text())["skipped"])
    return {kind: total[kind] for kind in SKIP_KINDS if total[kind]}


def _dali_check():
    """DALI's CPU decoder as a check, or None when DALI is not installed."""
    if not dali_installed():
        return None
    from bmc_fast.dali_pipelines.decode_check import DaliDecodeCheck

    return DaliDecodeCheck()


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", help="WebDataset shard pattern (brace notation, glob, '::'-joined)")
    parser.add_argument("--report", help="summary JSON (default: index_report.json beside the first shard)")
    args = parser.parse_args(argv)
    if args.report is not None:
        check_output_file(args.report, "--report", example_name="index_report.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    urls = expand_shards(args.shards, "shards")
    report = args.report or Path(urls[0]).parent / "index_report.json"
    result = build_indexes(urls, report)
    _logger.info("%d shard(s): %d sample(s), %d good, skipped %s; report %s", len(urls), result["samples"],
                 result["good"], result["skipped"] or "none", report)
    return result


if __name__ == "__main__":
    run_main(main)
