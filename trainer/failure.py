"""How a failing rank ends: its error recorded in the run directory, then a prompt, non-blocking exit.

Every rank that raises writes ``<run_dir>/failures/rank_00001.txt`` (one summary line, then the stack) and exits
with :data:`FAILURE_EXIT_CODE` through ``os._exit``: the interpreter's exit handlers would join dataloader workers
and collectives of peers that may never answer, so a failed rank must not wait for anything. The launcher
(local or SLURM) reads these files to say which rank failed and why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path

log = logging.getLogger(__name__)

FAILURE_EXIT_CODE = 1
HANG_EXIT_CODE = 124  # like timeout(1): the step watchdog ended a rank that stopped making progress
FAILURES = "failures"


def failure_path(run_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` records why it failed."""
    return run_dir / FAILURES / f"rank_{rank:05d}.txt"


def record_failure(run_dir: Path, rank: int, summary: str, details: str) -> Path:
    """Write a rank's failure (first line: ``summary``) and log it; never raises."""
    path = failure_path(run_dir, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{summary}\nhost {socket.gethostname()} pid {os.getpid()} at {time.ctime()}\n\n{details}")
    except OSError as err:  # the run directory itself may be what failed
        log.error("could not record the failure in %s: %s", path, err)
    log.error("rank %d failed: %s (details in %s)", rank, summary, path)
    return path


def record_exception(run_dir: Path, rank: int, err: BaseException) -> Path:
    """Record an exception with its stack."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    # An error raised in a dataloader worker arrives as "Caught X in DataLoader worker process N. Original
    # Traceback ...": its last line is the worker's own message.
    message = lines[-1].strip() if lines and lines[0].startswith("Caught ") else (lines[0] if lines else "")
    summary = message if message.startswith(type(err).__module__) else f"{type(err).__name__}: {message}"
    details = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    sys.stderr.write(details)
    return record_failure(run_dir, rank, summary, details)


def failures_since(run_dir: Path, since: float) -> dict[int, str]:
    """``rank -> summary line`` of the failures recorded at or after ``since`` (a ``time.time()``)."""
    found = {}
    for path in sorted((run_dir / FAILURES).glob("rank_*.txt")):
        try:
            if path.stat().st_mtime >= since - 1:
                found[int(path.stem.removeprefix("rank_"))] = path.read_text().split("\n", 1)[0]
        except (OSError, ValueError):
            continue
    return found


def hard_exit(code: int) -> None:
    """Flush logs and streams, then leave without running exit handlers (they can block on dead peers)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
