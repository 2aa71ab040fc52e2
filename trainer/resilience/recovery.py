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

:class:`Recovery` is the component the trainer talks to: it is told about every step and every log point, decides
when to roll back, and performs the rollback on the engine, the loader and the checkpoints it is handed.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data.batch import Loader
from trainer.config import ScheduleConfig
from trainer.distributed import DistEnv, barrier, gather_lists, gather_objects
from trainer.resilience import faults
from trainer.resilience.checkpoint import Checkpointer, CheckpointInfo
from trainer.resilience.failure import TrainingError
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

    def start(self, resumed_from: str | None, world_size: int, micro_batch: int, grad_accum: int) -> None:
        """Record this start: where it resumed from, and the world it got with the batch split it chose."""
        record = {"time": time.time(), "host": socket.gethostname(), "resumed_from": resumed_from}
        split = {"world_size": world_size, "micro_batch": micro_batch, "grad_accum": grad_accum}
        append_record(self.path, {**record, **split, "slurm_job_id": slurm_job_id()})

    def world_sizes(self) -> list[int]:
        """The world size of every start recorded with one, in order."""
        return [int(r["world_size"]) for r in read_records(self.path) if "world_size" in r]

    def restarts(self) -> int:
        """Starts of the run before this one."""
        return max(0, len(read_records(self.path)) - 1)


