"""Preemption as a distributed protocol.

SLURM's warning signal (SIGUSR2, ``--signal=USR2@120``) and SIGTERM only set a flag here (and note when). At the
next step boundary, and after every batch of an evaluation, every rank all-reduces the flag; if any rank got a
signal, all ranks save a checkpoint and leave the training loop, and the process exits with
:data:`REQUEUE_EXIT_CODE`, which the cluster layer turns into a requeue. Nothing is saved inside a signal handler,
and no rank decides alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
PREEMPTION_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
LAUNCHER_PID_ENV = "FCMAE_LAUNCHER_PID"
"""Set by the local launcher in each rank's environment: the rank stops (SIGTERM) when that process dies."""


def stop_with_launcher() -> None:
    """Make the kernel send this process SIGTERM when the local launcher that started it dies (Linux
    ``PR_SET_PDEATHSIG``), so a SIGKILLed launcher never leaves ranks training; the preemption protocol then saves
    and exits. A launcher already gone by now ends the rank at once. No-op outside the local launcher."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher:
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != int(launcher):  # it died before the request took effect
        raise SystemExit(f"the launcher (pid {launcher}) exited before this rank started; not training")


class PreemptionHandler:
    """Installs the flag-setting handlers and answers "should all ranks stop now?"."""

    last_received: int | None = None
    """The last signal any handler of this process received (read by :mod:`trainer.resilience.faults`)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.received_at: float | None = None
        """``time.monotonic()`` when the first signal arrived."""
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        """Replace the handlers of SIGUSR2 and SIGTERM in this (main) process."""
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received_at = time.monotonic()
        self.received = signum  # only a flag: the step boundary does the rest
        PreemptionHandler.last_received = signum

    def should_stop(self, device: torch.device) -> bool:
        """Collective: true on every rank when any rank received a preemption signal."""
        return self.poll(device)[0]

    def poll(self, device: torch.device, save_due: bool = False) -> tuple[bool, bool]:
        """Collective, one all-reduce: (any rank received a signal, any rank says a time-based save is due)."""
        from trainer.distributed import any_ranks  # torch: the launcher reads this module's names without it

        stop, due = any_ranks([self.received is not None, save_due], device)
        if stop and self.received is not None:
            launcher = os.environ.get(LAUNCHER_PID_ENV)
            why = signal.Signals(self.received).name
            if launcher and os.getppid() != int(launcher):
                why += f" (the launcher, pid {launcher}, died)"
            log.warning("received %s: saving a checkpoint and exiting for requeue", why)
        return stop, due

    def seconds_left(self, window_s: float) -> float:
        """Seconds left of a ``window_s`` warning window since the signal; the whole window on a rank that received
        none (another rank's signal stopped it: it counts from now)."""
        if self.received_at is None:
            return window_s
        return window_s - (time.monotonic() - self.received_at)
