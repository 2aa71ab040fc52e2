"""One metrics logger: every number the trainer reports goes to the console, ``metrics.jsonl`` and MLflow at once.

``metrics.jsonl`` (rank 0, in the run directory) holds one JSON record per line with a ``kind``: ``train`` (a log
interval: loss, lr, grad norm, throughput, memory, MFU, ETA) or ``eval`` (an evaluation's metrics and its
duration ``eval_s``, which is not counted in any interval's images/s). Other ranks log nothing.

In MLflow the same numbers carry a section prefix, because its UI groups a run's charts by the name before ``/``:
``train/`` (loss, lr, grad norm, epoch, skipped steps, samples per source), ``speed/`` (images/s, data wait, step
time, memory, MFU, ETA) and ``eval/`` (the probes or accuracies and ``eval_s``); MLflow's own system metrics are
``system/``. A baseline (the kNN probe on a randomly initialized encoder) is also logged under the probe's own name
in a child run, so MLflow's charts draw the probe and its baseline on one chart
(:meth:`trainer.observability.tracking.Tracker.log_baseline`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from trainer.observability.tracking import BASELINE_LABEL, Tracker
from trainer.run_dir import RunDir

log = logging.getLogger(__name__)


BASELINES = {"knn_top1": "knn_top1_random"}
"""An evaluation metric -> the metric holding its baseline (logged in MLflow beside it, on one chart)."""


class MetricsLogger:
    """Fans the trainer's metrics out to the console, ``metrics.jsonl`` and the MLflow run of ``tracker``."""

    def __init__(self, run_dir: Path, tracker: Tracker, total_steps: int, every: int, enabled: bool) -> None:
        self.path = RunDir(run_dir).metrics_log
        self.tracker = tracker
        self.total_steps = total_steps
        self.every = every
        self.enabled = enabled

    def due(self, step: int) -> bool:
        """Whether step ``step`` ends a log interval: every ``tracking.log_every`` steps and the last step (on every
        rank: the interval's mean is a collective)."""
        return step % self.every == 0 or step == self.total_steps

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
        finite = {f"train/{k}": v for k, v in scalars.items() if math.isfinite(v)}
        self.tracker.log_metrics({**finite, **{f"speed/{k}": v for k, v in perf.items()}, "train/epoch": epoch}, step)

    def eval(self, step: int, metrics: dict[str, float], seconds: float, artifacts: list[tuple[str, Path]]) -> None:
        """An evaluation: its metrics and duration, and its files as MLflow artifacts."""
        if not self.enabled:
            return
        if metrics:
            shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            log.info("eval step %d (%.1fs): %s", step, seconds, shown)
        self._write({"kind": "eval", "step": step, "eval_s": seconds, **metrics})
        self.tracker.log_metrics({f"eval/{k}": v for k, v in {**metrics, "eval_s": seconds}.items()}, step)
        for name, baseline in BASELINES.items():
            if name in metrics and baseline in metrics:
                self.tracker.log_baseline(BASELINE_LABEL, {f"eval/{name}": metrics[baseline]}, step)
        for folder, path in artifacts:
            self.tracker.log_artifact(path, folder)


def console_line(step: int, total: int, epoch: float, scalars: dict[str, float], perf: dict[str, float]) -> str:
    """One compact progress line for rank 0."""
    parts = [
        f"step {step:>6d}/{total}",
        f"ep {epoch:6.2f}",
        f"loss {scalars['loss']:.4f}",
        f"lr {scalars['lr']:.2e}",
        f"gnorm {scalars.get('grad_norm', float('nan')):.3f}",
        f"{perf['images_per_s']:.0f} img/s ({perf['images_per_s_per_device']:.0f}/dev)",
        f"data {perf['data_wait_pct']:.0f}%",
        f"{perf['step_time_s'] * 1e3:.0f} ms/step",
        f"mem {perf['peak_mem_gb']:.1f}G",
    ]
    if "mfu_pct" in perf:
        parts.append(f"MFU {perf['mfu_pct']:.1f}% (dense-eq {perf['mfu_dense_equiv_pct']:.1f}%)")
    elif "tflops_per_device" in perf:
        parts.append(f"{perf['tflops_per_device']:.2f} TFLOP/s/dev")
    if scalars.get("skipped_steps"):
        parts.append(f"skipped {int(scalars['skipped_steps'])}")
    served = {k.removeprefix("samples_"): v for k, v in scalars.items() if k.startswith("samples_")}
    if served:  # a mixture of sources: each one's share of the samples served so far
        all_served = sum(served.values()) or 1.0
        parts.append("mix " + " ".join(f"{name} {100 * n / all_served:.0f}%" for name, n in served.items()))
    parts.append(f"eta {format_duration(perf['eta_s'])}")
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    """``3h04m``, ``12m30s`` or ``45s``."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def result_line(metrics: dict[str, Any]) -> str:
    """What a stage reached, from its ``metrics.json`` summary: the demo's table and the MLflow run's description."""
    stage = metrics.get("stage")
    if stage == "pretrain":
        text = f"loss {metrics.get('first_loss', float('nan')):.3f} -> {metrics.get('final_loss', float('nan')):.3f}"
        if "knn_top1" in metrics:
            start = f"at start {metrics['knn_top1_start']:.1f}%, " if "knn_top1_start" in metrics else ""
            text += f", kNN top-1 {metrics['knn_top1']:.1f}% ({start}random init {metrics['knn_top1_random']:.1f}%)"
        return text
    if stage == "finetune":
        text = f"top-1 {metrics.get('top1', float('nan')):.1f}%"
        if "ema_top1" in metrics:
            text += f" (EMA {metrics['ema_top1']:.1f}%)"
        return text + f", top-5 {metrics.get('top5', float('nan')):.1f}%"
    if stage == "detection":
        box, mask = metrics.get("box_ap", float("nan")), metrics.get("mask_ap", float("nan"))
        return f"box AP {100 * box:.1f}, mask AP {100 * mask:.1f}"
    return "-"
