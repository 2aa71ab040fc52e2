"""Loss spikes: detect them on the losses every rank already shares, and record the rollbacks that undo them.

A spike is a log interval whose mean loss (all-reduced, so every rank sees the same number and decides the same
without another collective) exceeds ``schedule.spike_factor`` times the median of the previous
``schedule.spike_window`` intervals, or a run of non-finite steps that exhausts ``schedule.max_skipped_steps``. The
trainer then restores the newest checkpoint saved before the spiking interval began and skips the samples between
that checkpoint and the spike (:meth:`data.loader.ShardLoader.skip`, by index: nothing is read). Each rollback is a
line of ``<run_dir>/rollbacks.jsonl`` (steps, losses, the skipped step range and sample keys), an MLflow metric and
an artifact; after ``schedule.max_rollbacks`` the run fails with an error that says so.

The line is the rollback's commit (written whole and synced; a line cut short by a crash is ignored): it carries
the loader position and spike statistic the run continued with, so a crash before the next checkpoint resumes the
restored checkpoint as the rollback left it, and it abandons the checkpoints after the restored one
(:mod:`trainer.resilience.checkpoint`). ``segments.jsonl`` records every start of the run (what ``restarts`` counts).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.resilience.run_lock import slurm_job_id
from trainer.run_dir import RunDir

log = logging.getLogger(__name__)


class SpikeDetector:
    """The running statistic of interval losses and the spike test."""

    def __init__(self, factor: float | None, window: int) -> None:
        self.factor = factor
        self.history: deque[float] = deque(maxlen=window)

    def check(self, loss: float) -> float | None:
        """The threshold ``loss`` exceeded (a spike), else None; a normal interval joins the history. Needs a full
        window first, so the steep start of training is never taken for a spike."""
        if self.factor is None:
            return None
        if len(self.history) == self.history.maxlen and math.isfinite(loss):
            threshold = self.factor * statistics.median(self.history)
            if loss > threshold:
                return threshold
        if math.isfinite(loss):
            self.history.append(loss)
        return None

    def state_dict(self) -> dict[str, Any]:
        """The history, for checkpoints (a resumed run keeps detecting without a new warm-up)."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.history.clear()
        self.history.extend(float(v) for v in state.get("history", []))


@dataclass
class Rollback:
    """One rollback, as recorded in ``rollbacks.jsonl``."""

    detected_at_step: int
    """The step whose log interval spiked."""
    cause: str
    """"loss spike" or "non-finite steps"."""
    loss: float
    """The interval's mean loss (NaN for non-finite steps)."""
    threshold: float
    """What it exceeded (NaN for non-finite steps)."""
    restored_step: int
    """The checkpoint training continued from."""
    skipped_steps: list[int]
    """First and last step whose samples were skipped (the steps after the checkpoint up to the spike)."""
    skipped_keys: list[str] = field(default_factory=list)
    """Keys of the skipped samples, all ranks."""
    time: float = 0.0
    """Unix time of the rollback."""
    resume: dict[str, Any] = field(default_factory=dict)
    """How training went on: ``loader`` (every rank's loader state after the spike) and ``spikes`` (the spike
    statistic's history)."""


def read_records(path: Path) -> list[dict[str, Any]]:
    """The whole JSON lines of ``path`` (none when it does not exist); a line cut short by a crash is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            log.warning("%s: skipping a line cut short (a crash while it was written)", path)
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line, synced to disk (after a torn last line, on a line of its own)."""
    with path.open("a+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                f.write("\n")
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


class RollbackLog:
    """Appends rollbacks to ``rollbacks.jsonl`` in the run directory and counts them."""

    def __init__(self, run_dir: Path) -> None:
        self.path = RunDir(run_dir).rollbacks

    def count(self) -> int:
        """Rollbacks made so far in this run (over restarts)."""
        return len(self.read())

    def read(self) -> list[dict[str, Any]]:
        """All recorded rollbacks, oldest first."""
        return read_records(self.path)

    def append(self, rollback: Rollback) -> None:
        """Record one rollback (rank 0): its commit."""
        append_record(self.path, asdict(rollback))


class SegmentLog:
    """``segments.jsonl``: one line per start of the run (rank 0), whether or not that segment saved."""

    def __init__(self, run_dir: Path) -> None:
        self.path = RunDir(run_dir).segments

    def start(self, resumed_from: str | None) -> None:
        """Record this start."""
        record = {"time": time.time(), "host": socket.gethostname(), "resumed_from": resumed_from}
        append_record(self.path, {**record, "slurm_job_id": slurm_job_id()})

    def restarts(self) -> int:
        """Starts of the run before this one."""
        return max(0, len(read_records(self.path)) - 1)
