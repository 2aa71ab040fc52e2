"""At most one live run per run directory: ``<run_dir>/lock.json``, taken before anything else is written there.

The record names its holder: host, the launcher's pid and the ranks' pids (with their start times, so a reused pid
is not taken for the holder), the SLURM job id when the holder is a job, and a heartbeat refreshed every
:data:`HEARTBEAT_S` seconds by a thread of the holder. A second launch is refused at once with a message naming the
holder. A holder that died is taken over, with a log line saying why: on the same host, when none of its processes
is alive (or the host rebooted); elsewhere, when its heartbeat is older than :data:`STALE_S`. A SLURM job takes over
its own lock after a requeue (same job id, a new attempt). A holder whose launcher died while its ranks still
stop (they save first, :func:`trainer.resilience.preemption.stop_with_launcher`) is waited for, up to ``wait_s``.

Deciding and writing happen under an ``flock`` of ``lock.json.guard``, so two launches racing for a stale lock
cannot both win; the record itself is replaced atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.export import atomic_write_text
from trainer.run_dir import RunDir

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_S = 90.0
"""A holder on another host whose heartbeat is older than this is taken for dead (9 missed beats)."""


class RunDirLocked(RuntimeError):
    """Another live run holds the run directory; the message names it and what to do."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """Start time of process ``pid`` (clock ticks since boot), None when it does not exist (or is a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def _alive(pids: dict[str, int | None]) -> list[int]:
    """The recorded processes still running (same pid and start time) on this host."""
    return [int(pid) for pid, start in pids.items() if start is not None and process_start(int(pid)) == start]


def slurm_job_id() -> str | None:
    """The SLURM job this process belongs to (the array's job id for array tasks), None outside SLURM."""
    return os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or None


class RunLock:
    """This process's claim on a run directory; see the module docstring."""

    def __init__(self, run_dir: Path, role: str = "launcher") -> None:
        self.run_dir = run_dir
        self.path = RunDir(run_dir).lock
        self.token = uuid.uuid4().hex
        self.role = role
        self.pids: dict[str, int | None] = {str(os.getpid()): process_start(os.getpid())}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> dict[str, Any]:
        """What the lock file says while this process holds it."""
        return {
            "token": self.token,
            "role": self.role,
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "pid": os.getpid(),
            "pids": self.pids,
            "slurm_job_id": slurm_job_id(),
            "started": time.time(),
            "heartbeat": time.time(),
        }

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".guard"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            yield

    def read(self) -> dict[str, Any] | None:
        """The current holder's record (None when free; an unreadable record counts as free, with a log line)."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("run lock %s is unreadable (%s): taking it", self.path, err)
            return None
        return data if isinstance(data, dict) else None

    def acquire(self, wait_s: float = 60.0) -> None:
        """Take the lock, taking over a dead holder's; :class:`RunDirLocked` when a live run holds it. A holder
        whose ranks are still stopping after their launcher died is waited for up to ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._guard():
                holder = self.read()
                verdict = self._verdict(holder)
                if verdict is None or verdict.startswith("dead"):
                    if holder is not None:
                        log.warning("run directory %s: taking over the lock of %s (%s)", self.run_dir,
                                    describe(holder), verdict)  # fmt: skip
                    self._write()
                    break
            if verdict == "stopping" and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            assert holder is not None
            raise RunDirLocked(
                f"{self.run_dir} is in use by another run: {describe(holder)}. Wait for it to end (or stop it), "
                "or pass another --run-dir. A holder that died is taken over automatically."
            )
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def check_free(self) -> None:
        """:class:`RunDirLocked` when a live run holds the directory (nothing is taken or written)."""
        holder = self.read()
        verdict = self._verdict(holder)
        if verdict in ("alive", "stopping") and holder is not None:
            raise RunDirLocked(
                f"{self.run_dir} is in use by another run: {describe(holder)}. Wait for it to end (or stop it), "
                "or pass another --run-dir."
            )

    def _verdict(self, holder: dict[str, Any] | None) -> str | None:
        """None: free; "dead ...": a holder that died; "mine": this process; "stopping": ranks of a dead launcher
        still running; "alive": a live holder."""
        if holder is None:
            return None
        if holder.get("token") == self.token:
            return "mine"
        job = holder.get("slurm_job_id")
        if job is not None and job == slurm_job_id():
            return "dead: a previous attempt of this SLURM job (requeued)"
        if holder.get("host") == socket.gethostname():
            if holder.get("boot_id") and holder.get("boot_id") != _boot_id():
                return "dead: its host rebooted"
            pids: dict[str, int | None] = holder.get("pids") or {}
            alive = _alive(pids)
            if not alive:
                return f"dead: none of its processes ({', '.join(pids) or 'none recorded'}) is running"
            return "alive" if int(holder.get("pid", -1)) in alive else "stopping"
        age = time.time() - float(holder.get("heartbeat", 0.0))
        if age > STALE_S:
            return f"dead: no heartbeat for {age:.0f}s"
        return "alive"

    def _write(self) -> None:
        record = self.record()
        old = self.read() if self.path.exists() else None
        if old is not None and old.get("token") == self.token:
            record["started"] = old.get("started", record["started"])
        atomic_write_text(self.path, json.dumps(record))

    def add_pids(self, pids: list[int]) -> None:
        """Record the processes this holder started (the ranks): the lock stays held while any of them lives."""
        self.pids.update({str(pid): process_start(pid) for pid in pids})
        with self._guard():
            if (self.read() or {}).get("token") == self.token:
                self._write()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError), self._guard():
                if (self.read() or {}).get("token") == self.token:
                    self._write()

    def release(self) -> None:
        """Give the lock up (only if it is still this process's)."""
        self._stop.set()
        with contextlib.suppress(OSError), self._guard():
            if (self.read() or {}).get("token") == self.token:
                self.path.unlink()


def describe(holder: dict[str, Any]) -> str:
    """The holder in words, for logs and errors."""
    job = holder.get("slurm_job_id")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0.0))))
    beat = time.time() - float(holder.get("heartbeat", 0.0))
    where = f"SLURM job {job} " if job else ""
    return (
        f"{where}{holder.get('role', 'launcher')} pid {holder.get('pid')} on {holder.get('host')} since {since} "
        f"(heartbeat {beat:.0f}s ago)"
    )
