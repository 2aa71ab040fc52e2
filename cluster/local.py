"""Run N training ranks on this machine (torchrun-style), for laptops, CI and ``cluster/launch.py --local``."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from trainer.rendezvous import free_port
from trainer.resilience.failure import failures_since, root_cause
from trainer.resilience.preemption import LAUNCHER_PID_ENV, REQUEUE_EXIT_CODE
from trainer.resilience.run_lock import RunLock
from trainer.run_dir import LATEST, RunDir

log = logging.getLogger(__name__)


def rank_env(rank: int, world_size: int, port: int, threads: int, device: str) -> dict[str, str]:
    """Environment of one local rank on ``device`` (``cpu`` or ``cuda``)."""
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
    )
    env[LAUNCHER_PID_ENV] = str(os.getpid())  # the rank stops when this process dies
    if device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed compiles a communication op on first use; keep it next to the project, not in $HOME.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "torch_extensions"))
    return env


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals that stop a local run: the ranks save at the next step boundary and exit; the launcher exits with
128 + the signal's number. A second one kills the ranks at once."""


def run_local(run_dir: Path, world_size: int, device: str, lock: RunLock | None = None, grace_s: float = 30.0) -> int:
    """Start ``world_size`` worker processes for ``run_dir`` on ``device`` (``cpu`` or ``cuda``) and wait for them.
    Each rank runs ``OMP_NUM_THREADS`` threads when that is set (as torchrun), else its share of the cores.

    SIGUSR2 (a preemption) is forwarded to every rank, which saves and exits through the preemption protocol; the
    launcher returns :data:`REQUEUE_EXIT_CODE`. SIGINT, SIGTERM and SIGHUP (Ctrl-C, ``kill``, a closed terminal)
    reach the ranks as SIGTERM, the same protocol, and the launcher returns 128 + the signal's number; a second such
    signal SIGKILLs the ranks. Each rank gets SIGTERM from the kernel if the launcher itself dies
    (:func:`~trainer.resilience.preemption.stop_with_launcher`). When a rank fails, the others get SIGTERM (a
    healthy rank saves and exits) and, after ``grace_s``, SIGKILL; each rank runs in its own process group, which
    is killed at the end, so no rank or dataloader worker outlives the launcher. Failures are reported with the rank
    that failed first and why (:func:`trainer.resilience.failure.root_cause`).
    """
    port = free_port()
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // world_size)
    started = time.time()
    stopped_by: list[int] = []

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        stopped_by.append(signum)
        if len(stopped_by) == 1:
            log.warning("received %s: the ranks save a checkpoint at the next step boundary and exit (send it "
                        "again to kill them at once)", signal.Signals(signum).name)  # fmt: skip
            forward(signal.SIGTERM, None)
        else:
            log.error("received %s again: killing the ranks", signal.Signals(signum).name)
            for proc in procs:
                _kill_group(proc, wait=False)

    def forward(signum: int, _frame: FrameType | None) -> list[int]:
        """Send ``signum`` to every rank still running; returns those ranks."""
        sent = []
        for rank, proc in enumerate(procs):
            if proc.poll() is None:
                proc.send_signal(signum)
                sent.append(rank)
        return sent

    procs: list[subprocess.Popen] = []
    # Installed before the ranks start: a signal from now on is never lost nor kills the launcher alone.
    previous = {sig: signal.signal(sig, on_stop) for sig in STOP_SIGNALS}
    previous[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, forward)
    try:
        for rank in range(world_size):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "trainer.worker", str(run_dir)],
                    env=rank_env(rank, world_size, port, threads, device),
                    start_new_session=True,  # its own process group: the rank and its dataloader workers end together
                )
            )
        if stopped_by:  # a signal arrived while the ranks were starting
            forward(signal.SIGTERM, None)
        if lock is not None:
            lock.add_pids([p.pid for p in procs])
        failed_at: float | None = None  # when the first rank failed: the others get grace_s to stop
        stopped: list[int] = []  # the ranks this launcher stopped because another failed: never the root cause
        while any(p.poll() is None for p in procs):
            if failed_at is None:
                bad = [(r, p.returncode) for r, p in enumerate(procs) if p.poll() not in (None, 0, REQUEUE_EXIT_CODE)]
                if bad:
                    failed_at = time.monotonic()
                    log.error("rank %d exited with code %d; stopping the other ranks", *bad[0])
                    stopped = forward(signal.SIGTERM, None)
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for rank, proc in enumerate(procs):
                    if proc.poll() is None:
                        log.error("rank %d did not stop within %.0fs of the failure; killing it", rank, grace_s)
                        _kill_group(proc)
            time.sleep(0.2)
    finally:
        for proc in procs:  # leftovers: dataloader workers of a rank that was killed or exited hard
            _kill_group(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [int(p.returncode) for p in procs]
    if any(code not in (0, REQUEUE_EXIT_CODE) for code in codes):
        code = codes[_report(run_dir, codes, started, stopped)]
        return 128 - code if code < 0 else code  # a rank killed by signal N: 128 + N, as a shell reports it
    if stopped_by and any(code != 0 for code in codes):  # a signal after every rank finished changes nothing
        name = signal.Signals(stopped_by[0]).name
        log.error("run stopped by %s%s; re-run the same command to resume", name, _saved(run_dir))
        return 128 + int(stopped_by[0])
    return REQUEUE_EXIT_CODE if REQUEUE_EXIT_CODE in codes else 0


def _saved(run_dir: Path) -> str:
    """ " (newest checkpoint step_N)" from the ``latest`` pointer, or that none was saved."""
    try:
        return f" (newest checkpoint {(run_dir / 'checkpoints' / LATEST).read_text().strip()})"
    except OSError:
        return " (no checkpoint saved yet)"


def _kill_group(proc: subprocess.Popen, wait: bool = True) -> None:
    """SIGKILL the process group of a rank (the rank and its dataloader workers)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if wait and proc.poll() is None:
        proc.wait(timeout=10)


def _report(run_dir: Path, codes: list[int], started: float, stopped: list[int]) -> int:
    """One summary line: the rank whose failure caused the others' and why (its failure record, or the signal
    that killed it), then how each rank ended; returns that rank."""
    rank, why = root_cause(failures_since(run_dir, started), codes, stopped)
    endings = ", ".join(f"rank {r}: {_ending(c)}" for r, c in enumerate(codes))
    log.error("run failed: rank %d %s\n  exit codes: %s\n  details: %s", rank, why, endings,
              RunDir(run_dir).failures)  # fmt: skip
    return rank


def _ending(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else str(code)
