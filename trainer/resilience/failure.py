"""How a process of a run ends: a failing rank's error recorded in the run directory, then a prompt, non-blocking
exit; a finished rank or launcher without the interpreter's teardown.

Every rank that raises writes ``<run_dir>/failures/rank_00001.txt`` (one summary line, then the stack) and exits
with :data:`FAILURE_EXIT_CODE` through ``os._exit``: the interpreter's exit handlers would join dataloader workers
and collectives of peers that may never answer, so a failed rank must not wait for anything. The launcher
(local or SLURM) reads these files to say which rank failed and why. A rank or local launcher that finished leaves
the same way once its threads are done (:func:`leave`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
import traceback
from collections.abc import Collection, Iterator
from pathlib import Path

from trainer.run_dir import RunDir

log = logging.getLogger(__name__)

FAILURE_EXIT_CODE = 1
HANG_EXIT_CODE = 124  # like timeout(1): the step watchdog ended a rank that stopped making progress


class TrainingError(RuntimeError):
    """Training cannot continue (too many non-finite steps in a row, a run that keeps spiking); the message says
    why and which setting to change."""


class DiskFullError(OSError):
    """A write ran out of space; the message names the directory, the bytes needed and what was kept."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


def disk_full(err: BaseException, path: Path, margin_bytes: int = 1 << 20) -> bool:
    """Whether ``err`` (or its cause) is a write that ran out of space on ``path``'s file system: ENOSPC, or an
    error of a writer that hides the errno (torch's "file write failed") while less than ``margin_bytes`` are
    free there."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(path).free < margin_bytes
    except OSError:
        return False


@contextlib.contextmanager
def export_space(out_dir: Path, num_params: int) -> Iterator[None]:
    """An export that runs out of space fails with what it needs and what was kept (the writers remove their
    partial files; the run's checkpoint is intact and a re-run redoes the export)."""
    try:
        yield
    except Exception as err:
        if not disk_full(err, out_dir.parent):
            raise
        raise DiskFullError(
            f"no space left on the device of {out_dir} while exporting the weights (about {num_params * 4 / 1e6:.0f} "
            "MB per fp32 copy; partial files removed). Free space there and re-run the same command: the run's last "
            "checkpoint is intact and the export is redone from it."
        ) from err


def failure_path(run_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` records why it failed."""
    return RunDir(run_dir).failures / f"rank_{rank:05d}.txt"


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
    for path in sorted(RunDir(run_dir).failures.glob("rank_*.txt")):
        try:
            if path.stat().st_mtime >= since - 1:
                found[int(path.stem.removeprefix("rank_"))] = path.read_text().split("\n", 1)[0]
        except (OSError, ValueError):
            continue
    return found


_PEER_LOST = re.compile(
    r"Connection (reset|closed) by peer|Broken pipe|Socket Timeout|Connection refused|DistNetworkError|"
    r"DistBackendError|NCCL communicator was aborted|ProcessGroup.*(abort|timed out)",
    re.IGNORECASE,
)
"""How a rank's error reads when the cause was another rank's death (the collective lost its peer)."""


def root_cause(reasons: dict[int, str], codes: list[int], stopped: Collection[int] = ()) -> tuple[int, str]:
    """The rank whose failure ended the run, and why, from the ranks' failure records and exit codes: a recorded
    error of its own first, then a rank killed by a signal (it could record nothing), then a rank that lost its
    peer, then the first bad exit code. A rank killed by SIGKILL reads as such, not as its peer's "Connection
    reset". ``stopped`` are the ranks the launcher sent SIGTERM because another rank had failed: one of them that
    died of it (say between its peer-lost error and its exit, with the handlers gone) is a consequence, so a rank
    killed by a signal nobody in the run sent comes first."""
    import signal

    def code_of(rank: int) -> str:
        code = codes[rank]
        return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"

    own = [r for r, why in sorted(reasons.items()) if not _PEER_LOST.search(why)]
    if own:
        return own[0], f"{code_of(own[0])}: {reasons[own[0]]}"
    killed = sorted((r for r, code in enumerate(codes) if code < 0), key=lambda r: r in stopped)
    if killed:
        return killed[0], f"{code_of(killed[0])} (no error recorded)"
    if reasons:
        rank = min(reasons)
        return rank, f"{code_of(rank)}: {reasons[rank]}"
    bad = [r for r, code in enumerate(codes) if code not in (0, 75)] or [0]
    return bad[0], f"{code_of(bad[0])}: no error recorded"


def hard_exit(code: int) -> None:
    """Flush logs and streams, then leave without running exit handlers (they can block on dead peers)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def leave(code: int) -> None:
    """End a process whose work returned (a rank that finished or saved at a preemption, the local launcher):
    wait for the threads that are not daemons, then :func:`hard_exit`. The interpreter's own teardown would add
    ~2.5 s to every process of every start on CPU, nearly all of it torch's ``weakref.finalize`` de-registering the
    custom operators of torchvision, DeepSpeed and torch itself one kernel at a time; nothing of the run is left
    to it (:meth:`trainer.trainer.Trainer.close` has closed the loader, the ledger, the MLflow run and the process
    group, and every file is closed where it is written)."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    hard_exit(code)
