"""The table printed after a local chain of stages: what each stage reached and how long it took."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.config import TrainConfig
from trainer.observability.logger import format_duration, result_line
from trainer.run_dir import RunDir


def summary_table(runs: list[tuple[TrainConfig, Path]], walls: list[float]) -> str:
    """One row per stage from its ``export/metrics.json`` and the stage's wall time (start-up included)."""
    rows = [("stage", "config", "result", "wall time")]
    for (cfg, run_dir), seconds in zip(runs, walls, strict=True):
        path = RunDir(run_dir).export_metrics
        metrics = json.loads(path.read_text()) if path.exists() else {}
        wall = format_duration(seconds)
        rows.append((cfg.stage, cfg.name, result_line(metrics) if metrics else "no export", wall))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
