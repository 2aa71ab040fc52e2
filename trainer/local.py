"""Run N training ranks on this machine (torchrun-style), for laptops, CI and ``cluster/launch.py --local``."""

from __future__ import annotations

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
    preemption protocol). If one rank fails, the others are stopped. Returns 0, :data:`REQUEUE_EXIT_CODE` when
    the ranks stopped for preemption, or the first failing rank's code.
    """
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "trainer.worker", str(run_dir)], env=rank_env(rank, world_size, port, threads)
        )
        for rank in range(world_size)
    ]

    def forward(signum: int, _frame: FrameType | None) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (*PREEMPTION_SIGNALS, signal.SIGINT)}
    try:
        failed_at: float | None = None
        while any(p.poll() is None for p in procs):
            running = [p.poll() for p in procs]
            bad = [c for c in running if c not in (None, 0, REQUEUE_EXIT_CODE)]
            if bad and failed_at is None:
                failed_at = time.monotonic()
                log.error("a rank exited with code %s; stopping the others", bad[0])
                forward(signal.SIGTERM, None)
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [int(p.returncode) for p in procs]
    failures = [c for c in codes if c not in (0, REQUEUE_EXIT_CODE)]
    if failures:
        return failures[0]
    return REQUEUE_EXIT_CODE if REQUEUE_EXIT_CODE in codes else 0
