"""Preemption as a distributed protocol.

SLURM's warning signal (SIGUSR2, ``--signal=USR2@120``) and SIGTERM only set a flag here. At the next step
boundary every rank all-reduces the flag; if any rank got a signal, all ranks save a checkpoint and leave the
training loop, and the process exits with :data:`REQUEUE_EXIT_CODE`, which the cluster layer turns into a requeue.
Nothing is saved inside a signal handler, and no rank decides alone.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

import torch

from trainer.distributed import any_rank

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
PREEMPTION_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class PreemptionHandler:
    """Installs the flag-setting handlers and answers "should all ranks stop now?"."""

    def __init__(self) -> None:
        self.received: int | None = None
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
        self.received = signum  # only a flag: the step boundary does the rest

    def should_stop(self, device: torch.device) -> bool:
        """Collective: true on every rank when any rank received a preemption signal."""
        stop = any_rank(self.received is not None, device)
        if stop and self.received is not None:
            log.warning("received %s: saving a checkpoint and exiting for requeue", signal.Signals(self.received).name)
        return stop
