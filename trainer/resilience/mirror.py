"""Copies of complete checkpoints on another store (``checkpoint.mirror_url``), uploaded in the background.

Rank 0 hands each complete checkpoint to :class:`MirrorUploader`, whose thread copies it while training goes on:
the files first, the ``COMPLETE`` marker (with every file's size and sha256) last, then the mirror's ``latest``
pointer, so a mirror copy without its marker is never taken for a checkpoint. The queue is bounded: when a newer
checkpoint arrives while an older one still waits, the older one is dropped (the newer one supersedes it) and
logged. At preemption or the end of the run :meth:`MirrorUploader.wait` lets the in-flight upload finish within a
deadline and reports what is not on the mirror yet.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from trainer.resilience import faults
from trainer.run_dir import LATEST, MARKER

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    """A finished upload."""

    tag: str
    """The checkpoint's directory name."""
    seconds: float
    """Wall time of the copy."""
    num_bytes: int
    """Bytes copied."""


class MirrorUploader:
    """A background thread that copies complete checkpoint directories to ``url`` (rank 0 only)."""

    def __init__(self, url: str, max_pending: int = 1) -> None:
        from data.storage import url_to_fs

        self.url = url
        self.fs, base = url_to_fs(url)
        self.base = base.rstrip("/")
        self.max_pending = max_pending
        self.done: list[Upload] = []
        """Uploads finished so far, oldest first."""
        self.failed: list[tuple[str, str]] = []
        """(tag, error) of uploads that failed; training goes on and the next checkpoint is tried."""
        self._pending: deque[Path] = deque()
        self._active: Path | None = None
        self._closed = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="checkpoint-mirror", daemon=True)
        self._thread.start()

    def submit(self, directory: Path) -> None:
        """Queue a complete checkpoint directory; never blocks."""
        with self._cv:
            self._pending.append(directory)
            while len(self._pending) > self.max_pending:
                dropped = self._pending.popleft()
                log.warning("mirror: %s superseded by %s before its upload started", dropped.name, directory.name)
            self._cv.notify_all()

    def in_use(self) -> set[str]:
        """Checkpoint names still to be read by the uploader (local retention must keep them)."""
        with self._cv:
            names = {p.name for p in self._pending}
            if self._active is not None:
                names.add(self._active.name)
            return names

    def busy(self) -> str | None:
        """The checkpoint being uploaded or waiting, if any (the newest one)."""
        with self._cv:
            if self._pending:
                return self._pending[-1].name
            return None if self._active is None else self._active.name

    def wait(self, timeout_s: float | None) -> bool:
        """Block until every queued checkpoint is on the mirror or ``timeout_s`` passed; True when all are."""
        deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        with self._cv:
            while self._pending or self._active is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(timeout=left)
            return True

    def remove(self, tags: list[str]) -> None:
        """Delete checkpoints from the mirror (a rollback abandoned them): dropped from the queue, the upload in
        flight finished first, each copy's marker deleted before its files. A mirror that cannot be reached is
        logged; its abandoned copies are skipped at a resume from the mirror anyway."""
        with self._cv:
            self._pending = deque(p for p in self._pending if p.name not in tags)
        self.wait(None)
        for tag in tags:
            try:
                remote = f"{self.base}/{tag}"
                if self.fs.exists(f"{remote}/{MARKER}"):
                    self.fs.rm(f"{remote}/{MARKER}")
                if self.fs.exists(remote):
                    self.fs.rm(remote, recursive=True)
            except Exception as exc:  # a network error must not kill training
                log.error("mirror: could not delete %s/%s: %s: %s", self.url, tag, type(exc).__name__, exc)

    def close(self) -> None:
        """Stop the thread after the current upload (queued ones are dropped)."""
        with self._cv:
            self._closed = True
            self._pending.clear()
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                self._active = self._pending.popleft()
            directory = self._active
            try:
                self.done.append(self._upload(directory))
            except Exception as exc:  # a network error must not kill training: the next checkpoint is tried
                log.error(
                    "mirror: uploading %s to %s failed: %s: %s", directory.name, self.url, type(exc).__name__, exc
                )
                self.failed.append((directory.name, f"{type(exc).__name__}: {exc}"))
            finally:
                with self._cv:
                    self._active = None
                    self._cv.notify_all()

    def _upload(self, directory: Path) -> Upload:
        started = time.perf_counter()
        remote = f"{self.base}/{directory.name}"
        files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)
        num_bytes = 0
        for file in files:
            self.fs.put_file(str(file), f"{remote}/{file.relative_to(directory).as_posix()}")
            num_bytes += file.stat().st_size
            faults.at("mirror")
        self.fs.put_file(str(directory / MARKER), f"{remote}/{MARKER}")  # last: the copy is complete
        with self.fs.open(f"{self.base}/{LATEST}", "w") as f:
            f.write(directory.name)
        seconds = time.perf_counter() - started
        log.info("checkpoint %s mirrored to %s in %.1fs (%.0f MB)", directory.name, self.url, seconds, num_bytes / 1e6)
        return Upload(directory.name, seconds, num_bytes)
