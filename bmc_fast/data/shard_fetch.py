"""Remote shards: fetched whole, ahead of the reader, into a bounded local cache; retried; never hung.

Where a shard URL leads (``fetch_once``):

- ``http(s)://``: read with a timeout. A URL on the Hugging Face endpoint (``HF_ENDPOINT``, default
  https://huggingface.co) carries the user's token (``huggingface_hub.get_token``: ``HF_TOKEN`` or ``hf auth
  login``), which gated sets such as BIOMEDICA need.
- ``hf://datasets/ORG/NAME[@REV]/PATH``: resolved as webdataset's ``gopen`` resolves it (``HfFileSystem.resolve_path``,
  which asks the Hub's repo-info API at ``HF_ENDPOINT``; then ``hf_hub_url``), then fetched as above, with the token.
- ``s3://BUCKET/KEY``: ``aws s3 cp s3://BUCKET/KEY -`` (the AWS CLI, with the credentials it is set up with);
  webdataset has no s3 handler and fsspec's s3fs is one more dependency.
- ``pipe:CMD``: the command's standard output (webdataset's convention); it fails when it exits non-zero or
  writes nothing for ``timeout_s``.

``fetched(urls, policy, ...)`` yields ``{"url", "stream"}`` for webdataset's ``tar_file_expander`` in order. Local
paths are opened in place. A remote shard is copied whole into the cache by a background thread, up to
``policy.ahead`` shards before the reader needs them, and deleted as soon as the reader moves to the next shard:
at most ``ahead + 1`` copies exist per reader, and the reader's cache folder is removed when it stops (or, after a
kill, by the next reader that finds its process gone). A whole copy means a remote shard gives the samples of
the local file, byte for byte, and the resumed stream re-reads it as it would a local one.

Failures: a failed attempt (refused or reset connection, timeout, HTTP 408/425/429/5xx, a short body, a pipe
that exits non-zero) is retried after ``backoff_s``, then twice that, and so on, ``policy.retries`` times; other
HTTP errors (401, 403, 404) are not retried. A shard that still fails is skipped: it is counted under
``unreachable_shard`` (a count of shards, beside the sample skip kinds) and logged with its error. When
``policy.give_up_after`` shards in a row fail (counted across epochs, ``FetchTally``), ``DataError`` names the last
one and why: a server that went away ends the run with one clear error instead of a stream that skips forever.
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path

from bmc_fast.errors import DataError

_logger = logging.getLogger(__name__)

REMOTE_PREFIXES = ("pipe:", "s3://", "hf://", "http://", "https://")
SHARD_SKIP = "unreachable_shard"  # the skip count of shards that could not be fetched
CACHE_ENV = "BMC_FAST_SHARD_CACHE"  # the folder readers' caches are made in (default: the system's temp folder)
_RETRIED_HTTP = {408, 425, 429}  # and every 5xx


@dataclass(frozen=True)
class FetchPolicy:
    """How remote shards are fetched (``fetched``)."""

    ahead: int = 2  # shards fetched before the reader needs them (the cache holds at most ahead + 1)
    retries: int = 3  # further attempts after a transient failure
    backoff_s: float = 1.0  # the first wait before a retry; it doubles with each
    timeout_s: float = 60.0  # to connect, and between two reads of the body (not the whole download)
    give_up_after: int = 8  # shards failing in a row that stop the stream with DataError

    def __post_init__(self):
        for name in ("ahead", "give_up_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"FetchPolicy.{name} must be >= 1, got {getattr(self, name)}")
        if self.retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError(f"FetchPolicy needs retries >= 0, backoff_s >= 0, timeout_s > 0; got {self}")


class FetchError(Exception):
    """One failed attempt; ``transient``: worth retrying."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def hub_headers(url: str) -> dict[str, str]:
    """The Authorization header for a URL on the Hugging Face endpoint when the user has a token; else none."""
    from huggingface_hub import constants, get_token

    host = urllib.parse.urlsplit(url).netloc
    if host not in {urllib.parse.urlsplit(constants.ENDPOINT).netloc, "huggingface.co"}:
        return {}
    token = get_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def resolve_hf(url: str) -> str:
    """``hf://datasets/ORG/NAME[@REV]/PATH`` -> its resolve URL on ``HF_ENDPOINT`` (one repo-info call per repo)."""
    from huggingface_hub import HfFileSystem, constants, hf_hub_url

    try:
        path = HfFileSystem(endpoint=constants.ENDPOINT).resolve_path(url)
    except (FileNotFoundError, ValueError, NotImplementedError) as error:
        raise FetchError(f"{url} does not resolve on {constants.ENDPOINT}: {error}", transient=False) from error
    except OSError as error:
        raise FetchError(f"{url}: the Hub's repo info could not be read ({error})", transient=True) from error
    return hf_hub_url(path.repo_id, path.path_in_repo, repo_type=path.repo_type, revision=path.revision,
                      endpoint=constants.ENDPOINT)


def fetch_once(url: str, dest: Path, timeout_s: float) -> None:
    """One attempt to copy the shard ``url`` to ``dest``; ``FetchError`` when it fails."""
    if url.startswith("hf://"):
        url = resolve_hf(url)
    if url.startswith(("http://", "https://")):
        _fetch_http(url, dest, timeout_s)
    elif url.startswith("s3://"):
        _fetch_pipe(f"aws s3 cp {shlex.quote(url)} -", dest, timeout_s)
    elif url.startswith("pipe:"):
        _fetch_pipe(url[len("pipe:"):], dest, timeout_s)
    else:
        raise FetchError(f"{url}: not a remote shard URL (one of {REMOTE_PREFIXES})", transient=False)


