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

import torch

from trainer.distributed import free_port
from trainer.failure import FAILURES, failures_since
from trainer.preemption import PREEMPTION_SIGNALS, REQUEUE_EXIT_CODE

log = logging.getLogger(__name__)


def rank_env(rank: int, world_size: int, port: int, threads: int) -> dict[str, str]:
    """Environment of one local rank."""
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
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed compiles a communication op on first use; keep it next to the project, not in $HOME.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "torch_extensions"))
    return env


def run_local(run_dir: Path, world_size: int, grace_s: float = 30.0) -> int:
    """Start ``world_size`` worker processes for ``run_dir`` and wait for them.

    SIGTERM/SIGUSR2 sent to this launcher are forwarded to every rank (which then save and exit through the
    preemption protocol). When a rank fails, the others get SIGTERM (a healthy rank saves and exits) and, after
    ``grace_s``, SIGKILL; each rank runs in its own process group, which is killed at the end, so no rank or
    dataloader worker outlives the launcher. Returns 0, :data:`REQUEUE_EXIT_CODE` when the ranks stopped for
    preemption, or the first failing rank's code, after logging which rank failed and why.
    """
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    started = time.time()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "trainer.worker", str(run_dir)],
            env=rank_env(rank, world_size, port, threads),
            start_new_session=True,  # its own process group: the rank and its dataloader workers end together
        )
        for rank in range(world_size)
    ]

    def forward(signum: int, _frame: FrameType | None) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (*PREEMPTION_SIGNALS, signal.SIGINT)}
    first_failure: tuple[int, int] | None = None  # (rank, exit code)
    try:
        failed_at: float | None = None
        while any(p.poll() is None for p in procs):
            if first_failure is None:
                for rank, proc in enumerate(procs):
                    if proc.poll() not in (None, 0, REQUEUE_EXIT_CODE):
                        first_failure = (rank, int(proc.returncode))
                        failed_at = time.monotonic()
                        log.error("rank %d exited with code %d; stopping the other ranks", rank, proc.returncode)
                        forward(signal.SIGTERM, None)
                        break
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for rank, proc in enumerate(procs):
                    if proc.poll() is None:
                        log.error("rank %d did not stop within %.0fs of the failure; killing it", rank, grace_s)
                        _kill_group(proc)
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs:  # leftovers: dataloader workers of a rank that was killed or exited hard
            _kill_group(proc)
    codes = [int(p.returncode) for p in procs]
    if first_failure is None:
        bad = [(rank, code) for rank, code in enumerate(codes) if code not in (0, REQUEUE_EXIT_CODE)]
        first_failure = bad[0] if bad else None
    if first_failure is not None:
        _report(run_dir, first_failure, codes, started)
        return first_failure[1]
    return REQUEUE_EXIT_CODE if REQUEUE_EXIT_CODE in codes else 0


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of a rank (the rank and its dataloader workers)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=10)


def _report(run_dir: Path, first: tuple[int, int], codes: list[int], started: float) -> None:
    """Say which rank failed first and why (from the ranks' failure records), and how each rank ended."""
    reasons = failures_since(run_dir, started)
    rank, code = first
    why = reasons.get(rank) or next(iter(reasons.values()), "no error recorded (killed by a signal?)")
    endings = ", ".join(f"rank {r}: {c}" for r, c in enumerate(codes))
    log.error("run failed: rank %d exited with code %d: %s\n  exit codes: %s\n  details: %s", rank, code, why,
              endings, run_dir / FAILURES)  # fmt: skip
