"""The table printed after a local chain of stages: what each stage reached and how long it took."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.config import TrainConfig
from trainer.observability.logger import format_duration
from trainer.run_dir import RunDir


def _result(metrics: dict) -> str:
    stage = metrics.get("stage")
    if stage == "pretrain":
        text = f"loss {metrics.get('first_loss', float('nan')):.3f} -> {metrics.get('final_loss', float('nan')):.3f}"
        if "knn_top1" in metrics:
            text += f", kNN top-1 {metrics['knn_top1']:.1f}% (random init {metrics['knn_top1_random']:.1f}%)"
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


def summary_table(runs: list[tuple[TrainConfig, Path]], walls: list[float]) -> str:
    """One row per stage from its ``export/metrics.json`` and the stage's wall time (start-up included)."""
    rows = [("stage", "config", "result", "wall time")]
    for (cfg, run_dir), seconds in zip(runs, walls, strict=True):
        path = RunDir(run_dir).export_metrics
        metrics = json.loads(path.read_text()) if path.exists() else {}
        wall = format_duration(seconds)
        rows.append((cfg.stage, cfg.name, _result(metrics) if metrics else "no export", wall))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