def _fetch_http(url: str, dest: Path, timeout_s: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "bmc-fast"})
    for key, value in hub_headers(url).items():  # not sent on to where the Hub redirects (its CDN's signed URLs)
        request.add_unredirected_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response, open(dest, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
            expected, got = response.headers.get("Content-Length"), out.tell()
        if expected is not None and int(expected) != got:
            raise FetchError(f"{url}: the body ended after {got} of {expected} bytes", transient=True)
    except urllib.error.HTTPError as error:
        hint = " (a gated set: accept its terms on the Hub, then set HF_TOKEN)" if error.code in (401, 403) else ""
        raise FetchError(f"{url}: HTTP {error.code} {error.reason}{hint}",
                         transient=error.code in _RETRIED_HTTP or error.code >= 500) from error
    except (urllib.error.URLError, OSError, HTTPException) as error:  # refused, reset, timed out, cut short
        raise FetchError(f"{url}: {getattr(error, 'reason', None) or error}", transient=True) from error


def _fetch_pipe(command: str, dest: Path, timeout_s: float) -> None:
    """``command``'s stdout into ``dest``; it fails on a non-zero exit or when no byte comes for ``timeout_s``."""
    with open(dest, "wb") as out:
        proc = subprocess.Popen(command, shell=True, stdout=out, stderr=subprocess.PIPE)
        size, last_progress = 0, time.monotonic()
        while proc.poll() is None:
            time.sleep(0.05)
            if dest.stat().st_size != size:
                size, last_progress = dest.stat().st_size, time.monotonic()
            elif time.monotonic() - last_progress > timeout_s:
                proc.kill()
                proc.wait()
                raise FetchError(f"pipe:{command}: no output for {timeout_s:g} s", transient=True)
        stderr = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
    if proc.returncode != 0:
        raise FetchError(f"pipe:{command}: exit {proc.returncode}: {stderr[-300:]}", transient=True)


def fetch_with_retries(url: str, dest: Path, policy: FetchPolicy) -> str | None:
    """Copy ``url`` to ``dest`` (retried as ``policy`` says); the last error's message if every attempt failed."""
    for attempt in range(policy.retries + 1):
        try:
            fetch_once(url, dest, policy.timeout_s)
            return None
        except FetchError as error:
            dest.unlink(missing_ok=True)
            if not error.transient or attempt == policy.retries:
                return str(error)
            wait = policy.backoff_s * 2 ** attempt
            _logger.info("fetching %s failed (%s); retry %d of %d in %.3g s", url, error, attempt + 1,
                         policy.retries, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


class ShardCache:
    """One reader's cache folder: ``<root>/<pid>-<random>``; ``close`` removes it. Folders of processes that are
    gone (a killed run) are removed when the next cache is made under the same root."""

    def __init__(self, root: str | None = None):
        base = Path(root or os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "bmc_fast_shards")
        base.mkdir(parents=True, exist_ok=True)
        _remove_orphans(base)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base))
        self._count = 0

    def slot(self, url: str) -> Path:
        self._count += 1
        return self.dir / f"{self._count:06d}-{Path(urllib.parse.urlsplit(url).path).name or 'shard'}"

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _remove_orphans(base: Path) -> None:
    for folder in base.iterdir():
        pid = folder.name.split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


@dataclass
class FetchTally:
    """What one reader's fetches came to, across its calls of ``fetched`` (one per epoch): the shards skipped, and
    the failures in a row so far (a reader with fewer shards an epoch than ``give_up_after`` still gives up)."""

    skipped: Counter = field(default_factory=Counter)  # {SHARD_SKIP: shards}
    failed_in_a_row: int = 0


def fetched(urls: Iterable[str], policy: FetchPolicy, tally: FetchTally,
            cache_root: str | None = None) -> Iterator[dict]:
    """``{"url", "stream"}`` of each shard in order (see the module docstring); unreachable shards are left out and
    counted in ``tally``. The stream of a remote shard is its local copy, deleted once read."""
    urls = list(urls)
    if not any(map(is_remote, urls)):
        for url in urls:
            with open(url, "rb") as stream:
                yield {"url": url, "stream": stream}
        return
    cache = ShardCache(cache_root)
    pool = ThreadPoolExecutor(max_workers=policy.ahead, thread_name_prefix="shard-fetch")
    pending: list[tuple[str, Path | None, Future | None]] = []
    queued = iter(urls)

    def queue_next() -> None:
        url = next(queued, None)
        if url is None:
            return
        if is_remote(url):
            dest = cache.slot(url)
            pending.append((url, dest, pool.submit(fetch_with_retries, url, dest, policy)))
        else:
            pending.append((url, None, None))

    try:
        for _ in range(policy.ahead):
            queue_next()
        while pending:
            url, dest, future = pending.pop(0)
            queue_next()
            error = future.result() if future is not None else None
            if error is not None:
                tally.skipped[SHARD_SKIP] += 1
                tally.failed_in_a_row += 1
                _logger.warning("skipping shard %s: %s", url, error)
                if tally.failed_in_a_row >= policy.give_up_after:
                    raise DataError(f"{tally.failed_in_a_row} shards in a row could not be fetched; the last, {url}: "
                                    f"{error}. Check the URL and the network (or the server), then resume the run")
                continue
            tally.failed_in_a_row = 0
            try:
                with open(dest or url, "rb") as stream:
                    yield {"url": url, "stream": stream}
            finally:
                if dest is not None:
                    dest.unlink(missing_ok=True)
    finally:
        for _, _, future in pending:
            if future is not None:
                future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)  # a fetch under way ends by its own timeout
        cache.close()
