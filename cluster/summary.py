"""The table printed after a local chain of stages: what each stage reached and how long it took, and with
``--payoff`` one line for the pair that shows what pretraining bought."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.config import FinetuneConfig, TrainConfig
from trainer.observability.logger import format_duration, result_line
from trainer.run_dir import RunDir


def summary_table(runs: list[tuple[TrainConfig, Path]], walls: list[float], payoff: tuple[int, int] | None) -> str:
    """One row per stage from its ``export/metrics.json`` and the stage's wall time (start-up included); the
    ``payoff`` pair (positions of the run from the pretrained encoder and of its random-weights baseline) shares
    one row: both top-1 and their difference."""
    rows = [("stage", "config", "result", "wall time")]
    pair = set(payoff or ())
    for i, ((cfg, run_dir), seconds) in enumerate(zip(runs, walls, strict=True)):
        if i not in pair:
            metrics = _metrics(run_dir)
            rows.append(
                (cfg.stage, cfg.name, result_line(metrics) if metrics else "no export", format_duration(seconds))
            )
    if payoff is not None:
        (cfg, pretrained), (_, random) = runs[payoff[0]], runs[payoff[1]]
        wall = format_duration(walls[payoff[0]] + walls[payoff[1]])
        rows.append(("payoff", cfg.name, payoff_line(cfg, _metrics(pretrained), _metrics(random)), wall))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def payoff_line(cfg: TrainConfig, pretrained: dict[str, Any], random: dict[str, Any]) -> str:
    """``linear probe top-1 71.0% from the pretrained encoder, 55.2% from random weights: +15.8 points``."""
    if "top1" not in pretrained or "top1" not in random:
        return "no export"
    what = "linear probe" if isinstance(cfg, FinetuneConfig) and cfg.finetune.linear_probe else "fine-tuning"
    gain = pretrained["top1"] - random["top1"]
    return (
        f"{what} top-1 {pretrained['top1']:.1f}% from the pretrained encoder, {random['top1']:.1f}% from random "
        f"weights: {gain:+.1f} points"
    )


def _metrics(run_dir: Path) -> dict[str, Any]:
    path = RunDir(run_dir).export_metrics
    return json.loads(path.read_text()) if path.exists() else {}
