"""Sequential tar reading by sample index: skip members without extracting them, retry, survive truncation.

A :class:`ShardReader` streams one shard at a time through ``webdataset.gopen`` (fsspec schemes registered) and
returns the raw bytes of the requested samples only. Members of other samples are passed over at the tar header
level (``tarfile`` stream mode discards their data blocks), so skipping never decodes anything. Sample boundaries
follow webdataset's key convention (:func:`webdataset.tariterators.base_plus_ext`).
"""

from __future__ import annotations

import logging
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from webdataset.tariterators import base_plus_ext

from data.storage import DataSourceError, MissingShardError, RetryPolicy, gopen, is_transient

log = logging.getLogger(__name__)

# Errors that mean the archive itself is damaged (not the connection): the rest of the shard is unreadable.
_CORRUPT_TAR = (tarfile.TarError, EOFError, zlib.error)


@dataclass
class RawSample:
    """The undecoded members of one sample."""

    key: str
    """The sample key (member names without extension)."""
    files: dict[str, bytes]
    """Extension (lower case, e.g. ``"png"``, ``"cls"``) -> bytes."""
    url: str
    """Shard URL, for messages."""


@dataclass
class MissingSample:
    """A sample the manifest promises but the tar does not deliver (truncated or damaged shard)."""

    url: str
    """Shard URL."""
    reason: str
    """What went wrong, for the log."""


class ShardReader:
    """Reads samples by ``(shard, member index)`` from tar shards, moving forward through the stream when it can."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self.urls = list(urls)
        self.storage_options = storage_options
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self._shard: int | None = None
        self._file: IO[bytes] | None = None
        self._tar: tarfile.TarFile | None = None
        self._members: Iterator[tarfile.TarInfo] | None = None
        self._index = -1  # sample index of the last member seen
        self._key: str | None = None
        self._lookahead: tarfile.TarInfo | None = None
        self._pending: dict[str, bytes] | None = None

    def close(self) -> None:
        """Close the open shard, if any."""
        if self._tar is not None:
            try:
                self._tar.close()
            except Exception:  # a damaged stream may fail again on close; nothing left to save
                log.debug("ignoring error while closing %s", self.urls[self._shard or 0], exc_info=True)
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                log.debug("ignoring error while closing %s", self.urls[self._shard or 0], exc_info=True)
        self._shard = self._file = self._tar = self._members = None
        self._index, self._key, self._lookahead, self._pending = -1, None, None, None

    def _open(self, shard: int) -> None:
        self.close()
        url = self.urls[shard]
        try:
            self._file = gopen(url, "rb", self.storage_options)
        except FileNotFoundError as exc:
            raise MissingShardError(f"shard {url} does not exist (was it deleted or renamed?)") from exc
        self._shard = shard
        self._tar = tarfile.open(fileobj=self._file, mode="r|*")  # noqa: SIM115 - lives across read() calls
        self._members = iter(self._tar)

    def read(self, shard: int, members: Sequence[int]) -> dict[int, RawSample | MissingSample]:
        """Raw samples for the member indices ``members`` of ``shard`` (any order; read in ascending order)."""
        wanted = set(int(m) for m in members)
        out: dict[int, RawSample | MissingSample] = {}
        url = self.urls[shard]
        failures = 0
        while len(out) < len(wanted):
            todo = sorted(wanted - out.keys())
            try:
                if self._shard != shard or self._tar is None or self._index >= todo[0]:
                    self._open(shard)
                for index, key, files in self._advance(set(todo), todo[-1]):
                    out[index] = RawSample(key, files, url)
                    failures = 0  # progress resets the retry budget
                for index in todo:
                    if index not in out:
                        out[index] = MissingSample(url, f"sample {index} not in shard (fewer samples than manifest)")
            except _CORRUPT_TAR as exc:
                log.warning("shard %s is damaged (%s: %s); %d samples lost", url, type(exc).__name__, exc, len(todo))
                for index in sorted(wanted - out.keys()):
                    out[index] = MissingSample(url, f"damaged tar: {exc}")
                self.close()
            except MissingShardError:
                raise
            except Exception as exc:
                self.close()
                if not is_transient(exc):
                    raise DataSourceError(f"reading shard {url}: {type(exc).__name__}: {exc}") from exc
                failures += 1
                if failures >= self.retry.attempts:
                    raise DataSourceError(
                        f"reading shard {url} failed {failures} times in a row: {type(exc).__name__}: {exc}"
                    ) from exc
                delay = self.retry.delay(failures - 1)
                log.warning("transient error reading %s (%s); retry %d in %.2fs", url, exc, failures, delay)
                if self.on_retry is not None:
                    self.on_retry()
                time.sleep(delay)
        return out

    def _advance(self, wanted: set[int], last: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """Yield ``(index, key, files)`` for wanted samples up to ``last``; stop at the first member after it."""
        assert self._tar is not None and self._members is not None
        while True:
            info = self._lookahead if self._lookahead is not None else next(self._members, None)
            self._lookahead = None
            if info is None:  # end of the archive
                if self._pending is not None and self._key is not None:
                    yield self._index, self._key, self._pending
                self._pending = None
                return
            if not info.isreg():
                continue
            key, ext = base_plus_ext(info.name)
            if key is None or ext is None or (key.startswith("__") and key.endswith("__")):
                continue  # not a sample member (webdataset's metadata convention)
            if key != self._key:
                if self._pending is not None and self._key is not None:
                    yield self._index, self._key, self._pending
                    self._pending = None
                if self._index + 1 > last:
                    self._lookahead = info  # first member of a later sample: keep it for the next read
                    return
                self._index, self._key = self._index + 1, key
                if self._index in wanted:
                    self._pending = {}
            if self._pending is not None:
                member = self._tar.extractfile(info)
                if member is None:
                    continue
                self._pending[ext.lower()] = member.read()
