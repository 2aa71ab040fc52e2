"""URL access for shards and manifests: fsspec openers, webdataset scheme registration, retries.

Every URL (local path, ``file://``, ``s3://`` or any other fsspec protocol) is opened through fsspec. For S3 the
endpoint and credentials come from the standard AWS environment/config (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ...)
or from ``storage_options``; neither is ever logged.
"""

from __future__ import annotations

import functools
import importlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

import fsspec

log = logging.getLogger(__name__)


@functools.cache
def _wds_gopen() -> Any:
    """webdataset's ``gopen`` module, imported on first use: the package imports torch, which the launcher (it
    reads manifests through this module) does without. The package re-exports a function named ``gopen`` that
    shadows the module attribute, so the module is imported by name."""
    return importlib.import_module("webdataset.gopen")


T = TypeVar("T")

# Protocols that webdataset's gopen handles itself (plain open) or that we must never route (subprocesses).
_NOT_REGISTERED = frozenset({"", "file", "local", "pipe"})


class DataSourceError(RuntimeError):
    """A URL could not be read (unreachable endpoint or bucket, persistent I/O error); the message names the URL."""


class MissingShardError(DataSourceError):
    """A shard or manifest named by the data set does not exist at its URL."""


class ShardIntegrityError(DataSourceError):
    """A shard's size or sha256 differs from the manifest: the shard set was changed or damaged after writing."""


@dataclass(frozen=True)
class RetryPolicy:
    """How transient read errors are retried: exponential backoff with jitter, then a clear error."""

    attempts: int = 5
    """Total tries per open or read (1 = no retry)."""
    base_delay_s: float = 0.5
    """Delay before the first retry; doubles on each further retry."""
    max_delay_s: float = 20.0
    """Upper bound of a single delay."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("RetryPolicy delays must be >= 0")

    def delay(self, retry_index: int) -> float:
        """Seconds to wait before retry number ``retry_index`` (0-based), with +-25% jitter."""
        base = min(self.max_delay_s, self.base_delay_s * (2**retry_index))
        return base * (0.75 + 0.5 * random.random())


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [TimeoutError, ConnectionError]
    try:  # botocore is present with s3fs; its connection errors are not OSErrors.
        import botocore.exceptions as bexc

        types += [bexc.ConnectionError, bexc.HTTPClientError]
    except ImportError:  # pragma: no cover - s3fs not installed
        pass
    try:
        import aiohttp

        types.append(aiohttp.ClientError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


_TRANSIENT = _transient_types()
_PERMANENT_OS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying (network, timeouts, generic I/O); False for missing files or bad requests."""
    if isinstance(exc, _PERMANENT_OS):
        return False
    return isinstance(exc, (*_TRANSIENT, OSError))


def with_retries(fn: Callable[[], T], *, url: str, what: str, policy: RetryPolicy) -> T:
    """Call ``fn`` with retries on transient errors; raise a :class:`DataSourceError` naming ``url`` at the end.

    A missing object raises :class:`MissingShardError` at once: retrying cannot make it appear.
    """
    for attempt in range(policy.attempts):
        try:
            return fn()
        except _PERMANENT_OS as exc:
            if isinstance(exc, FileNotFoundError):
                raise MissingShardError(
                    f"{what}: {url} does not exist (check the URL, the bucket name and that the shards were written)"
                ) from exc
            raise DataSourceError(f"{what}: cannot read {url}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            if not is_transient(exc):
                raise DataSourceError(f"{what}: cannot read {url}: {type(exc).__name__}: {exc}") from exc
            if attempt + 1 == policy.attempts:
                raise DataSourceError(
                    f"{what}: cannot read {url} after {policy.attempts} attempts "
                    f"(endpoint or bucket unreachable?): {type(exc).__name__}: {exc}"
                ) from exc
            delay = policy.delay(attempt)
            log.warning("%s: transient error on %s (%s), retry %d in %.2fs", what, url, exc, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve ``url`` to an fsspec filesystem and the path inside it.

    s3fs's and botocore's own retry loops are turned off (one try each, unless ``storage_options`` configure
    botocore's): :func:`with_retries` and its :class:`RetryPolicy` are the one place that retries, so an endpoint
    with nothing listening fails in seconds instead of s3fs's five rounds of backoff inside each of ours (~50 s)."""
    options = dict(storage_options or {})
    s3 = urlparse(url).scheme in ("s3", "s3a")
    if s3:  # botocore's own retries: one attempt, unless the options configure them
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"max_attempts": 1})
        options["config_kwargs"] = config
    fs, path = fsspec.core.url_to_fs(url, **options)
    if s3 and hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's retry loop: a class attribute (5), not a constructor option
    return fs, path


def open_url(url: str, mode: str = "rb", storage_options: Mapping[str, Any] | None = None) -> IO[bytes]:
    """Open ``url`` through fsspec in binary ``mode`` ("rb" or "wb"); parents are created for local writes."""
    fs, path = url_to_fs(url, storage_options)
    if "w" in mode:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            # Object stores have no directories; local filesystems need them.
            fs.makedirs(parent, exist_ok=True)
    return fs.open(path, mode)


def join_url(base: str, name: str) -> str:
    """Join a directory URL and a relative name with a single slash."""
    return base.rstrip("/") + "/" + name


def parent_url(url: str) -> str:
    """The directory URL that holds ``url``."""
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """A ``webdataset.gopen`` handler that opens any fsspec URL (accepts ``storage_options=`` as keyword)."""
    del bufsize  # fsspec chooses its own block sizes per protocol
    return open_url(url, mode, kw.get("storage_options"))


def register_fsspec_schemes(protocols: list[str] | None = None) -> None:
    """Route webdataset's ``gopen`` for ``protocols`` (default: every fsspec protocol) through fsspec.

    Idempotent and cheap; call it in every process that opens shards, including dataloader workers started
    with spawn/forkserver, which do not inherit the parent's table changes.
    """
    names = protocols if protocols is not None else list(fsspec.available_protocols())
    for name in names:
        if name not in _NOT_REGISTERED:
            _wds_gopen().gopen_schemes[name] = _gopen_fsspec


def gopen(url: str, mode: str = "rb", storage_options: Mapping[str, Any] | None = None) -> IO[bytes]:
    """Open ``url`` with webdataset's gopen after making sure fsspec schemes are registered in this process."""
    scheme = urlparse(url).scheme
    if scheme not in _NOT_REGISTERED and _wds_gopen().gopen_schemes.get(scheme) is not _gopen_fsspec:
        # Also covers protocols registered with fsspec after start-up (not in available_protocols()).
        register_fsspec_schemes([*fsspec.available_protocols(), scheme])
    if scheme in ("", "file"):
        return _wds_gopen().gopen(url, mode)
    return _wds_gopen().gopen(url, mode, storage_options=storage_options)