class SkipGuard:
    """Counts skipped (non-finite) steps; too many in a row exhaust the budget (the run rolls back or stops)."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0

    def update(self, skipped: bool, step: int) -> bool:
        """Record one step; True when ``max_in_row`` steps in a row were skipped."""
        self.in_row = self.in_row + 1 if skipped else 0
        self.total += int(skipped)
        if skipped:
            log.warning("step %d skipped: non-finite loss or gradient (%d in a row)", step, self.in_row)
        return self.in_row >= self.max_in_row

    def error(self, step: int, checkpoint_dir: Path, rollbacks: int) -> TrainingError:
        """The error that ends a run whose budget is exhausted and cannot roll back."""
        return TrainingError(
            f"{self.in_row} steps in a row had a non-finite loss or gradient (last: step {step}; {rollbacks} "
            "rollbacks made, schedule.max_rollbacks); lower optim.base_lr, set optim.grad_clip, or use "
            f"deepspeed.precision=fp32. The last complete checkpoint is in {checkpoint_dir}"
        )


@dataclass
class Spike:
    """A reason to roll back, found at a log point (the same on every rank: it comes from all-reduced values)."""

    step: int
    """The step it was found at."""
    first_step: int
    """The first step of the bad stretch (the log interval's first step, or the first non-finite step)."""
    cause: str
    loss: float
    threshold: float


class Recovery:
    """Spike detection, the skip guard and the rollback that undoes a spike (all ranks, in lockstep: every decision
    comes from all-reduced values)."""

    def __init__(self, cfg: ScheduleConfig, log_every: int, env: DistEnv, run_dir: Path) -> None:
        self.cfg, self.log_every, self.env, self.run_dir = cfg, log_every, env, run_dir
        self.rollbacks = RollbackLog(run_dir)
        self.spikes = SpikeDetector(cfg.spike_factor, cfg.spike_window)
        self.skip_guard = SkipGuard(cfg.max_skipped_steps)
        self.pending: Spike | None = None
        """A spike found at the last step or log point: the trainer rolls back before going on."""
        self.recent_keys: list[tuple[int, list[str]]] = []
        """This rank's sample keys per step since the oldest kept checkpoint (what a rollback may skip); saved with
        every checkpoint, so a resumed run records whole rollbacks too."""

    def targets(self) -> list[int]:
        """The step each recorded rollback restored, in order (what abandons checkpoints)."""
        return [int(r["restored_step"]) for r in self.rollbacks.read()]

    def after_step(self, step: int, keys: list[str], skipped: bool, checkpoint_dir: Path) -> None:
        """Record a step's samples; a run of non-finite steps that exhausts the budget becomes a pending rollback
        (or, with no rollback left, the error that ends the run)."""
        self.recent_keys.append((step, keys))
        if self.skip_guard.update(skipped, step):
            made = self.rollbacks.count()
            if made >= self.cfg.max_rollbacks:
                raise self.skip_guard.error(step, checkpoint_dir, made)
            first = step - self.skip_guard.in_row + 1
            self.pending = Spike(step, first, "non-finite steps", float("nan"), float("nan"))

    def after_log(self, step: int, loss: float) -> None:
        """Test a log interval's mean loss (all-reduced: every rank decides the same) for a spike."""
        threshold = self.spikes.check(loss)
        if threshold is not None and self.pending is None:
            first = step - (step - 1) % self.log_every
            self.pending = Spike(step, first, "loss spike", loss, threshold)

    def saved(self, oldest_kept: int) -> None:
        """After a save: forget the keys of steps no rollback can restore to any more."""
        self.recent_keys = [(step, keys) for step, keys in self.recent_keys if step > oldest_kept]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint carries of recovery: the skip counts, the spike statistic and the recent keys."""
        return {
            "skipped_total": self.skip_guard.total,
            "skipped_in_row": self.skip_guard.in_row,
            "spikes": self.spikes.state_dict(),
            "recent_keys": self.recent_keys,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (a checkpoint's rank state)."""
        self.skip_guard.total = int(state.get("skipped_total", 0))
        self.skip_guard.in_row = int(state.get("skipped_in_row", 0))
        self.spikes.load_state_dict(state.get("spikes", {}))
        self.recent_keys = [(int(step), list(keys)) for step, keys in state.get("recent_keys", [])]

    def continue_rollback(self, info: CheckpointInfo, loader: Loader) -> bool:
        """A checkpoint that a later recorded rollback restored resumes as that rollback left the run: the loader
        after the skipped samples and the spike statistic of then (the crash came before the next save). True when
        it did (the log interval is then empty: a rollback follows a log point)."""
        records = self.rollbacks.read()
        after = [r for i, r in enumerate(records) if i >= info.timeline and r["restored_step"] == info.step]
        if not after or "resume" not in after[-1]:
            return False
        resume = after[-1]["resume"]
        loaders = resume["loader"]
        loader.load_state_dict(loaders[self.env.rank if self.env.rank < len(loaders) else 0])
        self.spikes.load_state_dict({"history": resume["spikes"]})
        if self.env.is_main:
            log.info("continuing the rollback of step %d: its skipped samples stay skipped",
                     after[-1]["detected_at_step"])  # fmt: skip
        return True

    def roll_back(
        self, checkpointer: Checkpointer, loader: Loader, restore: Callable[[CheckpointInfo], Any]
    ) -> Rollback | None:
        """Restore the newest checkpoint saved before the pending spike's stretch (``restore`` loads it into the
        engine and the stage) and skip the samples of the steps after it up to the spike; None when no checkpoint
        precedes a loss spike (training goes on). The loader's workers must be stopped first.

        The line in ``rollbacks.jsonl`` is the commit: from then on the checkpoints after the target are abandoned
        (:class:`~trainer.resilience.checkpoint.Checkpointer`) and a resume from the target continues as this
        rollback left the run (:meth:`continue_rollback`), so a crash at any moment neither replays the skipped
        samples nor spends a second rollback on the same spike. The loader goes on from where it is (after the
        spike), so repeated rollbacks to one checkpoint skip every bad stretch."""
        spike, self.pending = self.pending, None
        assert spike is not None
        made, limit = self.rollbacks.count(), self.cfg.max_rollbacks
        target = next((c for c in reversed(checkpointer.complete()) if c.step < spike.first_step), None)
        if made >= limit:
            raise TrainingError(
                f"{spike.cause} at step {spike.step} (loss {spike.loss:.4g}, threshold {spike.threshold:.4g}) after "
                f"{made} rollbacks (schedule.max_rollbacks={limit}; see {self.rollbacks.path}): the run keeps "
                "spiking. Lower optim.base_lr, set optim.grad_clip, check the data the rollbacks name, or raise "
                f"schedule.max_rollbacks. The last complete checkpoint is in {checkpointer.root}"
            )
        if target is None:
            if spike.cause == "non-finite steps":
                raise self.skip_guard.error(spike.step, checkpointer.root, made)
            if self.env.is_main:
                log.warning("loss spike at step %d (%.4g > %.4g) not rolled back: no checkpoint precedes it",
                            spike.step, spike.loss, spike.threshold)  # fmt: skip
            return None
        skipped = [(step, keys) for step, keys in self.recent_keys if target.step < step <= spike.step]
        keys = gather_lists([k for _, ks in skipped for k in ks])
        here = loader.state_dict()  # after the spike: where training goes on
        loaders = gather_objects(here)
        restore(target)
        loader.load_state_dict(here)
        record = Rollback(
            spike.step, spike.cause, spike.loss, spike.threshold, target.step, [target.step + 1, spike.step], keys,
            time.time(), {"loader": loaders, "spikes": self.spikes.state_dict()["history"]},
        )  # fmt: skip
        if self.env.is_main:
            self.rollbacks.append(record)
        barrier()
        faults.at("rollback", spike.step, self.run_dir)
        checkpointer.rolled_back(target)
        self.recent_keys = [(step, ks) for step, ks in self.recent_keys if step <= target.step]
        self.skip_guard.in_row = 0
        if self.env.is_main:
            log.warning(
                "%s at step %d (loss %.4g > %.4g): rolled back to %s and skipped the %d samples of steps %d-%d "
                "(rollback %d of at most %d; %s)",
                spike.cause, spike.step, spike.loss, spike.threshold, target.tag, len(keys), target.step + 1,
                spike.step, made + 1, limit, self.rollbacks.path,
            )  # fmt: skip
        return record
