"""One metrics logger: every number the trainer reports goes to the console, ``metrics.jsonl`` and MLflow at once.

``metrics.jsonl`` (rank 0, in the run directory) holds one JSON record per line with a ``kind``: ``train`` (a log
interval: loss, lr, grad norm, throughput, memory, MFU, ETA) or ``eval`` (an evaluation's metrics and its
duration ``eval_s``, which is not counted in any interval's images/s). Other ranks log nothing.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from trainer.observability.metrics import console_line
from trainer.observability.tracking import Tracker
from trainer.run_dir import RunDir

log = logging.getLogger(__name__)


class MetricsLogger:
    """Fans the trainer's metrics out to the console, ``metrics.jsonl`` and the MLflow run of ``tracker``."""

    def __init__(self, run_dir: Path, tracker: Tracker, total_steps: int, enabled: bool) -> None:
        self.path = RunDir(run_dir).metrics_log
        self.tracker = tracker
        self.total_steps = total_steps
        self.enabled = enabled

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, step: int, epoch: float, scalars: dict[str, float], perf: dict[str, float]) -> None:
        """A log interval: the console line, a ``train`` record and the MLflow metrics (non-finite ones left out
        of MLflow, which refuses them)."""
        if not self.enabled:
            return
        log.info(console_line(step, self.total_steps, epoch, scalars, perf))
        self._write({"kind": "train", "step": step, "epoch": epoch, **scalars, **perf})
        finite = {k: v for k, v in scalars.items() if math.isfinite(v)}
        self.tracker.log_metrics({**finite, **perf, "epoch": epoch}, step)

    def eval(self, step: int, metrics: dict[str, float], seconds: float, artifacts: list[tuple[str, Path]]) -> None:
        """An evaluation: its metrics and duration, and its files as MLflow artifacts."""
        if not self.enabled:
            return
        if metrics:
            shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            log.info("eval step %d (%.1fs): %s", step, seconds, shown)
        self._write({"kind": "eval", "step": step, "eval_s": seconds, **metrics})
        self.tracker.log_metrics({**metrics, "eval_s": seconds}, step)
        for folder, path in artifacts:
            self.tracker.log_artifact(path, folder)
