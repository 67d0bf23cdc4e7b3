"""Pick and build a loader: ``dali`` (``bmc_fast.dali_pipelines.dali_loader``), ``dali-stream``
(``bmc_fast.dali_pipelines.stream_loader``) or ``pil`` (``bmc_fast.data.pil_loader``).

All yield the same batch dicts. ``auto`` is DALI when it is installed. DALI's reader reads local, indexed shards:
``resolve_loader`` scans (once, under a file lock, so concurrent ranks wait for one writer) every shard that has no
index yet. Remote shards go to ``dali-stream`` instead (the PIL loader's stream, decoded by DALI), which can also be
asked for by name. Each loader's module is imported only when it is built.
"""
from __future__ import annotations

import logging

from bmc_fast.data.shard_fetch import is_remote
from bmc_fast.errors import ConfigError
from bmc_fast.optional import dali_installed

_logger = logging.getLogger(__name__)

LOADERS = ("auto", "dali", "dali-stream", "pil")  # the legal values of --loader


def resolve_loader(kind: str, urls: list[str], flag: str = "--loader") -> str:
    """``auto`` -> ``dali``, ``dali-stream`` (remote shards) or ``pil``; for ``dali``, index every shard that lacks an
    index. Logged."""
    if kind not in LOADERS:
        raise ConfigError(f"{flag} must be one of {LOADERS}, got {kind!r}")
    if kind.startswith("dali") and not dali_installed():
        raise ConfigError(f"{flag} {kind} needs NVIDIA DALI: pip install nvidia-dali-cuda130, or pass {flag} pil")
    resolved, why = kind, "as requested"
    if kind == "auto":
        resolved, why = ("dali", "DALI is installed") if dali_installed() else ("pil", "DALI is not installed")
    if resolved == "dali":
        remote = [url for url in urls if is_remote(url)]
        if remote:
            resolved, why = "dali-stream", (f"DALI's reader reads local shards only and {remote[0]!r} is remote: "
                                            "the stream reader fetches the shards and DALI decodes")
        else:
            ensure_indexes(urls)
    _logger.info("data loader: %s (requested %s: %s)", resolved, kind, why)
    return resolved


def ensure_indexes(urls: list[str]) -> None:
    """Scan every shard without a current index of ours (none, another tool's, or the shard changed since)."""
    from filelock import FileLock

    from bmc_fast.data.index import index_is_current, index_path, scan_shard

    for url in urls:
        with FileLock(str(index_path(url)) + ".lock"):
            if not index_is_current(url):
                scan = scan_shard(url)
                _logger.info("indexed %s: %d good of %d sample(s), skipped %s", url, scan.good, scan.samples,
                             dict(scan.skipped) or "none")


def build_loader(urls: list[str], *, kind: str, tokenizer, train: bool, context_length: int, image_size: int,
                 batch_size: int, workers: int = 1, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device_id: int | None = None, half: bool = False, resplit_from: list[dict] | None = None,
                 mixture=None):
    """A loader of batch dicts. ``kind``: a resolved ``dali``, ``dali-stream`` or ``pil``; ``workers``: PIL processes
    or DALI threads; ``resplit_from``: the stream's places under another cut (``pil_loader.ShardStream``; PIL and
    dali-stream); ``mixture``: weighted training sources (``bmc_fast.data.mixture``; the ``dali`` reader reads the
    run's first epoch's shard list every epoch)."""
    common = dict(context_length=context_length, image_size=image_size, batch_size=batch_size, train=train,
                  rank=rank, world_size=world_size, seed=seed)
    if kind == "dali":
        from bmc_fast.dali_pipelines.dali_loader import DaliLoader

        if train and mixture is not None:
            urls = mixture.epoch_shards(0, seed)
        return DaliLoader(urls, tokenizer, device_id=device_id, num_threads=max(workers, 1), half=half, **common)
    if kind == "dali-stream":
        from bmc_fast.dali_pipelines.stream_loader import DaliStreamLoader

        return DaliStreamLoader(urls, tokenizer, device_id=device_id, num_threads=max(workers, 1), half=half,
                                resplit_from=resplit_from, mixture=mixture, **common)
    from bmc_fast.data.pil_loader import make_loader

    return make_loader(urls, tokenizer, workers=workers, resplit_from=resplit_from, mixture=mixture, **common)
